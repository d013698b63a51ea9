"""`prepare`: raw inputs -> cleaned, deduplicated, tokenized, sharded data dir (see shards.py for the format).

Passes, each bounded in memory:
  1. read + clean (workers) -> cleaned text appended to a scratch file, 8-byte fingerprints kept
  2. dedup from fingerprints alone (exact, then MinHash LSH) -> keep mask
  3. tokenizer: load, or train a byte-level BPE on (a stride sample of) the kept documents
  4. tokenize (workers) -> train/val shards, split by a hash of each document's content
Everything is written into a temporary sibling directory and renamed over `out_dir` at the end, so a
failed or interrupted run never harms an existing data dir. Output is a pure function of the inputs
and options (not of the number of workers): re-running gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from seektrain import host_limits
from seektrain.data import workers as W
from seektrain.data.clean import CleanConfig
from seektrain.data.dedup import MinHasher, exact_keep, near_dup_keep
from seektrain.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_FILE,
    ShardWriter,
    atomic_write_json,
    is_data_dir,
    token_dtype,
)
from seektrain.data.sources import STDLIB, SourceFile, discover, iter_documents
from seektrain.data.tokenizer import (
    BOS,
    EOS,
    PAD,
    TokenizerConfig,
    load_tokenizer,
    special_tokens,
    train_bpe,
)
from seektrain.errors import UserError
from seektrain.paths import atomic_write_bytes, check_dir_target, recover_interrupted

DEDUP_MODES = ("none", "exact", "minhash")
REPORT = "prepare_report.json"
_BATCH_BYTES = 1 << 20  # documents per worker task: about 1 MB of text


@dataclass
class PrepareConfig:
    """Options of `seektrain prepare`; the defaults are the CLI's defaults."""

    inputs: list[str] = field(default_factory=lambda: ["stdlib"])
    out_dir: str = "data/stdlib"
    vocab_size: int = 8192
    tokenizer: str | None = None  # an existing tokenizer.json instead of training one
    dedup: str = "exact"  # none | exact | minhash (minhash also removes exact duplicates)
    minhash_threshold: float = 0.8
    minhash_num_perm: int = 128
    minhash_ngram: int = 5
    val_fraction: float = 0.01
    workers: int | None = None  # None: one per CPU it may use, which is also the most started
    text_field: str = "text"
    skip_bad_lines: bool = False
    shard_tokens: int = 1 << 24
    tokenizer_train_bytes: int = 1 << 30  # BPE training sample cap (a stride sample beyond it)
    num_slices: int = 1  # prepare only every num_slices-th input file, starting at slice_index
    slice_index: int = 0
    clean: CleanConfig = field(default_factory=CleanConfig)
    special_tokens: tuple[str, str, str] = (BOS, EOS, PAD)  # bos, eos, pad of a trained tokenizer
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, os.PathLike)):
            self.inputs = [self.inputs]
        self.inputs = [os.fspath(i) for i in self.inputs]  # pathlib.Path too (the manifest is JSON)
        if not self.inputs:
            raise UserError("no inputs given")
        # an empty path is the current folder to pathlib: `--out "$UNSET"` replaced ./data/stdlib (the CLI's
        # default for a missing --out), `--input ""` read the current folder, `--tokenizer ""` trained one
        paths = [("--input", i) for i in self.inputs]
        for option, value in [*paths, ("--out", self.out_dir), ("--tokenizer", self.tokenizer)]:
            if value is not None and not str(value).strip():
                raise UserError(f"{option} is empty: name a path (an unset shell variable?)")
        if self.dedup not in DEDUP_MODES:
            raise UserError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, got {self.dedup!r}")
        if not 0.0 < self.minhash_threshold < 1.0:  # checked with any --dedup: a typo is not ignored
            raise UserError(f"--minhash-threshold must lie in (0, 1), got {self.minhash_threshold}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.shard_tokens < 1:
            raise UserError(f"shard size must be at least 1 token, got {self.shard_tokens}")
        if self.num_slices < 1 or not 0 <= self.slice_index < self.num_slices:
            raise UserError(
                f"need 0 <= slice index < number of slices, got {self.slice_index}, {self.num_slices}"
            )
        if self.num_slices > 1 and self.tokenizer is None:
            raise UserError(
                "slices must share one tokenizer: pass --tokenizer FILE (e.g. from a prepare of a "
                "sample) with --num-slices"
            )
        if (
            len(self.special_tokens) != 3
            or len(set(self.special_tokens)) != 3
            or not all(self.special_tokens)
        ):
            raise UserError(f"need three distinct special tokens (bos, eos, pad), got {self.special_tokens}")
        bos, eos, pad = self.special_tokens
        self.tokenizer_cfg = TokenizerConfig(self.vocab_size, self.tokenizer, bos, eos, pad)


class _Progress:
    """A rich progress bar (or nothing): one task per pass."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                DownloadColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()

    def task(self, description: str, total: float):
        return self.bar.add_task(description, total=total) if self.bar else None

    def advance(self, task, amount: float) -> None:
        if self.bar:
            self.bar.advance(task, amount)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def _utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8, a lone surrogate (JSON's "\\ud800" without its pair) counted as the 3
    bytes it takes when written out; such text is cleaned (cleaning replaces it) and must not crash here."""
    return len(text.encode("utf-8", "surrogatepass"))


def _batches_of_documents(
    files, cfg: PrepareConfig, stats: dict, progress: _Progress, task
) -> Iterator[list]:
    """Raw documents in ~1 MB batches; advances the progress bar by each file's size once it is read.
    A text file too big to hold max_chars characters (4 bytes each at most) is not read whole: a plain
    one not at all, a gzipped one up to that size."""
    batch, size, current = [], 0, None
    documents = iter_documents(files, cfg.text_field, cfg.skip_bad_lines, stats, 4 * cfg.clean.max_chars)
    for sf, doc in documents:
        if sf is not current:
            if current is not None:
                progress.advance(task, current.size)
            current = sf
        stats["documents_in"] += 1
        if doc.too_long:
            stats["bytes_in"] += sf.size  # its size on disk: the text was not read whole
            stats["dropped"]["too_long"] += 1
            continue
        if doc.content is None:
            stats["dropped"]["null_text"] += 1
            continue
        n = len(doc.content)
        stats["bytes_in"] += n if isinstance(doc.content, bytes) else _utf8_size(doc.content)
        batch.append(doc.content)
        size += n
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
    if current is not None:
        progress.advance(task, current.size)


def _clean_pass(files, cfg: PrepareConfig, scratch: Path, minhash, stats: dict, progress: _Progress):
    """Pass 1: clean every document into `scratch` (band hashes into `scratch`.bands); returns, per
    document that passed the filters, (offsets, key hashes, split hashes, band rows (K, bands) memmap)."""
    offsets, keys, splits = array("Q", [0]), array("Q"), array("Q")  # 24 bytes per document in memory
    dropped = stats["dropped"]
    task = progress.task("clean", sum(f.size for f in files))
    band_file = scratch.with_suffix(".bands")
    with open(scratch, "wb") as out, open(band_file, "wb") as band_out:
        for results in W.ordered_map(
            W.clean_batch,
            _batches_of_documents(files, cfg, stats, progress, task),
            cfg.workers,
            W.init_clean,
            (cfg.clean, minhash),
        ):
            for r in results:
                if r.text is None:
                    dropped[r.reason] += 1
                    continue
                data = r.text.encode()
                out.write(data)
                offsets.append(offsets[-1] + len(data))
                keys.append(r.key_hash)
                splits.append(r.split_hash)
                band_out.write(r.bands)
    band_rows = None
    if minhash is not None and keys:
        band_rows = np.memmap(band_file, dtype="<u8", mode="r").reshape(len(keys), minhash.num_bands)
    return (
        np.frombuffer(offsets, np.uint64),
        np.frombuffer(keys, np.uint64),
        np.frombuffer(splits, np.uint64),
        band_rows,
    )


def _read_docs(scratch: Path, offsets: np.ndarray, indices: np.ndarray, max_bytes: int = _BATCH_BYTES):
    """Batches (lists of str) of the scratch file's documents `indices`, in order."""
    with open(scratch, "rb") as f:
        batch, size = [], 0
        for i in indices:
            start, end = int(offsets[i]), int(offsets[i + 1])
            f.seek(start)
            batch.append(f.read(end - start).decode())
            size += end - start
            if size >= max_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


def _train_tokenizer(scratch, offsets, kept, cfg: PrepareConfig):
    sizes = offsets[kept + 1] - offsets[kept]
    total = int(sizes.sum())
    stride = max(1, -(-total // cfg.tokenizer_train_bytes))  # every stride-th document when over the cap
    return train_bpe(_read_docs(scratch, offsets, kept[::stride]), cfg.tokenizer_cfg)


def _val_mask(split_hashes: np.ndarray, fraction: float) -> np.ndarray:
    """(N,) bool: a document is in val when its content hash falls in the lowest `fraction` of the range,
    so its split never depends on the other documents (nor on slicing)."""
    return split_hashes < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))


def _dedup(keys: np.ndarray, band_rows, mode: str, dropped: Counter) -> np.ndarray:
    """Indices of the documents to keep: first occurrences by exact key, then (minhash) first of each
    near-duplicate group among those; counts what it drops."""
    keep = np.ones(len(keys), dtype=bool)
    if mode != "none":
        keep = exact_keep(keys)
        dropped["exact_duplicate"] = int((~keep).sum())
    if mode == "minhash" and len(keys):
        idx = np.flatnonzero(keep)
        near = near_dup_keep(band_rows, idx)
        keep[idx[~near]] = False
        dropped["near_duplicate"] = int((~near).sum())
    return np.flatnonzero(keep)


def _tokenize_pass(
    batches, sizes, val, writers, tokenizer, specials: dict, cfg: PrepareConfig, progress
) -> None:
    """Pass 2: encode the kept documents (workers) and append each to its split's shards, in order, each
    ended by the EOS of `specials` (role -> {token, id})."""
    roles = [entry["token"] for entry in specials.values() if entry.get("token") is not None]
    task = progress.task("tokenize", int(sizes.sum()))
    dtype = writers["train"].dtype
    done = 0
    for ids, lens in W.ordered_map(
        W.tokenize_batch,
        batches,
        cfg.workers,
        W.init_tokenize,
        (tokenizer.to_str(), specials["eos"]["id"], roles, dtype.str, cfg.workers == 1),
    ):
        in_val = val[done : done + len(lens)]  # (D,) split of each document of the batch
        token_val = np.repeat(in_val, lens)  # (N,) split of each token
        writers["train"].write(ids[~token_val], int((~in_val).sum()))
        writers["val"].write(ids[token_val], int(in_val.sum()))
        progress.advance(task, int(sizes[done : done + len(lens)].sum()))
        done += len(lens)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by the complete `tmp`; the old dir is removed only after the new one is in place (and
    put back when the new one cannot be: the caller reports `out` as it was)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)  # the new data is in place; a later run removes a rest
    else:
        os.replace(tmp, out)


