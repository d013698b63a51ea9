"""Correctness checks on the accelerator before timing anything (run by bench/gpu_check.sh).

1. bf16 autocast vs fp32: the `small` dimensions (4 layers, to keep it quick) on one random batch; the
   bf16 loss must be within 1% of the fp32 loss. Why 1%: bf16 keeps 8 bits of mantissa (rel. 2^-9 per
   rounding), the loss is computed in fp32 from bf16 logits, and at initialization the loss (~ln V)
   averages thousands of tokens, so rounding errors largely cancel; a broken kernel shifts it by far more.
2. grouped GEMM vs one matmul per expert in bf16: relative error ‖a−b‖/‖b‖ ≤ 1e-2 in the output and in
   both gradients (bf16 operands land between 1e-3 and 1e-2 of each other).
Prints one JSON line per check and exits 1 if any fails.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from seektrain.model.config import ModelConfig
from seektrain.model.moe import grouped_mm
from seektrain.model.transformer import Transformer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_bf16_loss(device: torch.device, preset: str, seq: int) -> dict:
    cfg = ModelConfig.from_preset(preset)
    cfg = dataclasses.replace(cfg, num_hidden_layers=4, max_position_embeddings=seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, seq + 1), device=device)
    with torch.no_grad():
        fp32 = model(x[:, :-1], x[:, 1:]).loss.item()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = model(x[:, :-1], x[:, 1:]).loss.item()
    err = abs(bf16 - fp32) / fp32
    return dict(check="bf16_vs_fp32_loss", fp32=round(fp32, 5), bf16=round(bf16, 5), rel_err=err,
                ok=err <= 1e-2)


def check_grouped_mm(device: torch.device) -> dict:
    torch.manual_seed(1)
    E, K, N, S = 64, 1024, 512, 8192
    counts = torch.distributions.Multinomial(S, torch.ones(E)).sample().long().to(device)  # uneven loads
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(S, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(E, K, N, device=device) / K**0.5).to(torch.bfloat16).requires_grad_()
    g = torch.randn(S, N, device=device, dtype=torch.bfloat16)
    y = grouped_mm(x, w, offsets, counts)
    (y.float() * g).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    pieces = x.split(counts.tolist())
    y_ref = torch.cat([p @ w[e] for e, p in enumerate(pieces)])
    (y_ref.float() * g).sum().backward()
    errs = dict(out=rel(y, y_ref), grad_x=rel(gx, x.grad), grad_w=rel(gw, w.grad))
    return dict(check="grouped_mm_vs_per_expert_bf16", **errs, ok=max(errs.values()) <= 1e-2)


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset, seq = ("small", 2048) if device.type == "cuda" else ("tiny", 128)
    results = [check_bf16_loss(device, preset, seq), check_grouped_mm(device)]
    for r in results:
        print(json.dumps(r), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
