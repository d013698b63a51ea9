"""seektrain's training step against transformers' DeepseekV3ForCausalLM with the same dimensions.

Same process, same batch, same precision, AdamW for both; the cases are interleaved over several rounds
and the median step time of each is reported with its spread, so background load hits both alike. MTP is
off in both (transformers does not train it), so the work is the same function; `--mtp` adds a seektrain
case with its MTP modules on.

Run:  python bench/bench_step.py [--preset tiny] [--batch 4] [--seq 256] [--steps 5] [--rounds 3]
        [--warmup 10] [--precision fp32] [--threads N] [--mtp] [--no-optimizer] [--compile] [--profile]
On a GPU it defaults to the `small` preset, B=8, T=2048, bf16. `--compile` adds compiled cases beside the
eager ones: seektrain as `train.compile` compiles it (each block and the loss head), transformers' model
compiled whole, as the peer script does. `--profile` prints a torch.profiler table of one step of each
case after the timing.
On CPU it runs one intra-op thread unless `--threads` says otherwise: on the shared 2-core box two OpenMP
threads stall at every op's barrier whenever another process holds a core (steps ~3x slower, spreads >100%).
With one thread the ratio is also given by thread CPU time, which other processes barely disturb.
On CPU the process keeps freed memory for reuse, as seektrain's trainer does (`train/host_memory.py`); the
setting is process-wide, so it speeds up every case; `--default-malloc` leaves glibc's default.
Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from seektrain.bench import profile_table
from seektrain.distributed.parallelize import apply_compile
from seektrain.model.config import ModelConfig
from seektrain.model.hf import hf_config
from seektrain.model.transformer import Transformer
from seektrain.train.host_memory import keep_freed_host_memory
from seektrain.train.metrics import flops_per_token, peak_flops


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, hf: bool):
    """One training step: forward with loss, backward, then (unless --no-optimizer) clipping and AdamW
    (torch's fused kernel on CUDA and CPU: what seektrain's trainer and transformers' Trainer both use)."""
    device = x.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y).loss
        loss.backward()
        if args.no_optimizer:
            model.zero_grad(set_to_none=True)
            return
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build_cases(
    args: argparse.Namespace, cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Callable]:
    """seektrain (with MTP too if asked) and transformers with grouped_mm / eager experts, each warmed up;
    with --compile also seektrain as `train.compile` runs it and transformers compiled whole (as the peer
    script does), beside the eager cases."""
    device = x.device
    models: dict[str, tuple[torch.nn.Module, bool]] = {}
    variants = [("", False)] + ([("_compiled", True)] if args.compile else [])
    for suffix, compiled in variants:
        for name, mtp in [("seektrain", 0)] + ([("seektrain_mtp", 1)] if args.mtp else []):
            torch.manual_seed(0)
            with torch.device(device):
                model = Transformer(dataclasses.replace(cfg, num_mtp_layers=mtp))
            if compiled:
                apply_compile(model)
            models[name + suffix] = (model, False)
        for impl in ("grouped_mm", "eager") if not compiled else ("grouped_mm",):
            hf_cfg = DeepseekV3Config(**hf_config(cfg, torch.float32))
            hf_cfg._attn_implementation = "sdpa"
            hf_cfg._experts_implementation = impl
            torch.manual_seed(0)
            with torch.device(device):
                model = DeepseekV3ForCausalLM(hf_cfg)
            models[f"hf_{impl}{suffix}"] = (torch.compile(model) if compiled else model, True)

    cases = {}
    for name, (model, hf) in models.items():
        step = make_step(model, x, y, args, hf)
        try:
            for _ in range(args.warmup):  # optimizer state, compilation, recompiles, the allocator's heap
                step()
        except Exception as e:  # a peer variant this build cannot run is reported, not fatal
            print(json.dumps({"case": name, "error": repr(e)[:200]}))
            continue
        cases[name] = step
    return cases


