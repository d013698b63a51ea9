"""Peak host memory of building a preset under FSDP2 on CPU ranks: sharded while empty, then allocated and
initialized (what the trainer does), against allocated and initialized whole on every rank, then sharded.

Run:  torchrun --standalone --nproc-per-node 2 bench/bench_fsdp_init.py [--preset small] [--order shard_first]
(--order materialize_first for the other; run each in its own torchrun: peak RSS is per process).
Prints one line per rank: peak resident memory, parameters held locally, seconds.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from seektrain.distributed.env import destroy_process_group
from seektrain.distributed.parallelize import apply_fsdp, materialize
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--order", choices=["shard_first", "materialize_first"], default="shard_first")
    args = p.parse_args()
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(args.preset))
    start = time.perf_counter()
    if args.order == "shard_first":  # the trainer's path
        materialize(model, "cpu", mesh)
    else:
        apply_fsdp(materialize(model, "cpu"), mesh, "fp32")
    seconds = time.perf_counter() - start
    local = sum(q.to_local().numel() for q in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(
        f"rank {dist.get_rank()} {args.preset} {args.order}: peak RSS {peak:.2f} GiB, "
        f"{local / 1e6:.0f}M parameters held, {seconds:.1f} s",
        flush=True,
    )
    del model  # FSDP2 holds the group: drop it before leaving (see destroy_process_group)
    destroy_process_group()


if __name__ == "__main__":
    main()
