"""Merge data dirs prepared as slices (`--num-slices/--slice-index`) into one data dir.

The slices must share the tokenizer (same tokenizer.json bytes), dtype and options (dedup, val fraction,
cleaning), which the merged manifest records once. Shard files are hard-linked
when possible (same filesystem), else copied; the merged manifest lists them slice by slice with their
original checksums, so the global token stream is slice 0's, then slice 1's, and so on.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from seektrain.data.prepare import REPORT, building, check_out_dir, resolve_out
from seektrain.data.shards import MANIFEST, atomic_write_json, load_manifest, verify_shards
from seektrain.errors import UserError
from seektrain.paths import recover_interrupted


def slices_held(manifest: dict) -> list[list]:
    """[corpus, index, K] of each slice a data dir holds: its own (`sources.slice`, of the corpus whose
    fingerprint `sources.corpus` is), or those a merge recorded; none for a merge that predates them."""
    sources = manifest.get("sources", {})
    if "slices" in sources:
        return sources["slices"]
    if "slice" not in sources:
        return []
    # prepared before the fingerprint (2026-11-27): its inputs as typed stand for the corpus
    corpus = sources.get("corpus") or "inputs: " + json.dumps(sources.get("inputs", []))
    return [[corpus, *sources["slice"]]]


def _check_slices(slice_dirs: list[str], manifests: list[dict]) -> None:
    """Slices of one corpus (the same fingerprint of its files) must come from one split, each index once:
    slices of another K overlap them (a whole prepare is slice 0 of 1), and the same index prepared twice
    holds the same documents. A merged dir counts with the slices it holds; other corpora merge freely."""
    splits: dict[str, tuple[int, str]] = {}  # corpus -> (K, first dir)
    indices: dict[tuple[str, int], str] = {}  # (corpus, index) -> dir
    for d, m in zip(slice_dirs, manifests, strict=True):
        for corpus, index, count in slices_held(m):
            first_count, first = splits.setdefault(corpus, (count, d))
            if count != first_count:
                raise UserError(
                    f"{d} holds slice {index} of {count}, {first} one of {first_count} of the same corpus: "
                    "its slices share --num-slices (slices of two splits overlap, and their documents "
                    "would count twice)"
                )
            if (corpus, index) in indices:
                raise UserError(
                    f"--merge names slice {index} of {count} of one corpus twice ({indices[corpus, index]} "
                    f"and {d}): its documents would count twice"
                )
            indices[corpus, index] = d


def _check_distinct(slice_dirs: list[str], manifests: list[dict]) -> None:
    """Refuse a slice named twice, by any path that leads to it, as a copy, or inside a merged dir beside
    it (a merge keeps its slices' shard checksums): its documents would count twice."""
    paths: dict[Path, str] = {}
    seen: list[tuple[str, set[str]]] = []  # each dir's shard checksums
    for d, m in zip(slice_dirs, manifests, strict=True):
        real = Path(d).resolve()
        if real in paths:
            raise UserError(f"--merge names the same slice twice ({paths[real]} and {d})")
        paths[real] = d
        mine = {s["sha256"] for split in m["splits"].values() for s in split["shards"]}
        for other, theirs in seen:
            if mine & theirs:
                what = "two copies of one slice" if mine == theirs else "dirs that share shards"
                raise UserError(f"--merge names {what} ({other} and {d})")
        seen.append((d, mine))


def _option_differences(first: dict, other: dict, prefix: str = "") -> list[str]:
    """`key: first's value vs other's` for each prepare option (nested ones as clean.min_chars) that
    differs between two manifests' `options`."""
    out = []
    for key in sorted(set(first) | set(other), key=str):
        a, b = first.get(key), other.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _option_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} vs {b!r}")
    return out


def _token_names(manifest: dict) -> dict:
    """role (bos, eos, pad) -> the special token a manifest names for it (its eos ends every document)."""
    return {role: entry.get("token") for role, entry in manifest.get("special_tokens", {}).items()}


