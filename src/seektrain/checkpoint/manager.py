"""Checkpoints as directories `step_XXXXXXXX/` that appear atomically, with retention and discovery.

A checkpoint is written into a hidden temporary directory, every file fsynced, and only then renamed
to its final name; a directory with a final name is therefore always complete, and a crash mid-write
leaves only a `.tmp-*` directory that discovery ignores and the next save removes. Old checkpoints
are removed by renaming them to a hidden name first, so a half-deleted one never looks complete. A save
of a step that has a checkpoint already (a rollback's) moves that one aside and deletes it only once the
new one has its name: a kill between the two renames leaves it to be put back (`recover`). meta.json
lists every other file with its size, so a checkpoint that lost a shard, or holds a file cut short (a
partial copy), is not complete either.

Under torchrun (`save_sharded`) every rank writes its shards of model and optimizer into the same
temporary directory (`sharded.py`); rank 0 writes the rest and renames the directory only after a
barrier, i.e. once every rank's files are on disk. A rank killed mid-save leaves only `.tmp-*`.
The run directory must be on a filesystem all ranks share. An asynchronous save (DCP writes in a
background thread while training goes on) is completed and renamed by `finish_pending`, which the next
save calls first and the trainer calls at the end of the run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seektrain.checkpoint.sharded import DCP_DIR, METADATA_FILE, SHELVE
from seektrain.errors import RanksError, UserError, first_line

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.toml"
_NAME = re.compile(r"^step_(\d{8})$")
ABANDONED_DIR = "abandoned"  # checkpoints newer than the one a run was resumed from
_REPLACED = ".replaced-"  # + step_XXXXXXXX-PID: a checkpoint a save of its step is replacing


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Saves, lists and loads checkpoints under `root` (RUN_DIR/checkpoints), keeping the newest `keep`."""

    def __init__(self, root: str | os.PathLike, keep: int):
        self.root = Path(root)
        self.keep = keep
        self._pending: tuple | None = None  # an asynchronous sharded save not yet renamed

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return [p for p in self._step_dirs() if is_complete(p)]

    def _step_dirs(self) -> list[Path]:
        """Directories with a checkpoint's name, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any], config_toml: str, meta: dict[str, Any]) -> Path:
        """Write a checkpoint for `step` (replacing one of the same step) and apply retention."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            tmp.mkdir()
            _write(tmp / STATE_FILE, lambda f: torch.save(state, f))
            return self._finish(tmp, final, step, config_toml, meta)
        except (OSError, RuntimeError) as e:  # a full disk: torch.save's writer raises RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)  # the space it held goes back; older checkpoints stay
            raise UserError(self._write_failed(final, e)) from e

    def _write_failed(self, final: Path, e: BaseException) -> str:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        if "unexpected pos" in reason:  # torch.save's zip writer after a short write
            reason = f"a write came up short: disk full or a file size limit; torch: {reason}"
        try:
            free = f", {shutil.disk_usage(self.root).free / 2**20:,.0f} MiB free there"
        except OSError:
            free = ""
        return f"cannot write checkpoint {final} ({reason}{free}); the checkpoints before it are intact"

    def save_sharded(
        self,
        step: int,
        write_shards: Callable[[Path], Any],
        state: dict[str, Any],
        config_toml: str,
        meta: dict[str, Any],
        is_main: bool,
    ) -> Path:
        """Called by every rank: `write_shards(tmp_dir)` is the collective DCP write of model and
        optimizer; rank 0 (`is_main`) adds `state` (the rest, no model) and renames after a barrier.
        When `write_shards` returns a Future (an asynchronous write), that happens in `finish_pending`."""
        self.finish_pending()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}"  # one name for all ranks (pids differ)

        def make_tmp() -> None:
            if is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                self._remove_stale()
                tmp.mkdir()

        self._on_every_rank(make_tmp, tmp, final, is_main)
        future = self._on_every_rank(lambda: write_shards(tmp), tmp, final, is_main)
        self._pending = (future, tmp, final, step, copy.deepcopy(state), config_toml, meta, is_main)
        if future is None:
            self.finish_pending()
        return final

    def finish_pending(self) -> Path | None:
        """Complete the last sharded save (every rank calls it): wait for this rank's shards, then,
        after a barrier, rank 0 writes the rest and renames the directory. None when nothing is pending."""
        if self._pending is None:
            return None
        future, tmp, final, step, state, config_toml, meta, is_main = self._pending
        self._pending = None
        # every rank's shards are written (and fsynced by DCP) before rank 0 writes the rest
        self._on_every_rank(lambda: future is None or future.result(), tmp, final, is_main)

        def write_rest() -> None:
            if is_main:
                _write(tmp / STATE_FILE, lambda f: torch.save(state, f))
                _fsync_dir(tmp / DCP_DIR)
                self._finish(tmp, final, step, config_toml, meta)

        self._on_every_rank(write_rest, tmp, final, is_main)  # nobody reads checkpoints before the rename
        return final

    def _on_every_rank(self, phase: Callable[[], Any], tmp: Path, final: Path, is_main: bool) -> Any:
        """`phase()` on this rank, then a collective in which the ranks learn whether it failed on any of
        them (it doubles as the barrier between phases). A write that failed on one rank (a full disk
        under a shard, a node's read-only mount) ends every rank with the same error, where a barrier
        would leave the others waiting; rank 0 removes the temporary directory."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.api import CheckpointException

        from seektrain.distributed.env import merge_by_rank

        result, error = None, None
        try:
            result = phase()
        except (OSError, RuntimeError, CheckpointException) as e:  # DCP: a BaseException, all ranks
            failures = getattr(e, "failures", None)  # rank -> (exception, traceback)
            error = self._write_failed(final, next(iter(failures.values()))[0] if failures else e)
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        if any(message is not None for message in errors):
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise RanksError(merge_by_rank(errors))
        return result

    def _finish(self, tmp: Path, final: Path, step: int, config_toml: str, meta: dict[str, Any]) -> Path:
        _write(tmp / CONFIG_FILE, lambda f: f.write(config_toml.encode()))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in files}
        record = {"step": step, **meta, "files": sizes}
        _write(tmp / META_FILE, lambda f: f.write(json.dumps(record, indent=1).encode()))
        _fsync_dir(tmp)
        replaced = self.root / f"{_REPLACED}{final.name}-{os.getpid()}"
        if final.exists():  # deleted only once the new one has its name
            os.replace(final, replaced)
        try:
            os.replace(tmp, final)
        except OSError:
            if replaced.exists():
                os.replace(replaced, final)  # the old one keeps its name
            raise
        _fsync_dir(self.root)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in self.list()[: -self.keep]:
            self._discard(old)
        return final

    def damaged(self) -> list[Path]:
        """Directories with a checkpoint's name that lack some of its files, oldest first. A save renames
        only complete directories, so something else took files from these: discovery skips them (they
        cannot be resumed from), and nothing here deletes them."""
        return [p for p in self._step_dirs() if not is_complete(p)]

    def set_aside_after(self, step: int) -> list[tuple[Path, list[str]]]:
        """Move the checkpoints newer than `step` into root/abandoned/N/ (N = 1, 2, … per resume that
        abandons some; their names kept, so each still loads or resumes from there) and return their new
        paths, each with the files it lacked (none for a complete one). A run resumed from an older
        checkpoint of its own takes another trajectory from there: `--resume auto` must never pick up the
        abandoned one, nor retention delete the checkpoint it resumed from to keep it. Damaged ones (see
        `damaged`) newer than `step` move too, or the run's own save of that step would replace them.
        Moved, not deleted: they are the user's."""
        newer = [(p, missing_files(p)) for p in self._step_dirs() if int(_NAME.match(p.name).group(1)) > step]
        if not newer:
            return []
        parent = self.root / ABANDONED_DIR
        parent.mkdir(exist_ok=True)
        n = 1 + max((int(p.name) for p in parent.iterdir() if p.name.isdigit()), default=0)
        aside = parent / str(n)
        aside.mkdir()
        for path, _ in newer:
            os.replace(path, aside / path.name)
        _fsync_dir(self.root)
        return [(aside / p.name, missing) for p, missing in newer]

    def _discard(self, path: Path) -> None:
        trash = self.root / f".trash-{path.name}-{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def recover(self) -> list[Path]:
        """Put back each checkpoint that a save of its step had moved aside when the save was killed
        before the new one took its name (so neither has it); returns them. For one writer of the run at
        a time (the trainer holds the run dir's lock): any such directory is a killed save's."""
        back = []
        for p, final in self.moved_aside():
            if is_complete(p):
                os.replace(p, final)
                back.append(final)
        return back

    def moved_aside(self) -> list[tuple[Path, Path]]:
        """(directory, its step_ name) of the checkpoints a killed save left moved aside (see `recover`)."""
        found = []
        for p in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            name = p.name.removeprefix(_REPLACED).rpartition("-")[0]
            if p.name.startswith(_REPLACED) and _NAME.match(name) and not (self.root / name).exists():
                found.append((p, self.root / name))
        return found

    def _remove_stale(self) -> None:
        """Leftovers of interrupted saves/deletes (any process: they are never resumed from), after
        putting back what `recover` can; a checkpoint moved aside is deleted only where its step has one."""
        self.recover()
        kept = {p for p, _ in self.moved_aside()}
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".trash-", _REPLACED)) and p not in kept:
                shutil.rmtree(p, ignore_errors=True)