def resolve_out(out_dir: str) -> Path:
    """The real absolute path to write `out_dir` to: a symlink is followed (the link then points at the new
    data, and the temp dir sits on its target's filesystem); a dangling one is refused, as its target may
    be an unmounted disk; `.` and `..` get a name."""
    given = Path(out_dir)
    if given.is_symlink() and not given.exists():
        raise UserError(f"--out {out_dir} is a symbolic link to a missing path: create its target first")
    return given.resolve()


def _check_not_in_use(out: Path, inputs: list[str]) -> None:
    """Refuse an `out` that is or holds the current folder or one of `inputs` (paths): the swap replaces
    the whole dir, which would delete the inputs or leave the shell in a deleted folder."""
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UserError(
            f"--out {out} is or holds the current folder, which would be replaced as a whole: "
            f"run from another folder or name a dir below this one"
        )
    for item in inputs:
        source = Path(item).resolve()
        if source == out or out in source.parents:
            raise UserError(f"--out {out} is or holds the input {item}: write to another dir")


def check_out_dir(out: Path, inputs: list[str]) -> None:
    """Refuse to replace anything but a missing or empty dir or a seektrain data dir (the swap deletes the
    old dir as a whole, so a folder that merely has a file named manifest.json must stay untouched), and
    an `out` in use (see _check_not_in_use)."""
    _check_not_in_use(out, inputs)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_data_dir(out))):
        raise UserError(f"--out {out} exists and is not a seektrain data dir: refusing to replace it")