def time_steps(step: Callable, steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds per step: wall clock, and CPU time of this thread (where all CPU work runs with one
    intra-op thread; unlike wall time it excludes the time other processes hold the core)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, (time.thread_time() - cpu_start) / steps


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small" if gpu else "tiny")
    p.add_argument("--batch", type=int, default=8 if gpu else 4)
    p.add_argument("--seq", type=int, default=2048 if gpu else 256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--warmup",
        type=int,
        default=3 if gpu else 10,
        help="untimed steps per case first (default 3 on GPU; 10 on CPU, where the heap and oneDNN's "
        "kernel cache take several steps to settle)",
    )
    p.add_argument("--precision", default="bf16" if gpu else "fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--threads",
        type=int,
        default=0 if gpu else 1,
        help="torch.set_num_threads for every case; 0 keeps torch's default (default: 1 on CPU, see above)",
    )
    p.add_argument("--mtp", action="store_true", help="also time seektrain with one MTP module")
    p.add_argument("--no-optimizer", action="store_true", help="time forward+backward only")
    p.add_argument("--compile", action="store_true", help="also time compiled seektrain and transformers")
    p.add_argument("--profile", action="store_true", help="profile one step of each case after timing")
    p.add_argument(
        "--default-malloc", action="store_true", help="on CPU, do not keep freed memory (see above)"
    )
    args = p.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = not gpu and not args.default_malloc and keep_freed_host_memory()

    cfg = dataclasses.replace(
        ModelConfig.from_preset(args.preset), num_mtp_layers=0, max_position_embeddings=max(args.seq, 4096)
    )
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    # transformers shifts labels itself, so it gets x as labels: B*(T-1) vs B*T targets (≈ the same work).
    cases = build_cases(args, cfg, x, y)

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, step in cases.items():
            times[name].append(time_steps(step, args.steps, device))

    fpt = flops_per_token(cfg, args.seq)
    peak = peak_flops(device)
    rows = []
    for name, measured in times.items():
        ts, cpu = [wall for wall, _ in measured], [c for _, c in measured]
        dt = statistics.median(ts)
        tps = args.batch * args.seq / dt
        rows.append(
            dict(
                case=name,
                step_ms=round(dt * 1e3, 1),
                tokens_per_s=round(tps),
                tflops=round(tps * fpt / 1e12, 3),
                mfu=round(tps * fpt / peak, 4) if peak else None,
                spread=round((max(ts) - min(ts)) / dt, 3),
                cpu_ms=round(statistics.median(cpu) * 1e3, 1),
            )
        )
    header = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        device=torch.cuda.get_device_name() if gpu else "cpu",
        threads=torch.get_num_threads(),
        preset=args.preset,
        batch=args.batch,
        seq=args.seq,
        precision=args.precision,
        optimizer=not args.no_optimizer,
        warmup=args.warmup,
        compile=args.compile,
        keep_freed_memory=kept,
    )
    print(json.dumps(header))
    for r in rows:
        print(json.dumps(r))
    print("case | step ms | tokens/s | TFLOP/s | MFU | spread | thread CPU ms")
    for r in rows:
        print(" | ".join(str(value) for value in r.values()))
    ours = [r for r in rows if r["case"] in ("seektrain", "seektrain_compiled")]
    peers = [r for r in rows if r["case"].startswith("hf_")]
    if ours and peers:
        mine, best = (max(group, key=lambda r: r["tokens_per_s"]) for group in (ours, peers))
        ratio = mine["tokens_per_s"] / best["tokens_per_s"]
        print(f"best seektrain ({mine['case']}) / best peer ({best['case']}): {ratio:.2f}x")
        if not gpu and args.threads == 1:
            mine, best = (min(group, key=lambda r: r["cpu_ms"]) for group in (ours, peers))
            ratio = best["cpu_ms"] / mine["cpu_ms"]
            print(f"by thread CPU time ({mine['case']} / {best['case']}): {ratio:.2f}x")
    if args.profile:
        for name, step in cases.items():
            print(f"== profile: {name}")
            print(profile_table(step, device, rows=25))


if __name__ == "__main__":
    main()
