"""Correctness checks on the accelerator before timing anything (run by bench/gpu_check.sh).

1. bf16 autocast vs fp32: the `small` dimensions (4 layers, to keep it quick) on one random batch; the
   bf16 loss must be within 1% of the fp32 loss. Why 1%: bf16 keeps 8 bits of mantissa (rel. 2^-9 per
   rounding), the loss is computed in fp32 from bf16 logits, and at initialization the loss (~ln V)
   averages thousands of tokens, so rounding errors largely cancel; a broken kernel shifts it by far more.
2. grouped GEMM vs one matmul per expert in bf16: relative error ‖a−b‖/‖b‖ ≤ 1e-2 in the output and in
   both gradients (bf16 operands land between 1e-3 and 1e-2 of each other).
3. MLA attention backends (a measurement for the next speed step, never failing): SDPA forward + backward at
   `small`'s shapes (H=16, d_qk=96, d_v=64, causal) with v zero-padded to 96 for the flash kernel (what the
   model does) against cuDNN and memory-efficient attention on the unpadded v; outputs compared.
Prints one JSON line per check and exits 1 if any fails.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F

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


def attention_step(q, k, v, g, backend, pad: bool) -> torch.Tensor:
    """Causal SDPA forward + backward on one backend; v zero-padded to q's head dim when `pad`."""
    from torch.nn.attention import sdpa_kernel

    dv = v.shape[-1]
    vv = F.pad(v, (0, q.shape[-1] - dv)) if pad else v
    with sdpa_kernel([backend]):
        y = F.scaled_dot_product_attention(q, k, vv, is_causal=True)[..., :dv]
    y.backward(g)
    return y


def time_attention(device: torch.device, batch: int = 8, seq: int = 2048) -> dict:
    from torch.nn.attention import SDPBackend

    torch.manual_seed(2)
    H, dqk, dv = 16, 96, 64
    bf16 = dict(device=device, dtype=torch.bfloat16)
    q = torch.randn(batch, H, seq, dqk, **bf16, requires_grad=True)
    k = torch.randn(batch, H, seq, dqk, **bf16, requires_grad=True)
    v = torch.randn(batch, H, seq, dv, **bf16, requires_grad=True)
    g = torch.randn(batch, H, seq, dv, **bf16)
    cases = {
        "flash_padded_v": (SDPBackend.FLASH_ATTENTION, True),
        "cudnn": (SDPBackend.CUDNN_ATTENTION, False),
        "efficient": (SDPBackend.EFFICIENT_ATTENTION, False),
    }
    result, ref = dict(check="mla_attention_backends_fwd_bwd_ms"), None
    for name, (backend, pad) in cases.items():
        try:
            for _ in range(2):
                y = attention_step(q, k, v, g, backend, pad)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                attention_step(q, k, v, g, backend, pad)
            torch.cuda.synchronize()
            result[name] = round((time.perf_counter() - start) / 10 * 1e3, 3)
            ref = y if ref is None else ref
            result[name + "_rel_err"] = rel(y, ref)
        except RuntimeError as e:  # backend not available for these shapes on this build
            result[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
    result["ok"] = True
    return result


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset, seq = ("small", 2048) if device.type == "cuda" else ("tiny", 128)
    results = [check_bf16_loss(device, preset, seq), check_grouped_mm(device)]
    if device.type == "cuda":
        results.append(time_attention(device))
    for r in results:
        print(json.dumps(r), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