def corpus_fingerprint(files: list[SourceFile]) -> str:
    """What tells the slices of one corpus from another's in a merge: its files' names and sizes, in
    order (not their folders, which differ between the machines that prepare the slices)."""
    listing = "\n".join(f"{f.path.name}\t{f.size}" for f in files)
    return hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """A temp dir beside `out` (`.NAME.tmp-PID`) to build it in, swapped into place when the body ends
    normally. Whatever ends it otherwise, the temp dir goes, and so do the folders made to hold `out`
    where they are left empty; an OSError (a full disk, no write permission) is one line that says
    `out` keeps what it held."""
    created = _make_parent(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        _swap_into_place(tmp, out)
        created = []
    except OSError as e:
        raise UserError(_build_failed(e, out)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(created)


def _make_parent(out: Path) -> list[Path]:
    """Create the folder that holds `out` and its temp sibling; UserError when a file stands in its way.
    Returns the folders it created, deepest first, for `_remove_if_empty` where the build then fails."""
    check_dir_target(out, "--out")
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create {e.filename} ({e.strerror})") from e
    return created


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that a failed or interrupted build created and left empty (an
    interrupted first `seektrain train` left ./data behind)."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (another process wrote there), or gone
            folder.rmdir()


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole pipeline into `cfg.out_dir`; returns the report (also saved as prepare_report.json)."""
    t0 = time.perf_counter()
    out = resolve_out(cfg.out_dir)
    recover_interrupted(out, MANIFEST)
    check_out_dir(out, [i for i in cfg.inputs if i != STDLIB])
    every_file = discover(cfg.inputs)
    files = every_file[cfg.slice_index :: cfg.num_slices]
    if not files:
        raise UserError(
            f"slice {cfg.slice_index} of {cfg.num_slices} has no input files (fewer files than slices)"
        )
    # CPU-bound workers beyond the CPUs add nothing but memory (~30 MB each): a large --workers started
    # every one of them at once, and the OOM killer ended prepare without a word
    cpus = host_limits.usable_cpus()
    cfg = replace(cfg, workers=cpus if cfg.workers is None else min(cfg.workers, cpus))
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if tokenizer is not None:
        special_tokens(tokenizer, cfg.tokenizer_cfg)  # fail before the long passes if it has no EOS
    minhash = (
        MinHasher(cfg.minhash_threshold, cfg.minhash_num_perm, cfg.minhash_ngram)
        if cfg.dedup == "minhash"
        else None
    )

    stats = {"documents_in": 0, "bytes_in": 0, "dropped": Counter()}
    seconds: dict[str, float] = {}
    with building(out) as tmp, contextlib.closing(_Progress(cfg.progress)) as progress:
        scratch = tmp / "clean.scratch"
        t = time.perf_counter()
        offsets, keys, split_hashes, band_rows = _clean_pass(files, cfg, scratch, minhash, stats, progress)
        seconds["clean"] = time.perf_counter() - t

        t = time.perf_counter()
        kept = _dedup(keys, band_rows, cfg.dedup, stats["dropped"])
        seconds["dedup"] = time.perf_counter() - t
        if not len(kept):
            dropped = {k: v for k, v in sorted(stats["dropped"].items()) if v}
            reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items()) or "no documents read"
            if skipped := stats.get("bad_jsonl_lines", 0):
                reasons += f"; skipped {skipped} JSONL lines that were not objects with a text field"
            documents = stats["documents_in"]
            raise UserError(f"empty corpus after filtering ({documents} documents in; dropped {reasons})")

        t = time.perf_counter()
        if tokenizer is None:
            tokenizer = _train_tokenizer(scratch, offsets, kept, cfg)
        specials = special_tokens(tokenizer, cfg.tokenizer_cfg)
        seconds["tokenizer"] = time.perf_counter() - t
        vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1  # ids may be sparse
        eos = specials["eos"]["id"]
        dtype = token_dtype(vocab_size)

        t = time.perf_counter()
        val = _val_mask(split_hashes[kept], cfg.val_fraction)  # (K,) over kept documents, in order
        sizes = offsets[kept + 1] - offsets[kept]  # (K,) bytes of each kept document
        writers = {s: ShardWriter(tmp / s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        documents = _read_docs(scratch, offsets, kept)
        _tokenize_pass(documents, sizes, val, writers, tokenizer, specials, cfg, progress)
        splits = {s: w.close() for s, w in writers.items()}
        seconds["tokenize"] = time.perf_counter() - t
        scratch.unlink()
        scratch.with_suffix(".bands").unlink()

        tok_bytes = tokenizer.to_str(pretty=True).encode()
        atomic_write_bytes(tmp / TOKENIZER_FILE, tok_bytes)
        sources = {
            "inputs": list(cfg.inputs),
            "files": len(files),
            "documents_in": stats["documents_in"],
            "bytes_in": stats["bytes_in"],
            "documents_kept": int(len(kept)),
            "bytes_kept": int(sizes.sum()),
            "dropped": dict(sorted(stats["dropped"].items())),
            "bad_jsonl_lines": stats.get("bad_jsonl_lines", 0),
            "slice": [cfg.slice_index, cfg.num_slices],
            "corpus": corpus_fingerprint(every_file),
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.str,
            "vocab_size": vocab_size,
            "special_tokens": specials,
            "eos_id": eos,
            "shard_tokens": cfg.shard_tokens,
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "sha256": hashlib.sha256(tok_bytes).hexdigest(),
                "trained": cfg.tokenizer is None,
            },
            "splits": splits,
            "sources": sources,
            "options": {"dedup": cfg.dedup, "val_fraction": cfg.val_fraction, "clean": asdict(cfg.clean)},
        }
        if minhash is not None:
            manifest["options"]["minhash"] = {
                "threshold": minhash.threshold,
                "num_perm": minhash.num_perm,
                "ngram": minhash.ngram,
                "bands": minhash.num_bands,
            }
        seconds["total"] = time.perf_counter() - t0
        report = {
            "out_dir": str(cfg.out_dir),
            **sources,
            "tokens": {s: v["tokens"] for s, v in splits.items()},
            "documents": {s: v["documents"] for s, v in splits.items()},
            "shards": {s: len(v["shards"]) for s, v in splits.items()},
            "vocab_size": vocab_size,
            "dtype": dtype.name,
            "tokenizer_trained": cfg.tokenizer is None,
            "eos_token": specials["eos"]["token"],
            "workers": cfg.workers,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "mb_per_s": round(stats["bytes_in"] / 1e6 / seconds["total"], 3),
        }
        atomic_write_json(tmp / REPORT, report)
        atomic_write_json(tmp / MANIFEST, manifest)  # last: its presence marks a complete data dir
        return report


def _build_failed(e: OSError, out: Path) -> str:
    """One line for an OSError while a data dir is built beside `out` (reads raise their own UserError)."""
    where = f" ({e.filename})" if e.filename else ""
    return f"cannot build {out}: {e.strerror or e}{where}; it keeps what it held before"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def print_summary(report: dict) -> None:
    """The one-screen summary printed at the end of `seektrain prepare`."""
    mb = 1e6
    dropped = report["dropped"]
    total_dropped = sum(dropped.values())
    if "merged_from" in report:
        head = f"merged {len(report['merged_from'])} slices into {report['out_dir']}"
    else:
        head = (
            f"prepared {report['out_dir']} in {report['seconds']['total']:.1f} s "
            f"({report['mb_per_s']:.1f} MB/s of raw text, {_plural(report['workers'], 'worker')})"
        )
    lines = [
        head,
        f"  input     {report['documents_in']:,} documents, {report['bytes_in'] / mb:.1f} MB from "
        f"{report['files']:,} files ({', '.join(report['inputs'])})",
        f"  dropped   {total_dropped:,}"
        + (": " + ", ".join(f"{k} {v:,}" for k, v in dropped.items() if v) if total_dropped else ""),
        f"  kept      {report['documents_kept']:,} documents, {report['bytes_kept'] / mb:.1f} MB",
    ]
    if report.get("bad_jsonl_lines"):
        skipped = report["bad_jsonl_lines"]
        lines.append(f"  skipped   {skipped:,} JSONL lines that were not JSON objects with a text field")
    lines += [
        "  tokens    "
        + " · ".join(
            f"{s} {report['tokens'][s]:,} ({_plural(report['documents'][s], 'doc')}, "
            f"{_plural(report['shards'][s], 'shard')})"
            for s in ("train", "val")
        ),
        f"  tokenizer vocab {report['vocab_size']:,}, {report['dtype']} ids, "
        + ("trained here" if report["tokenizer_trained"] else "given")
        + (f"; documents end with {eos}" if (eos := report.get("eos_token")) else ""),
    ]
    if "merged_from" not in report:
        lines.append(
            "  time      "
            + " · ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items() if k != "total")
        )
    if not report["documents"]["val"]:
        lines.append("  warning   the val split is empty: raise --val-fraction to evaluate on held-out text")
    if not report["documents"]["train"]:
        lines.append("  warning   the train split is empty: lower --val-fraction (or give more documents)")
    print("\n".join(lines))
