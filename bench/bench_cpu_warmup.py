"""The first steps of CPU training: step times, page faults and resident memory, step by step from a fresh
process, with the MoE's expert groups padded (`model/moe.py`, CPU_GROUP_ROWS) and unpadded.

In bf16 oneDNN builds a GEMM kernel for every new shape; unpadded, each expert's row count is new at
almost every step, so the first tens of steps are slow, fault pages in and grow the heap. Each case runs
in its own process (oneDNN's kernel cache and the heap are process-wide); the cases alternate over
`--rounds`. `tiny`, B=4, T=256, MTP off, AdamW, one thread, freed memory kept as the trainer keeps it.

Run:  python bench/bench_cpu_warmup.py [--steps 40] [--rounds 2] [--precision bf16] [--compile]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_case(group_rows: int, steps: int, precision: str, compile: bool) -> dict:
    """One fresh-process run (called in the child)."""
    import dataclasses

    import torch
    from bench_step import make_step  # the same training step as the peer comparison

    import seektrain.model.moe as moe
    from seektrain.distributed.parallelize import apply_compile
    from seektrain.model.config import ModelConfig
    from seektrain.model.transformer import Transformer
    from seektrain.train.host_memory import keep_freed_host_memory

    torch.set_num_threads(1)
    keep_freed_host_memory()
    moe.CPU_GROUP_ROWS = group_rows  # 1: every group as long as its count, i.e. unpadded
    cfg = dataclasses.replace(ModelConfig.from_preset("tiny"), num_mtp_layers=0)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 257))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    model = Transformer(cfg)
    if compile:
        apply_compile(model)
    step = make_step(model, x, y, argparse.Namespace(precision=precision, no_optimizer=False), hf=False)
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    first = 2 if compile else 0  # the compiled case's first two steps compile: left out of every figure
    times, faults = times[first:], faults[first:]
    return dict(
        group_rows=group_rows,
        total_s=round(sum(times) / 1e3, 2),
        median_ms_per_10=[round(statistics.median(times[a : a + 10])) for a in range(0, len(times), 10)],
        faults=sum(faults),
        resident_mib=resident >> 20,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # group rows, in the child process
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(run_case(args.child, args.steps, args.precision, args.compile)))
        return
    import seektrain.model.moe as moe

    rows: list[dict] = []
    for _ in range(args.rounds):
        for group_rows in (1, moe.CPU_GROUP_ROWS):
            cmd = [sys.executable, __file__, "--child", str(group_rows), "--steps", str(args.steps)]
            cmd += ["--precision", args.precision] + (["--compile"] if args.compile else [])
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            rows.append(json.loads(line))
            print(line, flush=True)
    timed = args.steps - (2 if args.compile else 0)
    print(f"group rows | total s ({timed} steps) | median ms per 10 steps | page faults | resident MiB")
    for r in rows:
        print(" | ".join(str(v) for v in r.values()))


if __name__ == "__main__":
    main()
