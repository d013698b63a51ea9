"""Data pipeline benchmark: prepare throughput vs plain HF tokenization, MinHash cost, loader tokens/s.

    .venv/bin/python bench/bench_data.py [--input stdlib] [--workers 2] [--repeat 1] [--json FILE]

(a) prepare (default options: cleaning + exact dedup) against a plain baseline in the same run: read the
    same files, decode, `Tokenizer.encode_batch` (and `encode_batch_fast`, which skips offsets) with the
    same tokenizer, on tokenizers' own thread pool (all cores). prepare is timed with that tokenizer
    given (the comparable work) and training its own.
(b) MinHash near-dup removal: extra seconds per MB of the cleaning phase, with 1 and N workers, and
    the CPU seconds per MB it costs one process.
(c) TokenLoader: tokens/s of one process drawing shuffled (mb, T) batches.
Contenders run in turn for --repeat rounds and each keeps its fastest run (files in the page cache);
the CPU seconds of that run (process + worker processes) are reported beside the wall time, as they
are the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    """CPU seconds of this process (all threads) and its finished children (pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(fn):
    """(wall s, CPU s, result) of one call."""
    t, c = time.perf_counter(), _cpu()
    out = fn()
    return time.perf_counter() - t, _cpu() - c, out


def _alternate(contenders: dict, repeat: int) -> dict:
    """Run the contenders in turn, `repeat` rounds, keeping each one's fastest run: interleaving makes
    load from other processes hit all of them alike."""
    best: dict = {}
    for _ in range(repeat):
        for name, fn in contenders.items():
            wall, cpu, out = _measure(fn)
            extra = f"  {out['seconds']}" if isinstance(out, dict) else ""
            print(f"{name:<22} {wall:7.2f} s  cpu {cpu:6.2f} s{extra}", flush=True)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu, out)
    return best


def baseline(files, tokenizer_path, fast: bool) -> int:
    """Read + decode + encode_batch every file: the least any tokenizing pipeline must do."""
    from tokenizers import Tokenizer

    from seektrain.data.sources import read_text_file

    tok = Tokenizer.from_file(str(tokenizer_path))
    texts = [read_text_file(f.path).decode("utf-8", errors="replace") for f in files]
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    return sum(len(e.ids) for e in encode(texts, add_special_tokens=False))


def bench_minhash_cpu(files, mb: float) -> dict:
    """CPU seconds per MB of cleaning one process spends without and with MinHash signatures + bands."""
    from seektrain.data.clean import CleanConfig, clean_document
    from seektrain.data.dedup import MinHasher
    from seektrain.data.sources import read_text_file

    raws = [read_text_file(f.path) for f in files]
    out = {}
    for name, mh in [("clean_cpu_s_per_mb", None), ("clean_with_minhash_cpu_s_per_mb", MinHasher())]:
        t = time.process_time()
        for r in raws:
            clean_document(r, CleanConfig(), mh)
        out[name] = round((time.process_time() - t) / mb, 3)
    out["minhash_cpu_s_per_mb"] = round(out["clean_with_minhash_cpu_s_per_mb"] - out["clean_cpu_s_per_mb"], 3)
    print(f"single process cleaning: {out}")
    return out


