"""Activation checkpointing's trade-off: memory held for the backward pass vs step time, per mode.

For each mode (none, full, selective) a fresh process builds the preset, runs a warm-up step, then measures
(a) the memory the forward pass leaves allocated for the backward (GPU: `memory_allocated` after forward
minus before; CPU: resident-set growth over the forward, in its own process so that no earlier mode's freed
pages are reused) and (b) the median forward + backward time over `--steps`. Modes are run round by round
(`--rounds`), so background load hits them alike. The logits and loss buffers outside the blocks are held
in every mode; the differences between modes are the blocks' activations.

Run:  python bench/bench_checkpointing.py [--preset tiny] [--batch 16] [--seq 256] [--steps 3] [--rounds 2]
On a GPU it defaults to `small`, B=8, T=2048, bf16, blocks compiled. On CPU one intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

MODES = ("none", "full", "selective")


def measure(mode: str, args: argparse.Namespace) -> dict:
    """In a fresh process: activation memory (MiB) and median forward + backward ms of one mode."""
    import os

    import torch

    from seektrain.bench import BenchConfig, bench_model_config
    from seektrain.distributed.parallelize import apply_activation_checkpointing, apply_compile
    from seektrain.model.transformer import Transformer

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(1)
    cfg = bench_model_config(BenchConfig(preset=args.preset, batch=args.batch, seq=args.seq))
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    if mode != "none":
        apply_activation_checkpointing(model, mode)
    if gpu:
        apply_compile(model)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def allocated_mib() -> float:
        if gpu:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / 2**20
        return int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = model(x, y).loss
        loss.backward()
        model.zero_grad(set_to_none=False)

    step()
    before = allocated_mib()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
        loss = model(x, y).loss
    held = allocated_mib() - before
    loss.backward()
    model.zero_grad(set_to_none=False)
    times = []
    for _ in range(args.steps):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return dict(mode=mode, activation_mib=round(held, 1), fwd_bwd_ms=round(statistics.median(times) * 1e3, 1))


def main() -> None:
    import torch

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small" if gpu else "tiny")
    p.add_argument("--batch", type=int, default=8 if gpu else 16)
    p.add_argument("--seq", type=int, default=2048 if gpu else 256)
    p.add_argument("--steps", type=int, default=5 if gpu else 3)
    p.add_argument("--rounds", type=int, default=1 if gpu else 2)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            with ctx.Pool(1) as pool:
                r = pool.apply(measure, (mode, args))
            print(json.dumps(r), flush=True)
            results[mode].append(r)
    print("mode | activation MiB (median) | fwd+bwd ms (median) | vs none")
    base = statistics.median(r["fwd_bwd_ms"] for r in results["none"])
    for mode, rs in results.items():
        ms = statistics.median(r["fwd_bwd_ms"] for r in rs)
        mib = statistics.median(r["activation_mib"] for r in rs)
        print(f"{mode} | {mib:.1f} | {ms:.1f} | {ms / base:.2f}x")


if __name__ == "__main__":
    main()
