"""Multi-token prediction (DeepSeek-V3 §2.2): depth-k module predicts the token k+1 steps ahead.

Module k combines the previous depth's hidden state h^{k-1}_i with the embedding of token t_{i+k}:
  h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])  ->  one transformer block  ->  h^k_i
and predicts t_{i+k+1} with the main model's output head after its own final norm (`shared_head.norm`
in the checkpoint). Embedding and head are shared with the main model, not copied. h^{k-1} is taken after
the previous stage's final norm (the main model's `norm` for k = 1): what the modeling code shipped with
DeepSeek's MTP checkpoints hands the module, and what vLLM and SGLang feed it when they draft with it.
"""

from __future__ import annotations

import torch
from torch import nn

from seektrain.model.config import ModelConfig
from seektrain.model.layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from seektrain.model.transformer import Block  # Block lives with the trunk; avoid an import cycle

        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, moe=cfg.num_moe_layers > 0)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """h (B, T, D) previous depth's hidden states, emb (B, T, D) embeddings of the tokens k ahead
        -> (this depth's hidden states (B, T, D), its expert counts (E,) or None, balance loss or None)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, cos, sin)


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x (B, T) -> (B, T) with out[:, i] = x[:, i + k] and `fill` where i + k >= T."""
    return torch.cat([x[:, k:], x.new_full((x.shape[0], min(k, x.shape[1])), fill)], dim=1)
