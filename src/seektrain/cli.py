"""`seektrain VERB …`: one subcommand per module in `seektrain.commands`, each a plain function.

User mistakes raise `UserError` and end as one `error: …` line with exit code 2; `--debug` shows the
traceback too. Command modules import torch lazily so that `seektrain --help` stays instant.

Under torchrun the line is printed once per launch: every rank raises the same error (the same command
line and config; the trainer makes its ranks agree on what they read from disk, `distributed.env.agree`),
so rank 0 prints it and the other ranks wait ERROR_GRACE_S first, since torchrun stops them as soon as
rank 0 exits. A rank still running after that failed alone (say, no GPU on its node) and prints its own
error as `error: rank N: …`. The same holds for argparse's usage errors. Other launchers that set RANK
may not stop the remaining ranks: there every rank > 0 reports at once, with its rank.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
import traceback

from seektrain.distributed.env import launch_rank, lost_rank, under_torchrun
from seektrain.errors import RanksError, Terminated, UserError, detach_stdout, file_error, out_of_memory

ERROR_GRACE_S = 10.0  # how long a rank > 0 leaves rank 0 to report an error that all ranks share
IMPORT_RETRY_S = 0.05  # how often a signal that came during an import is sent again (`_importing`)
IMPORT_WAIT_MAX_S = 10.0  # after this long it is raised anyway (an import that hangs)

# verb -> module in seektrain.commands; each module has `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "prepare": "prepare",
    "train": "train",
    "eval": "evaluate",
    "generate": "generate",
    "export": "export",
    "import": "import_hf",
    "bench": "bench",
}

# what to change when a command runs out of memory (an allocation that failed is reported in one line)
MEMORY_HINTS = {
    "train": "lower train.micro_batch_size or data.seq_len, or set train.activation_checkpointing",
    "bench": "lower --batch or --seq, use a smaller --preset or --layers, or add --activation-checkpointing",
    "eval": "lower --batch-size",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors reported like `UserError`s: one `error: …` line (pointing to
    --help rather than printing the usage block), once per torchrun launch."""

    verbs: dict[str, argparse.ArgumentParser] | None = None  # the top-level parser's subcommands

    def error(self, message: str):
        prefix = _wait_unless_rank_zero()
        self.exit(2, f"error: {prefix}{message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse, except that an unknown flag after a verb points to that verb's --help."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            verb = (self.verbs or {}).get(getattr(parsed, "command", None), self)
            verb.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


DEBUG_HELP = "show tracebacks instead of one error line"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="seektrain",
        description="Train DeepSeek-V3-style language models: prepare → train → eval, generate, export.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.verbs = {}
    for verb, module_name in COMMANDS.items():
        module = importlib.import_module(f"seektrain.commands.{module_name}")
        p = sub.add_parser(verb, help=module.__doc__.splitlines()[0], description=module.__doc__)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        parser.verbs[verb] = p
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        previous = _handle_signals()
        try:
            args = build_parser().parse_args(argv)
            return int(args._run(args) or 0)
        finally:  # while an error is reported (a rank waiting for rank 0's), SIGTERM ends it as before
            _release_signals(previous)
    except BrokenPipeError:  # stdout's reader went away (`seektrain generate … | head`): end quietly
        detach_stdout()
        return 128 + signal.SIGPIPE
    except Exception as e:
        memory = None if isinstance(e, UserError) else out_of_memory(e)
        message = str(e) if isinstance(e, UserError) else memory or lost_rank(e) or file_error(e)
        if message is None:
            raise
        command = getattr(args, "command", None)
        if memory is not None and command in MEMORY_HINTS:
            message += f" ({MEMORY_HINTS[command]})"
        prefix = _wait_unless_rank_zero()
        if isinstance(e, RanksError):  # names the ranks itself
            prefix = ""
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {prefix}{message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if launch_rank() <= 0:  # once per launch, as errors are
            print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        if launch_rank() <= 0:
            print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


def _handle_signals() -> dict:
    """SIGTERM (kill, a timeout, a scheduler) is handled as Ctrl-C is: an exception where the program is,
    so a command cleans up its temp dirs on the way out (the default action would end it on the spot).
    The trainer sets its own handlers while it trains (checkpoint, then exit). Not in a launched rank
    (RANK set): a Python handler runs only between bytecodes, so a rank blocked in a rendezvous or a
    collective would ignore its launcher's SIGTERM until SIGKILL; the default action ends it at once.
    Either signal waits for an import under way below the caller to finish (`_importing`); an ignored
    SIGINT (a background job's) stays ignored. (prepare's pool workers set their own actions:
    `data.workers.ordered_map`.) Returns the handlers to restore: none off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    global _caller
    _caller = sys._getframe(1)
    previous = {}
    if "RANK" not in os.environ:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupt)
    return previous


def _release_signals(previous: dict) -> None:
    """Undo `_handle_signals`: stop the retries of deferred signals, restore the previous handlers (also
    where a retry sent meanwhile raises here). Off the main thread there is nothing of its own to undo."""
    global _caller
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        _cancel_retries()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _caller = None


def _raise_terminated(signum, frame) -> None:
    if _importing(frame) and _signal_again(signum):
        return
    _cancel_retries()  # a retry still pending must not be replayed into the cleanup
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nor a second SIGTERM cut it short
    raise Terminated


def _raise_interrupt(signum, frame) -> None:
    if _importing(frame) and _signal_again(signum):
        return
    _cancel_retries()  # a retry still pending must not be replayed into the cleanup
    raise KeyboardInterrupt


_caller = None  # the frame that called `_handle_signals`: imports above it are not waited for
_timers: dict[int, threading.Timer] = {}  # per signal deferred past an import: the timer sending it again
_waiting_since: dict[int, float] = {}  # and when it first came
# between the main thread and the timers' threads; reentrant, as a handler may run in the main thread
# while it holds the lock
_timers_lock = threading.RLock()


def _signal_again(signum: int) -> bool:
    """Send `signum` to this process again shortly, when the import under way has likely finished: one
    timer per signal, so that Ctrl-C pressed again while waiting is not replayed later, into the
    cleanup. False (raise it now) after IMPORT_WAIT_MAX_S, or where no thread can be started for it.
    Whatever handler is in place then gets it (the trainer's, once it has set its own)."""
    with _timers_lock:
        if signum in _timers:
            return True
        since = _waiting_since.setdefault(signum, time.monotonic())
        if time.monotonic() - since > IMPORT_WAIT_MAX_S:
            return False
        timer = threading.Timer(IMPORT_RETRY_S, lambda: _send_again(signum, timer))
        timer.daemon = True
        _timers[signum] = timer
        try:
            timer.start()
        except RuntimeError:  # the interpreter is shutting down
            del _timers[signum]
            return False
    return True


def _send_again(signum: int, timer: threading.Timer) -> None:
    with _timers_lock:  # held while sending: `_cancel_retries` returns only once no retry is in flight
        if _timers.get(signum) is timer:
            del _timers[signum]
            if signal.getsignal(signum) not in (_raise_terminated, _raise_interrupt):
                _waiting_since.pop(signum, None)  # another's handler takes it: this wait is over
            os.kill(os.getpid(), signum)


def _cancel_retries() -> None:
    """Stop the timers of deferred signals (the signal is being raised, or `main` restores the previous
    handlers, which must not get them)."""
    with _timers_lock:
        timers = list(_timers.values())
        _timers.clear()
        _waiting_since.clear()
    for timer in timers:
        timer.cancel()


def _importing(frame) -> bool:
    """Whether Python is importing a module at `frame`, below `_handle_signals`' caller (`main`, which may
    itself run inside an import). An exception raised there leaves half-built modules behind (numpy
    without `multiply`, a C extension that cannot be loaded twice), and the way out then fails with a
    traceback instead of cleaning up; the commands import torch and numpy lazily, so a signal in their
    first second often lands in one."""
    while frame is not None and frame is not _caller:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _wait_unless_rank_zero() -> str:
    """Before reporting an error: nothing to wait for on rank 0 or outside a launch (returns ''); a
    rank > 0 under torchrun sleeps ERROR_GRACE_S, in which torchrun ends it if rank 0 failed too, and
    otherwise reports on its own (returns 'rank N: '; under other launchers at once)."""
    rank = launch_rank()
    if rank <= 0:
        return ""
    if under_torchrun():
        time.sleep(ERROR_GRACE_S)
    return f"rank {rank}: "


if __name__ == "__main__":
    sys.exit(main())
