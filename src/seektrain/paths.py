"""Checks on a directory a command is about to create or fill, so that a path it cannot use fails with
one line before any work, not with an OSError halfway (a regular file where a directory should be); a
lock that keeps a second process from filling it at the same time; atomic writes, and what killed ones
leave behind."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from seektrain.errors import UserError


def check_dir_target(path: str | Path, what: str) -> Path:
    """UserError unless `path` is a directory or can become one: it must not be a file, and its nearest
    existing ancestor must be a directory. Returns `path` where it exists, else that ancestor."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    place = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())  # `/` at the latest
    if not place.is_dir():
        raise UserError(f"{what} {path}: {place} is not a directory")
    return place


def check_writable_dir(path: str | Path, what: str) -> None:
    """`check_dir_target`, and the directory (or its nearest existing ancestor, where it would be created)
    takes a new file: probed with an unnamed temporary file, so that a read-only filesystem, a folder
    without write permission or a pseudo-filesystem fails here, before the work, in one line."""
    place = check_dir_target(path, what)
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write in {place} ({e.strerror or e})") from e


def recover_interrupted(out: Path, swap_marker: str | None = None) -> None:
    """Clean up beside `out` after a command that was killed (SIGKILL, a power cut) while building it
    under a temporary sibling name (`.NAME.tmp-PID`): delete that temp dir. With `swap_marker` (for a
    command that swaps a complete dir in: prepare), one that died between the two renames of its swap gets
    the previous complete dir (`.NAME.old-PID` holding that file) put back; without it, `.old-` dirs are
    left alone. Leftovers of a process that is still running are not touched."""
    if not out.parent.is_dir():
        return  # nothing was ever built there
    kinds = ("tmp", "old") if swap_marker else ("tmp",)
    prefix = f".{out.name}."  # compared as text: a name may hold glob characters (`data[1]`, `d?`)
    for leftover in sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix)):
        kind, _, pid = leftover.name[len(prefix) :].partition("-")
        if kind not in kinds or not pid.isdigit() or pid_alive(int(pid)):
            continue
        if kind == "old" and not out.exists() and (leftover / swap_marker).exists():
            os.replace(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` creates a temporary sibling of `path` (a name of this call's own), which then
    replaces `path`: readers never see a partial file. Whatever fails, the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` to `path` through `atomic_write`, fsynced. An OSError (a full disk) names `path`."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    try:
        atomic_write(path, write)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


# atomic_write's temporary names: .NAME.PID-XXXXXXXX.tmp
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def remove_stale_temp_files(directory: Path) -> None:
    """Delete the temporary files that `atomic_write` calls of processes no longer running left in
    `directory` (killed mid-write, where no handler could remove them)."""
    for p in directory.iterdir():
        match = _TEMP_FILE.match(p.name)
        if match and p.is_file() and not pid_alive(int(match["pid"])):
            p.unlink(missing_ok=True)


class DirLock:
    """An exclusive lock on `directory/.lock` (flock) that keeps other processes from filling the same
    directory: one that holds it refuses another in one line naming the holder's pid. The kernel drops it
    when the holder ends, a kill -9 included, so a stale one never blocks. Within one process the holders
    of a directory share it (Trainers built side by side in Python). Where the filesystem has no flock
    (`unsupported` then says why) or the platform none, it does nothing."""

    FILE = ".lock"
    _held: dict[Path, list] = {}  # resolved directory -> [open file, holders] in this process

    def __init__(self, directory: Path, what: str):
        self.directory, self.what = Path(directory), what
        self.unsupported: str | None = None
        self._key: Path | None = None

    def acquire(self) -> None:
        """Take the lock (again: a no-op); UserError where another process holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        if self._key is not None:
            return
        key = self.directory.resolve()
        if key in self._held:
            self._held[key][1] += 1
            self._key = key
            return
        path = self.directory / self.FILE
        try:
            file = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        except OSError as e:
            raise UserError(f"{self.what} {self.directory}: cannot write {path} ({e.strerror or e})") from e
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise UserError(
                f"{self.what} {self.directory} is in use by another seektrain process (pid {holder}): "
                "wait for it to end or stop it, or choose another directory"
            ) from None
        except OSError as e:  # no flock on this filesystem (ENOLCK, EOPNOTSUPP): no lock, said once
            file.close()
            self.unsupported = f"cannot lock {path} ({e.strerror or e}): a second process is not kept out"
            return
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        self._held[key] = [file, 1]
        self._key = key

    def release(self) -> None:
        if self._key is None:
            return
        held = self._held[self._key]
        held[1] -= 1
        if not held[1]:
            held[0].close()  # closing the file drops the lock
            del self._held[self._key]
        self._key = None
