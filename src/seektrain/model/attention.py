"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3).

Queries come from h directly (`q_proj`) or through a low-rank bottleneck (`q_a_proj` → norm →
`q_b_proj`). Keys and values are compressed into one latent c_kv of `kv_lora_rank` dims plus a
single RoPE key shared by all heads (`kv_a_proj_with_mqa`), then expanded per head by `kv_b_proj`.
Module names are those of the published checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seektrain.model.config import ModelConfig
from seektrain.model.layers import RMSNorm, apply_rope

# The latent norms' epsilon is fixed, not `rms_norm_eps` (which the block and final norms take): so DeepSeek's
# reference code and transformers' DeepseekV3 build them, and an export must compute what it computed.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale()
        self.q_lora = cfg.q_lora_rank is not None
        d, h, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(B, T, H, self.nope + self.rope).transpose(1, 2)  # (B, H, T, d_qk)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)

        kv_a = self.kv_a_proj_with_mqa(x)  # (B, T, r_kv + d_rope)
        c_kv, k_rope = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_rope = k_rope.view(B, 1, T, self.rope)  # one RoPE key shared by all heads

        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope, cos, sin)

        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)  # (B, H, T, nope+v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, d_qk)
        k = torch.cat([k_nope, k_rope.expand(B, H, T, self.rope)], dim=-1)  # (B, H, T, d_qk)
        if x.device.type == "cpu" and q.dtype != torch.float32 and T <= CPU_PLAIN_ATTENTION_MAX_LEN:
            y = causal_attention(q, k, v, self.scale)
        else:
            if self.v_dim < q.shape[-1]:
                # The flash kernels (CUDA and CPU) need one head dim for q, k and v, else SDPA falls back
                # to the unfused math path: pad v with zeros, drop them after.
                v = F.pad(v, (0, q.shape[-1] - self.v_dim))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)[..., : self.v_dim]
        # y: (B, H, T, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))


# On CPU in bf16/fp16 torch's flash kernel has a large fixed cost per call, so up to this length the plain
# formulation is faster. A `tiny` MLA layer, B=4, forward + backward on one thread (medians): bf16 T=256
# plain 12.9 ms compiled / 17.7 eager against flash 20.3 / 20.0; T=512 eager 50.3 against 52.9, T=1024
# 209 against 122. In fp32 flash is as fast or faster at every length (T=256: 19.8 vs 19.3 compiled,
# 21.7 vs 24.2 eager; T=64-128 equal), so fp32 always takes it.
CPU_PLAIN_ATTENTION_MAX_LEN = 256
# causal_attention computes the first half of the queries on its own from this many rows per half
CAUSAL_SPLIT_MIN_ROWS = 32


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T · scale, causal) v with the scores materialized; scaled and normalized in fp32.

    The first half of the queries sees only the first half of the keys, so it is computed on its own: a
    quarter fewer scores, softmax and GEMM work than the whole (T, T) block, and the same values to
    rounding (the masked scores are exact zeros after the softmax either way; the sums run over fewer
    terms). `tiny`'s heads, B=4, T=256, forward + backward on one thread: fp32 10.1 against 14.2 ms
    (medians), bf16 7.9 against 8.9 ms (best of 30). With a gradient to come (outside torch.compile, which
    fuses the plain form) the halves run as one autograd Function whose backward writes each gradient
    once, where autograd's own zero-fills a whole gradient of q, k and v for each half's slice and adds
    them up: the same bits (bf16 and fp32), in 3.0 against 3.3 ms (bf16, the same heads)."""
    T = q.shape[-2]
    if T < 2 * CAUSAL_SPLIT_MIN_ROWS:
        return _causal_block(q, k, v, 0, scale)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _SplitCausalAttention.apply(q, k, v, scale)
    return torch.cat([_causal_block(*half, scale) for half in _halves(q, k, v)], dim=-2)


def _halves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[tuple]:
    """(queries, keys, values, offset) of the split's two blocks: the first half of the queries against
    the first half of the keys, the second half against all of them."""
    h = q.shape[-2] // 2
    return [(q[..., :h, :], k[..., :h, :], v[..., :h, :], 0), (q[..., h:, :], k, v, h)]


def _causal_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float
) -> torch.Tensor:
    """Queries at positions offset + i (i < len(q)) against keys 0..len(k)-1, causal."""
    return _probabilities(q, k, offset, scale).to(v.dtype) @ v


def _probabilities(q: torch.Tensor, k: torch.Tensor, offset: int, scale: float) -> torch.Tensor:
    """softmax of the scaled, causally masked scores of `_causal_block`, in fp32 (or q's wider dtype).

    The mask is added, as 0 or -inf in fp32, in the same pass that scales the scores and casts them to
    fp32 (type promotion), and its backward passes the gradient through untouched: the same values as
    scaling, then filling the future with -inf, bit for bit, in 0.8× the time of a `tiny` layer's
    attention, forward + backward (bf16, one thread: 3.7 against 4.6 ms at B=8, T=128)."""
    future = torch.full((q.shape[-2], k.shape[-2]), float("-inf"), device=q.device).triu_(1 + offset)
    return torch.add(future, q @ k.transpose(-2, -1), alpha=scale).softmax(-1)  # (B, H, Tq, Tk)


class _SplitCausalAttention(torch.autograd.Function):
    """`causal_attention`'s two halves with a backward written out: the gradients of q come from the two
    halves' GEMMs into their rows, and the first half's gradients of k and v are added into the rows of
    the second half's (which span all keys). Saves what autograd saves: q, k, v and each half's
    probabilities, in fp32 and rounded."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        saved, out = [], []
        for queries, keys, values, offset in _halves(q, k, v):
            p = _probabilities(queries, keys, offset, scale)
            rounded = p.to(v.dtype)
            out.append(rounded @ values)
            saved += [p, rounded]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.scale = scale
        return torch.cat(out, dim=-2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v, p1, rounded1, p2, rounded2 = ctx.saved_tensors
        (q1, k1, v1, _), (q2, _, _, _) = _halves(q, k, v)
        h = q1.shape[-2]
        # the second half's key and value gradients span all keys; the first half's add to their rows
        dq2, dk, dv = _block_grads(q2, k, v, grad[..., h:, :], p2, rounded2, ctx.scale)
        dq1, dk1, dv1 = _block_grads(q1, k1, v1, grad[..., :h, :], p1, rounded1, ctx.scale)
        dk[..., :h, :] += dk1
        dv[..., :h, :] += dv1
        return torch.cat([dq1, dq2], dim=-2), dk, dv, None


def _block_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    p: torch.Tensor,
    rounded: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one `_causal_block` (q, k, v) from its output's gradient and its saved probabilities,
    the ops autograd runs: the softmax's backward in p's dtype, the scale applied in the pass that rounds
    the scores' gradient to q's dtype."""
    dp = torch._softmax_backward_data((grad @ v.transpose(-2, -1)).to(p.dtype), p, -1, p.dtype)
    ds = torch.mul(dp, scale, out=torch.empty_like(dp, dtype=q.dtype))
    return ds @ k, ds.transpose(-2, -1) @ q, rounded.transpose(-2, -1) @ grad