def missing_files(path: Path) -> list[str]:
    """What `path` lacks of a checkpoint's files (none: it is complete): those missing, and `all of NAME
    (SIZE of RECORDED bytes)` for one whose size is not the one meta.json recorded (checkpoints written
    before meta.json listed them are checked for their names only)."""
    files = [STATE_FILE, META_FILE, CONFIG_FILE]
    if (path / DCP_DIR).exists():
        files.append(f"{DCP_DIR}/{METADATA_FILE}")
    missing = [name for name in files if not (path / name).is_file()]
    if META_FILE in missing:
        return missing
    try:
        recorded = json.loads((path / META_FILE).read_bytes()).get("files", {})
        if not all(isinstance(k, str) and type(v) is int for k, v in recorded.items()):
            raise ValueError("files: not names with sizes")
    except (OSError, ValueError, AttributeError):
        return [*missing, f"a readable {META_FILE}"]
    for name, size in recorded.items():
        file = path / name
        if not file.is_file():
            if name not in missing:
                missing.append(name)
        elif (actual := file.stat().st_size) < size:
            missing.append(f"all of {name} ({actual:,} of {size:,} bytes)")
        elif actual > size:
            missing.append(f"{name} as written ({actual:,} bytes, {size:,} recorded)")
    return missing


def is_complete(path: Path) -> bool:
    return not missing_files(path)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """`never` → None; `auto` → newest complete checkpoint of the run (or None); else a checkpoint
    directory, or a run directory whose newest checkpoint is taken."""
    if resume == "never":
        return None
    if resume == "auto":
        return CheckpointManager(run_dir / "checkpoints", keep=1).latest()
    path = Path(resume)
    if _NAME.match(path.name) and path.is_dir():
        if missing := missing_files(path):
            raise UserError(f"--resume {resume}: not a complete checkpoint: it lacks {', '.join(missing)}")
        return path
    latest = CheckpointManager(path / "checkpoints", keep=1).latest() if path.is_dir() else None
    if latest is None:
        raise UserError(
            f"--resume {resume}: not a complete checkpoint (step_XXXXXXXX/ with {STATE_FILE}) "
            "nor a run directory with one"
        )
    return latest


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The state dict saved by `CheckpointManager.save` (tensors on CPU). With `mmap` the file is memory-
    mapped, so that only the tensors a caller touches are read (a file not in zip format, which mmap
    needs, is read the ordinary way)."""
    file = path / STATE_FILE
    try:
        if mmap:
            with contextlib.suppress(RuntimeError):  # not zip-format: read below
                return upgrade_config(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        return upgrade_config(torch.load(file, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: not for this file
        foreign = [line for line in str(e).splitlines() if "Unsupported global" in line]
        # "WeightsUnpickler error: Unsupported global: GLOBAL x.Y was not an allowed global by default. …"
        why = foreign[0].split("error: ", 1)[-1].split(". ")[0] if foreign else "damaged or not a checkpoint"
        raise UserError(f"cannot read checkpoint {path}: {STATE_FILE}: {why}; {SHELVE}") from None
    except OSError as e:  # unreadable (permissions, an I/O error), not damaged: no advice to shelve it
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    except Exception as e:  # truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)}; {SHELVE}") from None


def upgrade_config(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config in today's terms: `model.mtp_input` is "unnormed" where a checkpoint from
    before the field (2026-11-27) has MTP modules, which were trained on the pre-norm hidden state."""
    model = state.get("config", {}).get("model") if isinstance(state.get("config"), dict) else None
    if isinstance(model, dict) and "mtp_input" not in model:
        model["mtp_input"] = "unnormed" if model.get("num_mtp_layers") else "normed"
    return state


def _write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
