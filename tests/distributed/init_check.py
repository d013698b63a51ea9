"""Run by torchrun (tests/distributed/test_dist_init.py): a model sharded by FSDP2 on the meta device, then
allocated and initialized (`materialize`, the trainer's path), holds exactly the weights of the same model
initialized whole in one process.
`--hsdp`: a 2-D mesh (replicate over pairs, shard within them). Sizes are chosen so that rows split
unevenly over the ranks (some hold fewer rows or none) and, with small chunks, so that chunk boundaries
cut through shards."""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from seektrain.distributed.env import destroy_process_group
from seektrain.distributed.parallelize import materialize
from seektrain.model import init as init_mod
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer


def check() -> str | None:
    """None when every parameter and buffer matches, else what differs."""
    world = dist.get_world_size()
    init_mod.CHUNK_ELEMENTS = 700
    cfg = dataclasses.replace(
        ModelConfig.from_preset("tiny"),
        num_hidden_layers=2,
        vocab_size=1001,
        hidden_size=72,
        n_routed_experts=5,
        n_group=1,
        topk_group=1,
        num_mtp_layers=1,
    )
    torch.manual_seed(0)
    whole = Transformer(cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        sharded = Transformer(cfg)
    hsdp = "--hsdp" in sys.argv
    shape, names = ((2, world // 2), ("replicate", "shard")) if hsdp else ((world,), ("dp",))
    materialize(sharded, "cpu", init_device_mesh("cpu", shape, mesh_dim_names=names))  # as the trainer does
    uneven = 0
    for (name, p), q in zip(sharded.named_parameters(), whole.parameters(), strict=True):
        uneven += p.to_local().shape[0] * shape[-1] != p.shape[0]
        if not torch.equal(p.full_tensor(), q):
            return f"rank {dist.get_rank()}: {name} differs from the whole model's"
    if uneven == 0:
        return "no parameter split unevenly: the check would not cover uneven shards"
    for name, b in sharded.named_buffers():
        if not torch.equal(b, dict(whole.named_buffers())[name]):
            return f"rank {dist.get_rank()}: buffer {name} differs"
    return None


if __name__ == "__main__":
    dist.init_process_group("gloo")
    problem = check()  # its models (and FSDP2's hold on the group) are gone when it returns
    dist.barrier()  # no rank tears its group down while another still talks to it (a gloo abort, seen once)
    destroy_process_group()
    raise SystemExit(problem)
