"""Small building blocks: RMSNorm, the SwiGLU MLP, and RoPE with YaRN.

The arithmetic mirrors transformers' DeepseekV3 op for op (norm in fp32, interleaved RoPE written
as even/odd halves) so that exported checkpoints reproduce our logits to float32 rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seektrain.model.config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # inductor fuses the plain form
            return rms_norm(x, self.weight, self.eps)
        return _RMSNorm.apply(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · (x / rms(x)), normalized in fp32 and rounded back to x's dtype before the gain."""
    return weight * _normalized(x, eps)[0]


def _normalized(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x), computed in fp32 (or x's wider dtype) and rounded to x's dtype, and the 1 / rms used."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return (wide * rstd).to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    """`rms_norm` with the same forward, op for op, and a backward written out: autograd's own takes about
    twice the passes over x (a norm of `tiny`, forward + backward, one thread: 0.73 against 0.86 ms)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x_hat, rstd = _normalized(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * x_hat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        """With x̂ = x·rstd and g = grad·weight: dx = rstd·(g - x̂·mean(g·x̂)), dweight = Σ grad·x̂ (x̂ as the
        forward rounded it), both accumulated in fp32."""
        x, weight, rstd = ctx.saved_tensors
        wide = rstd.dtype  # fp32, or fp64 for fp64 rows
        with torch.autocast(x.device.type, enabled=False):
            x_hat = x.to(wide) * rstd
            dweight = None
            if ctx.needs_input_grad[1]:
                rows = (grad * x_hat.to(x.dtype)).reshape(-1, x.shape[-1])
                dweight = rows.sum(0, dtype=wide).to(weight.dtype)
            g = grad.to(wide) * weight.to(wide)
            dx = torch.addcmul(g, x_hat, (g * x_hat).mean(-1, keepdim=True), value=-1).mul_(rstd)
        return dx.to(x.dtype), dweight, None


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (d_rope/2,) and the cos/sin amplitude factor, with YaRN when configured.

    YaRN keeps high frequencies (fewer than beta_slow..beta_fast rotations over the original
    context are interpolated by `factor`, the rest extrapolated) with a linear ramp between them.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    y = cfg.yarn()
    if y is None:
        return inv_freq, 1.0
    factor, orig = y["factor"], y["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(y["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation
    if y["mscale"] and y["mscale_all_dim"]:
        amplitude = yarn_mscale(factor, y["mscale"]) / yarn_mscale(factor, y["mscale_all_dim"])
    else:
        amplitude = yarn_mscale(factor)
    return inv_freq, float(amplitude)


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, d_rope/2) in fp32. Recomputed per forward (cheap), so no buffer can go stale
    after meta-device materialization."""
    inv_freq, amplitude = rope_inv_freq(cfg, device)
    freqs = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq  # (T, d/2)
    return freqs.cos() * amplitude, freqs.sin() * amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), … of x (B, H, T, d_rope) by their position's angles.

    The result is written de-interleaved ([rotated evens, rotated odds]), as transformers does with
    `rope_interleave=True`: q and k get the same permutation, so q·k is unchanged.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, d/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
