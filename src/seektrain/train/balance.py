"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2): nudge each expert's routing bias.

After every optimizer step, from the tokens each expert received over the whole global batch (all
micro-batches; all ranks once summed by the caller): overloaded experts get a lower bias, underloaded
ones a higher one, so the router picks them less or more often. The bias only affects selection, never
the combine weights, and lives outside the optimizer (a buffer, no weight decay).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def update_expert_bias(moe_layers: list[torch.nn.Module], counts: torch.Tensor, speed: float) -> None:
    """bias += speed·sign(mean_load − load) per MoE layer; counts (n_moe_layers, E) summed over the step."""
    if speed == 0:
        return
    assert counts.shape[0] == len(moe_layers), (counts.shape, len(moe_layers))
    load = counts.float()  # (L_moe, E)
    delta = speed * torch.sign(load.mean(dim=1, keepdim=True) - load)  # (L_moe, E)
    for layer, d in zip(moe_layers, delta, strict=True):
        bias = layer.e_score_correction_bias
        bias.add_(d.to(device=bias.device, dtype=bias.dtype))


def max_violation(counts: torch.Tensor) -> float:
    """max_load / mean_load − 1, averaged over MoE layers (0 = perfectly balanced)."""
    load = counts.float()  # (L_moe, E)
    mean = load.mean(dim=1).clamp_min(1e-9)
    return (load.max(dim=1).values / mean - 1).mean().item()
