"""Cached forward pass: MLA in the absorbed form, attending over the compressed latent cache.

MLA expands the latent per head as k_nope = W_UK c and v = W_UV c (the two halves of `kv_b_proj`).
Both products are folded into the query and the output instead of being applied to every cached token:
  score_h(i, j) = q_nope_h,i · (W_UK_h c_j) + q_rope_h,i · k_rope_j
                = (W_UK_hᵀ q_nope_h,i) · c_j  + q_rope_h,i · k_rope_j
  out_h,i       = Σ_j a_h(i, j) W_UV_h c_j  =  W_UV_h (Σ_j a_h(i, j) c_j)
so attention is multi-query attention with one shared "key" [c_j; k_rope_j] of kv_lora_rank + d_rope dims
and one shared "value" c_j, and the cache holds only those. The same path serves the prompt (T tokens,
causal mask) and each new token (T = 1). Weights are the model's own modules: nothing is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seektrain.infer.kv_cache import LatentCache
from seektrain.model.attention import MLA
from seektrain.model.layers import apply_rope, rope_cos_sin
from seektrain.model.transformer import Transformer


def absorbed_attention(
    attn: MLA, x: torch.Tensor, cache: LatentCache, layer: int, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """x (B, T, D) for positions [cache.length, cache.length + T) -> attention output (B, T, D).
    Appends the T tokens' latents to `cache` (the caller advances it once all layers ran)."""
    B, T, _ = x.shape
    H, nope, rope, r = attn.n_heads, attn.nope, attn.rope, attn.kv_lora_rank
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))) if attn.q_lora else attn.q_proj(x)
    q = q.view(B, T, H, nope + rope).transpose(1, 2)  # (B, H, T, d_qk)
    q_nope, q_rope = q.split([nope, rope], dim=-1)
    q_rope = apply_rope(q_rope, cos, sin)

    c_kv, k_rope = attn.kv_a_proj_with_mqa(x).split([r, rope], dim=-1)  # (B, T, r), (B, T, dr)
    c_kv = attn.kv_a_layernorm(c_kv)
    k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).squeeze(1)  # (B, T, dr)
    c_all, k_rope_all = cache.append(layer, c_kv, k_rope)  # (B, S, r), (B, S, dr)

    w_kv_b = attn.kv_b_proj.weight.view(H, nope + attn.v_dim, r)
    w_uk, w_uv = w_kv_b[:, :nope], w_kv_b[:, nope:]  # (H, nope, r), (H, v, r)
    q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
    query = torch.cat([q_lat, q_rope], dim=-1)  # (B, H, T, r + dr)
    key = torch.cat([c_all, k_rope_all], dim=-1).unsqueeze(1)  # (B, 1, S, r + dr), shared by all heads
    value = c_all.unsqueeze(1)  # (B, 1, S, r)
    S = key.shape[2]
    mask = None
    if T > 1:  # query i sits at position S - T + i and sees keys 0 .. S - T + i
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
    o_lat = F.scaled_dot_product_attention(
        query, key.expand(B, H, S, r + rope), value.expand(B, H, S, r), attn_mask=mask, scale=attn.scale
    )  # (B, H, T, r)
    y = torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # (B, H, T, v)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * attn.v_dim))


@torch.no_grad()
def forward_cached(
    model: Transformer, tokens: torch.Tensor, cache: LatentCache, last_only: bool = True
) -> torch.Tensor:
    """Run tokens (B, T) at positions [cache.length, cache.length + T) through the trunk, filling the cache.
    Returns logits (B, 1, V) for the last position, or (B, T, V) with `last_only=False`. MTP modules are
    not used: they predict further ahead only for training."""
    start, T = cache.length, tokens.shape[1]
    if start + T > cache.max_len:
        raise ValueError(f"{start + T} tokens exceed the cache's {cache.max_len}")
    cos, sin = rope_cos_sin(model.cfg, start + T, tokens.device)
    cos, sin = cos[start:], sin[start:]  # (T, d_rope/2): the same table the full forward uses
    h = model.embed_tokens(tokens)  # (B, T, D)
    for i, block in enumerate(model.layers):
        h = h + absorbed_attention(block.self_attn, block.input_layernorm(h), cache, i, cos, sin)
        y = block.mlp(block.post_attention_layernorm(h))
        h = h + (y[0] if isinstance(y, tuple) else y)  # MoE also returns loads and a balance loss
    cache.advance(T)
    if last_only:
        h = h[:, -1:]
    return model.lm_head(model.norm(h))
