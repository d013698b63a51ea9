"""Applied to the model from outside: activation checkpointing and torch.compile per block.

The model stays single-device and unaware of either; state-dict keys do not change (no wrapper
modules), so checkpoints load with or without them. DDP/FSDP2 will be applied here as well.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: main layers and each MTP module's block."""
    return [*model.layers, *(m.block for m in model.mtp)]


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass. The block's returned expert counts come
    from the first forward only (recomputation outputs are discarded), so loads are counted once."""
    for block in blocks(model):
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each block in place (module.compile keeps parameter names)."""
    for block in blocks(model):
        block.compile()
