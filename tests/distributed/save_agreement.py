"""Run by torchrun (tests/distributed/test_dist_errors.py): a sharded save whose rank-0-only part (state.pt)
cannot be written. Rank 0's files are limited to 1 KiB (RLIMIT_FSIZE, as on a full disk) and its state.pt
holds 64 KiB; the other ranks write nothing of their own. Every rank must end with the same error, where a
bare barrier left them waiting for rank 0. Prints `rank R: MESSAGE`; exits non-zero on anything else."""

from __future__ import annotations

import os
import resource
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from seektrain.checkpoint.manager import CheckpointManager
from seektrain.distributed.env import destroy_process_group
from seektrain.errors import RanksError

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    manager = CheckpointManager(Path(sys.argv[1]), keep=2)
    try:
        manager.save_sharded(8, lambda tmp: None, {"x": torch.zeros(1 << 14)}, "", {}, is_main=rank == 0)
    except RanksError as e:
        os.write(1, f"rank {rank}: {e}\n".encode())  # one write: the ranks' lines never interleave
    else:
        raise SystemExit(f"rank {rank}: the save did not fail")
    finally:
        destroy_process_group()
