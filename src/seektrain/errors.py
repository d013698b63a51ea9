"""The one exception type for user mistakes (the CLI prints it as `error: …` and exits 2), and the
helpers that keep a failure's report to that one line."""

import os
import sys


class UserError(Exception):
    """Bad input (config, paths, data). Raised with a message a user can act on."""


class Terminated(BaseException):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt), so that the `finally`
    blocks that remove half-written temp dirs run; a BaseException, so no `except Exception` swallows it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): a library's multi-line
    error must not break the one-line report."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def detach_stdout() -> None:
    """Point stdout at /dev/null once its reader went away (`seektrain … | head`), so that no later write,
    nor the flush at exit, fails again with a BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
