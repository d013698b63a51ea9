"""seektrain's training step against transformers' DeepseekV3ForCausalLM with the same dimensions.

Same process, same batch, same precision, AdamW for both; the cases are interleaved over several rounds
and the median step time of each is reported, so background load hits both alike. MTP is off in both
(transformers does not train it), so the work is the same function.

Run:  python bench/bench_step.py [--preset tiny] [--batch 4] [--seq 256] [--steps 5] [--rounds 3] [--precision fp32]
On a GPU it defaults to the `small` preset, B=8, T=2048, bf16. Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from seektrain.model.config import ModelConfig
from seektrain.model.hf import hf_config
from seektrain.model.transformer import Transformer
from seektrain.train.metrics import flops_per_token, peak_flops


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, hf: bool):
    device = x.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_steps(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small" if gpu else "tiny")
    p.add_argument("--batch", type=int, default=8 if gpu else 4)
    p.add_argument("--seq", type=int, default=2048 if gpu else 256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="bf16" if gpu else "fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    device = torch.device("cuda" if gpu else "cpu")

    cfg = dataclasses.replace(ModelConfig.from_preset(args.preset), num_mtp_layers=0,
                              max_position_embeddings=max(args.seq, 4096))
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    # transformers shifts labels itself, so it gets x as labels; both see B*(T-1) or B*T targets (≈ same work).

    cases = {}
    with torch.device(device):
        ours = Transformer(cfg)
    cases["seektrain"] = make_step(ours, x, y, args.precision, hf=False)
    for impl in ("grouped_mm", "eager"):
        hf_cfg = DeepseekV3Config(**hf_config(cfg, torch.float32))
        hf_cfg._attn_implementation = "sdpa"
        hf_cfg._experts_implementation = impl
        with torch.device(device):
            peer = DeepseekV3ForCausalLM(hf_cfg)
        step = make_step(peer, x, y, args.precision, hf=True)
        try:
            step()
        except Exception as e:  # a peer variant this build cannot run is reported, not fatal
            print(json.dumps({"case": f"hf_{impl}", "error": repr(e)[:200]}))
            continue
        cases[f"hf_{impl}"] = step

    for step in cases.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, step in cases.items():
            times[name].append(time_steps(step, args.steps, device))

    fpt = flops_per_token(cfg, args.seq)
    peak = peak_flops(device)
    rows = []
    for name, ts in times.items():
        dt = statistics.median(ts)
        tps = args.batch * args.seq / dt
        rows.append(dict(case=name, step_ms=round(dt * 1e3, 1), tokens_per_s=round(tps),
                         tflops=round(tps * fpt / 1e12, 3), mfu=round(tps * fpt / peak, 4) if peak else None,
                         spread=round((max(ts) - min(ts)) / dt, 3)))
    best_peer = max((r for r in rows if r["case"] != "seektrain"), key=lambda r: r["tokens_per_s"])
    ours_tps = rows[0]["tokens_per_s"]
    header = dict(torch=torch.__version__, transformers=transformers.__version__,
                  device=torch.cuda.get_device_name() if gpu else "cpu", threads=torch.get_num_threads(),
                  preset=args.preset, batch=args.batch, seq=args.seq, precision=args.precision)
    print(json.dumps(header))
    for r in rows:
        print(json.dumps(r))
    print("case | step ms | tokens/s | TFLOP/s | MFU | spread")
    for r in rows:
        print(f"{r['case']} | {r['step_ms']} | {r['tokens_per_s']} | {r['tflops']} | {r['mfu']} | {r['spread']}")
    print(f"seektrain / best peer ({best_peer['case']}): {ours_tps / best_peer['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
