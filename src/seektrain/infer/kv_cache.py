"""MLA's compressed KV cache: per token and layer, the latent c_kv (kv_lora_rank) and the shared RoPE key.

A standard multi-head cache keeps every head's key (d_qk) and value (d_v) per token and layer; MLA's
keys and values are both linear in the latent c_kv, so caching c_kv (after `kv_a_layernorm`) plus the
one RoPE key all heads share (after rotation) is enough. Per token that is
(kv_lora_rank + qk_rope_head_dim) values instead of heads · (d_qk + d_v).
"""

from __future__ import annotations

import torch

from seektrain.model.config import ModelConfig


class LatentCache:
    """Preallocated (L, B, max_len, ·) buffers; `length` tokens of every row are filled."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        L = cfg.num_hidden_layers
        self.max_len = max_len
        self.c_kv = torch.zeros(
            L, batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype
        )  # (L, B, S, r)
        self.k_rope = torch.zeros(
            L, batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype
        )  # (L, B, S, dr)
        self.length = 0

    def append(
        self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store T new tokens' c_kv (B, T, r) and rotated k_rope (B, T, dr) of `layer` at positions
        [length, length + T); return the layer's filled cache (B, length + T, ·). `advance` moves `length`."""
        start, end = self.length, self.length + c_kv.shape[1]
        assert end <= self.max_len, f"cache of {self.max_len} tokens overflows ({end})"
        self.c_kv[layer, :, start:end] = c_kv
        self.k_rope[layer, :, start:end] = k_rope
        return self.c_kv[layer, :, :end], self.k_rope[layer, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers."""
        L, _, _, r = self.c_kv.shape
        return L * (r + self.k_rope.shape[-1]) * self.c_kv.element_size()


def latent_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """MLA cache bytes per token (all layers): (kv_lora_rank + qk_rope_head_dim) values per layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize


def naive_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """A per-head cache of the same model: every head's key (d_qk) and value (d_v) per layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer * itemsize
