"""Checks on a directory a command is about to create or fill, so that a path it cannot use fails with
one line before any work, not with an OSError halfway (a regular file where a directory should be)."""

from __future__ import annotations

from pathlib import Path

from seektrain.errors import UserError


def check_dir_target(path: str | Path, what: str) -> None:
    """UserError unless `path` is a directory or can become one: it must not be a file, and its nearest
    existing ancestor must be a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is not a directory")
            return
