"""Where this process sits in a launch: rank, world size and device, read from torchrun's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

from seektrain.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def detect() -> DistEnv:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process without it."""
    env = DistEnv(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )
    if env.world_size > 1:
        raise UserError(
            f"launched with WORLD_SIZE={env.world_size}: multi-process training is not "
            "supported yet; run one process"
        )
    return env


def pick_device(name: str, local_rank: int = 0):
    """`auto` → cuda:local_rank when available, else cpu."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)