def merge(slice_dirs: list[str], out_dir: str) -> dict:
    """Join the slices' shards and statistics into `out_dir` (atomically); returns the merged report."""
    if empty := [d for d in [*slice_dirs, out_dir] if not str(d).strip()]:
        raise UserError(f"--merge and --out take paths: {len(empty)} given empty (an unset shell variable?)")
    manifests = [load_manifest(d) for d in slice_dirs]
    first = manifests[0]
    _check_distinct(slice_dirs, manifests)
    _check_slices(slice_dirs, manifests)
    for d, m in zip(slice_dirs, manifests, strict=True):
        for split in m["splits"]:  # every shard there, at its size (checksums are kept, read by the loader)
            verify_shards(d, m, split, checksums=False)
        if m["tokenizer"]["sha256"] != first["tokenizer"]["sha256"] or m["dtype"] != first["dtype"]:
            raise UserError(
                f"{d} was prepared with another tokenizer than {slice_dirs[0]}: slices must share "
                f"one (--tokenizer FILE)"
            )
        if roles := _option_differences(_token_names(first), _token_names(m)):
            raise UserError(
                f"{d} has other special tokens than {slice_dirs[0]} ({'; '.join(roles)}): slices must "
                "share --special-tokens, or the merged data dir would name the first one's for all"
            )
        if m["shard_tokens"] != first["shard_tokens"]:
            raise UserError(
                f"{d} was prepared with --shard-tokens {m['shard_tokens']}, {slice_dirs[0]} with "
                f"{first['shard_tokens']}: slices must share it, as the merged manifest states one"
            )
        if differences := _option_differences(first.get("options", {}), m.get("options", {})):
            raise UserError(
                f"{d} was prepared with other options than {slice_dirs[0]} ({'; '.join(differences)}): "
                "slices must share them, or the merged data dir would describe only the first"
            )
    out = resolve_out(out_dir)
    recover_interrupted(out, MANIFEST)  # what a killed prepare or merge left beside `out`
    check_out_dir(out, slice_dirs)
    with building(out) as tmp:
        shutil.copyfile(Path(slice_dirs[0]) / first["tokenizer"]["file"], tmp / first["tokenizer"]["file"])
        splits = {}
        for split in first["splits"]:
            (tmp / split).mkdir()
            shards = []
            for i, (d, m) in enumerate(zip(slice_dirs, manifests, strict=True)):
                for s in m["splits"][split]["shards"]:
                    name = f"{split}/{i:03d}-{Path(s['file']).name}"
                    try:
                        os.link(Path(d) / s["file"], tmp / name)
                    except OSError:
                        shutil.copyfile(Path(d) / s["file"], tmp / name)
                    shards.append({**s, "file": name})
            splits[split] = {
                "tokens": sum(s["tokens"] for s in shards),
                "documents": sum(m["splits"][split]["documents"] for m in manifests),
                "shards": shards,
            }
        dropped = Counter()
        for m in manifests:
            dropped.update(m["sources"]["dropped"])
        sources = {
            key: sum(m["sources"][key] for m in manifests)
            for key in (
                "files",
                "documents_in",
                "bytes_in",
                "documents_kept",
                "bytes_kept",
                "bad_jsonl_lines",
            )
        }
        sources.update(
            inputs=[str(d) for d in slice_dirs],
            dropped=dict(sorted(dropped.items())),
            slices=[held for m in manifests for held in slices_held(m)],
        )
        manifest = {**first, "splits": splits, "sources": sources}
        report = {
            "out_dir": str(out_dir),
            **sources,
            "tokens": {s: v["tokens"] for s, v in splits.items()},
            "documents": {s: v["documents"] for s, v in splits.items()},
            "shards": {s: len(v["shards"]) for s, v in splits.items()},
            "vocab_size": first["vocab_size"],
            "dtype": np.dtype(first["dtype"]).name,  # as prepare's report says it: uint16, not <u2
            "tokenizer_trained": False,
            "eos_token": first.get("special_tokens", {}).get("eos", {}).get("token"),
            "workers": 1,
            "seconds": {"total": 0.0},
            "mb_per_s": 0.0,
            "merged_from": sources["inputs"],
        }
        atomic_write_json(tmp / REPORT, report)
        atomic_write_json(tmp / MANIFEST, manifest)
        return report
