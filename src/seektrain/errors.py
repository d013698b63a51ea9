"""The one exception type for user mistakes (the CLI prints it as `error: …` and exits 2), and the
helpers that keep a failure's report to that one line."""

import os
import re
import sys


class UserError(Exception):
    """Bad input (config, paths, data). Raised with a message a user can act on."""


class RanksError(UserError):
    """A UserError that every rank of a launch raises with the same message, which already names the ranks
    it concerns where they differ (`distributed.env.agree`): reported without a `rank N: ` prefix."""


class Terminated(BaseException):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt), so that the `finally`
    blocks that remove half-written temp dirs run; a BaseException, so no `except Exception` swallows it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): a library's multi-line
    error must not break the one-line report, nor a control character in it (a damaged file's byte,
    quoted by the library) reach the terminal: those are escaped."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), line)


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def detach_stdout() -> None:
    """Point stdout at /dev/null once its reader went away (`seektrain … | head`), so that no later write,
    nor the flush at exit, fails again with a BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# What CUDA libraries raise when their own allocations fail (cuBLAS/cuDNN workspaces, a kernel launch),
# as a RuntimeError or torch.AcceleratorError rather than the caching allocator's OutOfMemoryError.
_GPU_OUT_OF_MEMORY = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (a GPU's, the host's, numpy's), None for any other error.
    Running out of memory is a matter of sizes the user chose, so it is reported like bad input."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.OutOfMemoryError):  # "CUDA out of memory. Tried to …"
        return f"out of GPU memory: {first_line(e)}"
    if isinstance(e, RuntimeError) and any(m in str(e) for m in _GPU_OUT_OF_MEMORY):  # outside the allocator
        return f"out of GPU memory: {first_line(e)}"
    if isinstance(e, MemoryError):  # numpy: "Unable to allocate 4.00 GiB for an array with shape …"
        return f"out of host memory: {first_line(e)}"
    if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):  # torch's CPU allocator
        size = re.search(r"tried to allocate (\d+) bytes", str(e))
        wanted = f": could not allocate {int(size.group(1)) / 2**30:,.1f} GiB" if size else ""
        return f"out of host memory{wanted}"
    return None


def file_error(e: BaseException) -> str | None:
    """One line for a file or folder a command could not use (permission denied, a file where a folder
    goes, an I/O error): its path and the system's reason. None for any other error."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return None
