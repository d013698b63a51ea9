"""Data pipeline benchmark: prepare throughput vs plain HF tokenization, MinHash cost, loader tokens/s.

    .venv/bin/python bench/bench_data.py [--input stdlib] [--workers 2] [--repeat 1] [--json FILE]

(a) prepare (default options: cleaning + exact dedup) against a plain baseline in the same run: read the
    same files, decode, `Tokenizer.encode_batch` with the same tokenizer (tokenizers' own thread pool,
    all cores). prepare is timed with the tokenizer given (the comparable work) and training its own.
(b) MinHash near-dup removal: extra seconds per MB over exact dedup, with 1 and N workers.
(c) TokenLoader: tokens/s of one process drawing shuffled (mb, T) batches.
Times are wall-clock (the fastest of --repeat runs, files in the page cache), with the CPU seconds
of that run (process + worker processes) beside them: on a shared machine the CPU time is the steadier.
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


def _best(fn, repeat):
    """(wall s, CPU s, result) of the run with the least wall time."""
    best, result = (float("inf"), 0.0), None
    for _ in range(repeat):
        t, c = time.perf_counter(), _cpu()
        out = fn()
        wall, cpu = time.perf_counter() - t, _cpu() - c
        if wall < best[0]:
            best, result = (wall, cpu), out
    return best[0], best[1], result


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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

        def run(name, **kw):
            cfg = dict(inputs=inputs, out_dir=f"{tmp}/{name}", workers=args.workers, progress=False)
            cfg.update(kw)
            secs, cpu, report = _best(lambda: prepare(PrepareConfig(**cfg)), args.repeat)
            print(
                f"{name:<22} {secs:7.2f} s  {mb / secs:6.2f} MB/s  cpu {cpu:6.2f} s  {report['seconds']}",
                flush=True,
            )
            return secs, cpu, report

        full, full_cpu, _ = run("prepare_train_tok")
        tok = Path(tmp) / "prepare_train_tok" / "tokenizer.json"
        given, given_cpu, report = run("prepare_given_tok", tokenizer=str(tok))
        base, base_cpu, n_tok = _best(lambda: baseline(files, tok, fast=False), args.repeat)
        base_fast, base_fast_cpu, _ = _best(lambda: baseline(files, tok, fast=True), args.repeat)
        for name, wall, cpu in [
            ("baseline encode_batch", base, base_cpu),
            ("baseline _fast", base_fast, base_fast_cpu),
        ]:
            print(f"{name:<22} {wall:7.2f} s  {mb / wall:6.2f} MB/s  cpu {cpu:6.2f} s  ({n_tok:,} tokens)")
        res["prepare"] = {
            "seconds_given_tokenizer": round(given, 2),
            "seconds_training_tokenizer": round(full, 2),
            "baseline_encode_batch_s": round(base, 2),
            "baseline_encode_batch_fast_s": round(base_fast, 2),
            "ratio_vs_encode_batch": round(given / base, 2),
            "ratio_vs_encode_batch_fast": round(given / base_fast, 2),
            "ratio_with_training_vs_encode_batch": round(full / base, 2),
            "mb_per_s_given_tokenizer": round(mb / given, 2),
            "phases": report["seconds"],
        }

        minhash = {}
        for w in sorted({1, args.workers}):
            exact, _, rep_e = run(f"exact_w{w}", tokenizer=str(tok), workers=w)
            near, _, rep_n = run(f"minhash_w{w}", tokenizer=str(tok), workers=w, dedup="minhash")
            clean_delta = (rep_n["seconds"]["clean"] + rep_n["seconds"]["dedup"]) - (
                rep_e["seconds"]["clean"] + rep_e["seconds"]["dedup"]
            )
            minhash[f"workers_{w}"] = {
                "exact_s": round(exact, 2),
                "minhash_s": round(near, 2),
                "extra_s_per_mb": round((near - exact) / mb, 3),
                "extra_clean_s_per_mb": round(clean_delta / mb, 3),
                "near_duplicates": rep_n["dropped"].get("near_duplicate", 0),
            }
        res["minhash"] = minhash | bench_minhash_cpu(files, mb)

        res["loader_mtokens_per_s"] = bench_loader(Path(tmp) / "prepare_given_tok")
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
