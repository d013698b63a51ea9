"""The optimizer's share of a training step: gradient norm, clip and AdamW update over a preset's full
parameter set, for each way seektrain can run it.

Cases, interleaved over rounds on the same device (medians of per-step times):
- `torch fused + clip pass`: torch's fused AdamW after `clip_grads_with_norm_` (a read and a write of
  every gradient), what the trainer runs with fp32 moments;
- `one pass, fp32 moments` and `one pass, bf16 moments`: `OnePassAdamW` with the clip factor folded into
  its update (compiled on a GPU, as `build_optimizer` builds it there for `optim.state_dtype = "bf16"`).
Each step is timed to its end on the device, so host time (launches, guards) counts. It counts for more
in a training step, where the host would otherwise queue the next forward while the device runs the
update: judge a change by `seektrain bench` too (on an H200 the one-pass fp32 case won here, 1.05×, and
lost the whole step, bench/RESULTS.md).
Gradients are random and far above the clip norm, so every step clips. Only the parameter shapes of the
model are used (built on the meta device); each case owns its weights and moments. After timing, the
fp32 cases' weights are compared: same start, same gradients, same factors, so they differ by rounding.

Run:  python bench/bench_optimizer.py [--preset small] [--steps 5] [--rounds 3] [--[no-]compile-update]
On a GPU it defaults to `small` (1.37 B parameters with its MTP module: ~50 GiB for all cases); on CPU
to `tiny`. Compiling the two one-pass cases takes minutes on a fresh GPU machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer
from seektrain.train.optim import OnePassAdamW
from seektrain.train.step import global_norm

CLIP = 1.0


def parameter_shapes(preset: str) -> list[torch.Size]:
    """The preset's parameter shapes, matrices first (the order of `parameter_groups`' parameters)."""
    with torch.device("meta"):
        shapes = [p.shape for p in Transformer(ModelConfig.from_preset(preset)).parameters()]
    return [s for s in shapes if len(s) >= 2] + [s for s in shapes if len(s) < 2]


def parameter_groups(shapes: list[torch.Size], device: torch.device) -> list[dict]:
    """Fresh weights of these shapes (the same for every call), grouped as `param_groups` groups them."""
    gen = torch.Generator(device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02) for s in shapes]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_case(name: str, device: torch.device, grads: list[torch.Tensor], compiled: bool):
    """(optimizer, parameters, prepare, step) for one case; the step reads the norm, clips and updates."""
    groups = parameter_groups([g.shape for g in grads], device)
    params = [p for g in groups for p in g["params"]]
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    if name == "torch fused + clip pass":
        optimizer = torch.optim.AdamW(groups, **hyper, fused=True)
        own = [g.clone() for g in grads]  # clipped in place: restored before each step, untimed
    else:
        dtype = torch.bfloat16 if "bf16" in name else torch.float32
        optimizer = OnePassAdamW(groups, **hyper, moment_dtype=dtype, compiled=compiled)
        own = None  # never written by the one-pass update: shared by these cases
    for p, g in zip(params, own or grads, strict=True):
        p.grad = g

    def prepare() -> None:
        if own is not None:
            torch._foreach_copy_(own, grads)

    def step() -> None:
        norm = global_norm([p.grad for p in params])
        if own is not None:
            torch.nn.utils.clip_grads_with_norm_(params, CLIP, norm)
        else:
            optimizer.scale_gradients((CLIP / (norm + 1e-6)).clamp(max=1.0))
        optimizer.step()

    return optimizer, params, prepare, step


def timed(prepare, step, device: torch.device) -> float:
    """Milliseconds of one step, its inputs prepared outside the timing."""
    prepare()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small" if on_gpu else "tiny")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--compile-update",
        action=argparse.BooleanOptionalAction,
        default=on_gpu,
        help="compile the one-pass update (default: on a GPU)",
    )
    p.add_argument(
        "--threads", type=int, default=1 if not on_gpu else 0, help="CPU intra-op threads (0: torch's)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if on_gpu else "cpu")
    gen = torch.Generator(device).manual_seed(1)
    grads = [
        torch.randn(s, device=device, generator=gen) for s in parameter_shapes(args.preset)
    ]  # norm ≫ CLIP

    names = ["torch fused + clip pass", "one pass, fp32 moments", "one pass, bf16 moments"]
    cases = {n: make_case(n, device, grads, args.compile_update) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for _, _, prepare, step in cases.values():
        for _ in range(args.warmup):
            timed(prepare, step, device)
    for _ in range(args.rounds):
        for n, (_, _, prepare, step) in cases.items():
            times[n] += [timed(prepare, step, device) for _ in range(args.steps)]

    torch_params, fp32_params = cases[names[0]][1], cases[names[1]][1]
    apart = max((a - b).abs().max().item() for a, b in zip(torch_params, fp32_params, strict=True))
    n_params = sum(q.numel() for q in torch_params)
    base = statistics.median(times[names[0]])
    dev_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(
        json.dumps(
            {
                "device": dev_name,
                "torch": torch.__version__,
                "preset": args.preset,
                "params_M": round(n_params / 1e6, 1),
                "compiled_update": args.compile_update,
                "max_weight_difference_fp32_cases": apart,
            }
        )
    )
    print("case | median ms (min–max) | vs torch fused + clip pass | moment bytes/param")
    for n in names:
        ms = statistics.median(times[n])
        optimizer, params, _, _ = cases[n]
        moment_bytes = 2 * optimizer.state[params[0]]["exp_avg"].element_size()
        print(f"{n} | {ms:.2f} ({min(times[n]):.2f}–{max(times[n]):.2f}) | {base / ms:.2f}× | {moment_bytes}")


if __name__ == "__main__":
    main()
