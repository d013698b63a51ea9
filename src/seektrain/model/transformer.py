"""The DeepSeek-V3 trunk: embedding, blocks (MLA + dense MLP or MoE), final norm, head, MTP modules.

Single-device and rank-free: the trainer wraps `model.layers[i]` / `model.mtp[i]` with activation
checkpointing, FSDP or torch.compile from outside. Everything a step needs (losses as sums and counts,
per-expert loads) is returned by `forward`, never accumulated as a side effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seektrain.model.attention import MLA
from seektrain.model.config import ModelConfig
from seektrain.model.cross_entropy import IGNORE_INDEX, LinearCrossEntropy
from seektrain.model.init import base_seed, local_part, normal_rows_
from seektrain.model.layers import MLP, RMSNorm, rope_cos_sin
from seektrain.model.moe import GroupedExperts, MoE
from seektrain.model.mtp import MTPModule, shift_left


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). Names follow the checkpoint."""

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x (B, T, D) -> (x, expert counts (E,) or None, balance loss or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, counts, balance = self.mlp(h)
            return x + y, counts, balance
        return x + self.mlp(h), None, None


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V) without targets; None with them (the loss never makes them)
    loss: torch.Tensor | None = None  # main mean + λ·MTP mean + balance (None without targets)
    main_loss_sum: torch.Tensor | None = None  # fp32 sum of token CE over valid targets
    main_count: torch.Tensor | None = None  # int64 number of valid targets
    mtp_loss_sum: torch.Tensor | None = None  # same for MTP, summed over depths
    mtp_count: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None  # α-weighted sequence-wise balance loss, summed over MoE layers
    expert_counts: torch.Tensor | None = None  # (n_moe_layers, E) int64 tokens per expert, main layers only
    mtp_expert_counts: torch.Tensor | None = None  # (MTP MoE layers, E) int64, with targets only


class Transformer(nn.Module):
    """Built on the meta device, then (unless the default device is meta) materialized on the default
    device and initialized by `init_weights`, so both paths give the same weights for the same seed."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        device = torch.get_default_device()
        with torch.device("meta"):  # always build empty: init_weights alone decides the values
            # given its (empty) weight, the embedding skips its own init: `normal_` on the meta device
            # imports torch._dynamo (~0.9 s of every command's start-up)
            embed = torch.empty(cfg.vocab_size, cfg.hidden_size)
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=embed)
            self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
            self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.num_mtp_layers))
            self.cross_entropy = LinearCrossEntropy()
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    def moe_layers(self) -> list[MoE]:
        """The main model's MoE modules, in the row order of `expert_counts`."""
        return [block.mlp for block in self.layers if isinstance(block.mlp, MoE)]

    def mtp_moe_layers(self) -> list[MoE]:
        """The MTP modules' MoE modules, in the row order of `mtp_expert_counts`; their correction biases
        are balanced like the main model's."""
        return [m.block.mlp for m in self.mtp if isinstance(m.block.mlp, MoE)]

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one place weights are initialized (also after `to_empty` from the meta device, and after
        FSDP2 sharding): every Linear, the embedding and the stacked experts ~ N(0, initializer_range²),
        as transformers does; RMSNorm gains = 1; the routers' correction biases = 0. Values depend on
        torch's global seed and each parameter's name and shape, not on how it is sharded
        (`model/init.py`). Also re-ties a tied head."""
        if self.cfg.tie_word_embeddings and self.lm_head.weight is not self.embed_tokens.weight:
            self.lm_head.weight = self.embed_tokens.weight  # `to_empty` unties shared parameters
        std = self.cfg.initializer_range
        seed = base_seed()
        for prefix, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding, GroupedExperts)):
                for name, param in module.named_parameters(recurse=False):
                    if module is self.lm_head and self.cfg.tie_word_embeddings:
                        continue  # the embedding's, initialized under its own name
                    normal_rows_(param, std, seed, f"{prefix}.{name}")
            elif isinstance(module, RMSNorm):
                local_part(module.weight).fill_(1.0)
            elif isinstance(module, MoE):
                module.e_score_correction_bias.zero_()

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *, mtp: bool = True
    ) -> ModelOutput:
        """tokens (B, T) int64; targets (B, T) int64 with -100 = ignore. MTP runs only with targets, and
        only with `mtp` (evaluation scores the main model alone: `mtp=False`, whose MTP terms are 0)."""
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be (B, T) integer ids, got {tuple(tokens.shape)} {tokens.dtype}")
        B, T = tokens.shape
        cos, sin = rope_cos_sin(self.cfg, T, tokens.device)  # (T, d_rope/2) each
        h = self.embed_tokens(tokens)  # (B, T, D)
        counts, balances = [], []
        for block in self.layers:
            h, c, bal = block(h, cos, sin)
            if c is not None:
                counts.append(c)
                balances.append(bal)
        expert_counts = self._stack_counts(counts, tokens.device)
        if targets is None:
            return ModelOutput(logits=self.lm_head(self.norm(h)), expert_counts=expert_counts)  # (B, T, V)

        out = ModelOutput(logits=None, expert_counts=expert_counts)
        hs, all_targets, mtp_counts = [self.norm(h)], [targets], []
        for k, module in enumerate(self.mtp if mtp else [], start=1):
            emb = self.embed_tokens(shift_left(tokens, k, fill=0))  # Emb(t_{i+k}); padded tail has no target
            # Depth k reads the previous stage's hidden state after that stage's final norm (the one its
            # head reads), as DeepSeek's released modeling code and the inference engines feed `hnorm`.
            h, c, bal = module(hs[-1] if self.cfg.mtp_input == "normed" else h, emb, cos, sin)
            if c is not None:
                mtp_counts.append(c)
                balances.append(bal)
            hs.append(module.norm(h))
            all_targets.append(shift_left(targets, k, fill=IGNORE_INDEX))
        # One call for the main model and every MTP depth: the shared head is cast once.
        sums, target_counts = self.cross_entropy(hs, self.lm_head.weight, all_targets)
        # A copy, not a view of `sums`: FSDP2 hooks the root's outputs for the backward, and warns on views
        # (an in-place op on one would drop that hook).
        out.main_loss_sum, out.main_count = sums[0].clone(), target_counts[0]
        out.mtp_loss_sum, out.mtp_count = sums[1:].sum(), target_counts[1:].sum()
        out.mtp_expert_counts = self._stack_counts(mtp_counts, tokens.device)
        out.balance_loss = torch.stack(balances).sum() if balances else torch.zeros((), device=h.device)
        out.loss = (
            out.main_loss_sum / out.main_count.clamp(min=1)
            + self.cfg.mtp_loss_weight * out.mtp_loss_sum / out.mtp_count.clamp(min=1)
            + out.balance_loss
        )
        return out

    def _stack_counts(self, counts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Per-layer expert counts (E,) as one (layers, E) int64 tensor; (0, E) when no layer is MoE."""
        if counts:
            return torch.stack(counts)
        return torch.zeros(0, self.cfg.n_routed_experts, dtype=torch.int64, device=device)
