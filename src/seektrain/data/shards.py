"""Token shards on disk: the writer (fixed-size, atomic, checksummed) and the manifest reader.

A split (`train/`, `val/`) is a list of flat little-endian uint16/uint32 files whose concatenation is
the split's token stream: documents one after another, each followed by EOS. Every shard but the last
holds exactly `shard_tokens` tokens (documents cross shard boundaries). Each file is written under a
temporary name and renamed when complete, so an interrupted prepare never leaves a shard that looks
complete; `manifest.json`, written last, lists every shard with its token count and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from seektrain.errors import UserError
from seektrain.paths import atomic_write_bytes

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer the shards were made with, beside the manifest


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (always little-endian on disk)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


class ShardWriter:
    """Appends token arrays to one split, cutting files of exactly `shard_tokens` tokens."""

    def __init__(self, split_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.dir, self.dtype, self.shard_tokens = Path(split_dir), np.dtype(dtype), int(shard_tokens)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.documents = 0

    def write(self, tokens: np.ndarray, documents: int = 0) -> None:
        """Append (N,) token ids (already including the EOS after each document)."""
        self.documents += documents
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self._pending_len)
            self._pending.append(tokens[:take])
            self._pending_len += take
            tokens = tokens[take:]
            if self._pending_len == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        data = np.concatenate(self._pending).astype(self.dtype, copy=False).tobytes()
        name = f"{len(self.shards):05d}.bin"
        atomic_write_bytes(self.dir / name, data)
        self.shards.append(
            {
                "file": f"{self.dir.name}/{name}",
                "tokens": self._pending_len,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self._pending, self._pending_len = [], 0

    def close(self) -> dict:
        """Write the last (partial) shard; returns the split's manifest entry."""
        if self._pending_len:
            self._flush()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": self.documents,
            "shards": self.shards,
        }


def _read_manifest(path: Path, hint: str) -> dict:
    """The JSON at `path` when it has a seektrain manifest's keys (any format version), else UserError."""
    try:
        manifest = json.loads(path.read_text())
        for key in ("format_version", "splits", "dtype", "vocab_size"):
            manifest[key]  # noqa: B018 - KeyError when missing, TypeError when not a JSON object
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corrupt manifest {path} ({e}): {hint}") from e
    return manifest


def is_data_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a seektrain manifest, of any format version (so an old data dir can be prepared
    again in place). A folder whose manifest.json is someone else's (a web app's) is not one."""
    try:
        _read_manifest(Path(path) / MANIFEST, "")
    except (UserError, OSError):
        return False
    return True


def tokenizer_file(data_dir: str | os.PathLike) -> Path:
    """A data dir's tokenizer.json, for a command given one with --data; UserError saying what to give
    where the path is none (missing, a file, a folder of raw text, which is what a user most likely
    passed: the advice must not be to replace it)."""
    folder = Path(data_dir)
    path = folder / TOKENIZER_FILE
    if path.is_file():
        return path
    if not folder.exists():
        what = "does not exist"
    elif not folder.is_dir():
        what = "is a file"
    elif not (folder / MANIFEST).is_file():
        what = f"is not a prepared data dir (no {MANIFEST})"
    else:
        raise UserError(f"{data_dir} lacks its {TOKENIZER_FILE}: prepare it again (`seektrain prepare`)")
    raise UserError(
        f"{data_dir} {what}: give a data dir that `seektrain prepare` made "
        "(`seektrain prepare --input RAW_TEXT --out data/NAME`)"
    )


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The data dir's manifest; UserError with a hint when it is missing, corrupt or of another version."""
    path = Path(data_dir) / MANIFEST
    hint = f"run `seektrain prepare --out {data_dir}` to create it"
    # prepare replaces only an empty folder or a data dir: one without a readable manifest goes first
    lost = f"delete {data_dir}, then run `seektrain prepare --out {data_dir}` to create it again"
    if not path.is_file():
        if Path(data_dir).is_dir() and any(Path(data_dir).iterdir()):  # raw text, most likely: keep it
            hint = (
                "prepare one from raw text with `seektrain prepare --input … --out data/NAME` (a data dir "
                f"that lost its {MANIFEST}: delete it, then prepare it again)"
            )
        raise UserError(f"no prepared data at {data_dir} ({MANIFEST} missing): {hint}")
    manifest = _read_manifest(path, lost)
    version = manifest["format_version"]
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path} has data format version {version}, this seektrain reads {FORMAT_VERSION}: {hint}"
        )
    return manifest


def verify_shards(data_dir: str | os.PathLike, manifest: dict, split: str, checksums: bool = True) -> None:
    """Check each shard of `split` exists with the right size and (optionally) SHA-256; UserError if not."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["splits"][split]["shards"]:
        path = Path(data_dir) / shard["file"]
        if not path.is_file():
            raise UserError(f"shard missing: {path} (listed in the manifest); re-run `seektrain prepare`")
        if path.stat().st_size != shard["tokens"] * itemsize:
            raise UserError(
                f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                f"{shard['tokens'] * itemsize}: truncated or replaced; re-run `seektrain prepare`"
            )
        if checksums:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            if digest.hexdigest() != shard["sha256"]:
                raise UserError(
                    f"checksum mismatch in shard {path}: the file is corrupt; re-run `seektrain prepare`"
                )