def bench_loader(data_dir: Path) -> dict:
    """Tokens/s of one process drawing shuffled batches (after one warm-up batch), for a few shapes."""
    from seektrain.data.loader import TokenLoader

    rates = {}
    for seq_len, mbs in [(1024, 8), (2048, 4), (256, 32)]:
        ld = TokenLoader(data_dir, seq_len=seq_len, micro_batch_size=mbs, seed=0)
        next(ld)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 2.0:
            x, _ = next(ld)
            n += x.numel()
        rate = n / (time.perf_counter() - t)
        rates[f"T{seq_len}_mb{mbs}"] = round(rate / 1e6, 1)
        print(f"loader T={seq_len} mb={mbs}: {rate / 1e6:.1f} M tokens/s")
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--loader-only", metavar="DATA_DIR", help="only the loader benchmark, on this data dir")
    args = p.parse_args()
    inputs = args.input or ["stdlib"]
    if args.loader_only:
        print(json.dumps({"loader_mtokens_per_s": bench_loader(Path(args.loader_only))}))
        return

    from seektrain.data.prepare import PrepareConfig, prepare
    from seektrain.data.sources import discover, read_text_file

    files = discover(inputs)
    mb = sum(len(read_text_file(f.path)) for f in files) / 1e6  # also warms the page cache
    res: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "inputs": inputs,
        "mb": round(mb, 2),
        "workers": args.workers,
    }
    with tempfile.TemporaryDirectory() as tmp:

        def prep(name, **kw):
            cfg = dict(inputs=inputs, out_dir=f"{tmp}/{name}", workers=args.workers, progress=False)
            return lambda: prepare(PrepareConfig(**(cfg | kw)))

        prep("prepare_train_tok")()  # the tokenizer every other run uses (and a warm-up)
        tok = Path(tmp) / "prepare_train_tok" / "tokenizer.json"
        best = _alternate(
            {
                "prepare_given_tok": prep("prepare_given_tok", tokenizer=str(tok)),
                "baseline encode_batch": lambda: baseline(files, tok, fast=False),
                "baseline _fast": lambda: baseline(files, tok, fast=True),
                "prepare_train_tok": prep("prepare_train_tok"),
            },
            args.repeat,
        )
        (given, given_cpu, report), (full, full_cpu, _) = best["prepare_given_tok"], best["prepare_train_tok"]
        (base, base_cpu, _), (fast, fast_cpu, _) = best["baseline encode_batch"], best["baseline _fast"]
        res["prepare"] = {
            "wall_s": {
                "prepare_given_tokenizer": round(given, 2),
                "prepare_training_tokenizer": round(full, 2),
                "baseline_encode_batch": round(base, 2),
                "baseline_encode_batch_fast": round(fast, 2),
            },
            "cpu_s": {
                "prepare_given_tokenizer": round(given_cpu, 1),
                "prepare_training_tokenizer": round(full_cpu, 1),
                "baseline_encode_batch": round(base_cpu, 1),
                "baseline_encode_batch_fast": round(fast_cpu, 1),
            },
            "wall_ratio_given_vs_encode_batch": round(given / base, 2),
            "wall_ratio_given_vs_encode_batch_fast": round(given / fast, 2),
            "wall_ratio_training_vs_encode_batch": round(full / base, 2),
            "cpu_ratio_given_vs_encode_batch": round(given_cpu / base_cpu, 2),
            "cpu_ratio_given_vs_encode_batch_fast": round(given_cpu / fast_cpu, 2),
            "mb_per_s_given_tokenizer": round(mb / given, 2),
            "phases_given_tokenizer": report["seconds"],
        }

        contenders = {}
        for w in sorted({1, args.workers}):
            contenders[f"exact_w{w}"] = prep(f"exact_w{w}", tokenizer=str(tok), workers=w)
            contenders[f"minhash_w{w}"] = prep(
                f"minhash_w{w}", tokenizer=str(tok), workers=w, dedup="minhash"
            )
        best = _alternate(contenders, args.repeat)
        minhash = {}
        for w in sorted({1, args.workers}):
            exact, near = best[f"exact_w{w}"][2], best[f"minhash_w{w}"][2]
            minhash[f"workers_{w}"] = {
                "clean_phase_s_exact": exact["seconds"]["clean"],
                "clean_phase_s_minhash": near["seconds"]["clean"],
                "minhash_extra_s_per_mb": round(
                    (near["seconds"]["clean"] - exact["seconds"]["clean"]) / mb, 3
                ),
                "near_duplicates": near["dropped"].get("near_duplicate", 0),
            }
        res["minhash"] = minhash | bench_minhash_cpu(files, mb)
        res["loader_mtokens_per_s"] = bench_loader(Path(tmp) / "prepare_given_tok")
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
