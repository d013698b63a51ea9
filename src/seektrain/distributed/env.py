"""Where this process sits in a launch: rank, world size and device, read from torchrun's environment.

One process started without torchrun never touches torch.distributed, so the laptop path has no
process group at all. Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set; single node, multi-node with c10d
rendezvous, or srun under Slurm) `init_process_group` joins the group: nccl on GPU, gloo on CPU. That
holds for `--nproc-per-node 1` too: one rank still runs the DDP/FSDP2 path (a way to check it on one GPU).

Bad input is reported once per launch, not once per rank: every rank runs the same command line on the
same config, and what the trainer reads after joining the group (files a node may lack) goes through
`agree`, so all ranks fail together with one message that rank 0 prints (`launch_rank`, cli.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from seektrain.errors import RanksError, UserError, first_line

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # ranks on this node (the default shard group of hybrid FSDP)
    launched: bool = False  # started by torchrun (or anything that sets RANK), even as a single rank

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, prints and writes run files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether to join a process group and train through DDP/FSDP2 and sharded checkpoints."""
        return self.launched or self.world_size > 1


def detect() -> DistEnv:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or one process."""
    try:
        env = DistEnv(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))),
            "RANK" in os.environ,
        )
    except ValueError as e:
        raise UserError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise UserError(f"bad torchrun environment: RANK={env.rank}, WORLD_SIZE={env.world_size}")
    if env.distributed and "MASTER_ADDR" not in os.environ:
        raise UserError(
            f"WORLD_SIZE={env.world_size} but no MASTER_ADDR: launch with torchrun "
            "(e.g. torchrun --standalone --nproc-per-node 2 -m seektrain train …)"
        )
    return env


def launch_rank() -> int:
    """RANK as a launcher sets it, read leniently for error reporting: 0 outside a launch and when it is
    unreadable (a broken environment is then reported by every process)."""
    try:
        return int(os.environ.get("RANK", 0))
    except ValueError:
        return 0


# How a collective fails on the ranks that are left when another rank dies (killed, out of memory): gloo's
# TCP transport and NCCL say so in these words. Other collective failures (a mismatched collective, a CUDA
# error) keep their traceback.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")


def lost_rank(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank of the launch went away, None for any
    other error (and outside a launch): that rank's own output says why, and a traceback here would only
    bury it."""
    if "RANK" not in os.environ or not isinstance(e, RuntimeError):
        return None
    if not any(text in str(e) for text in _PEER_LOST):
        return None
    # gloo: "[…/tcp/pair.cc:553] Connection closed by peer [ADDR]:PORT. This is typically caused by …"
    why = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e)).split(". ")[0]
    return f"another rank stopped, so a collective failed ({why}); that rank's output says why"


def under_torchrun() -> bool:
    """Started by torchrun, which stops the remaining ranks as soon as one exits with an error (other
    launchers that set RANK, e.g. a bare srun, may not)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def pick_device(name: str, local_rank: int = 0):
    """`auto` → cuda:local_rank when available, else cpu."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but no CUDA device is available")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_process_group(env: DistEnv, device) -> None:
    """Join the default process group (nccl on GPU, gloo on CPU); a no-op for one process or when
    already joined (tests that spawn ranks themselves)."""
    import torch.distributed as dist

    if not env.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def destroy_process_group() -> None:
    """Leave the process group. Call it once nothing references the group any more (drop the Trainer
    first): a gloo group that outlives this call keeps its worker threads running into interpreter exit,
    which can abort there ("terminate called without an active exception", rank 1 of an FSDP run in CI
    once) or hang. Every DeviceMesh drops its groups too: FSDP2's sharding specs outlive the model
    (torch 2.13 keeps them in its DTensor dispatch caches) and with them their mesh, whose registry of
    groups (`_pg_registry`) would keep the groups alive."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed.device_mesh import DeviceMesh

    gc.collect()  # DDP/FSDP modules in reference cycles hold the group
    # by type: isinstance would read `__class__` of every object, which warns on torch's deprecated ones
    for mesh in [o for o in gc.get_objects() if issubclass(type(o), DeviceMesh)]:
        registry = getattr(mesh, "_pg_registry", None)  # absent where meshes hold group names only
        if isinstance(registry, dict):
            registry.clear()
    dist.destroy_process_group()


def build_mesh(env: DistEnv, device, dp_mode: str, dp_shard: int):
    """The data-parallel device mesh: 1-D ("dp",) for ddp/fsdp; 2-D ("replicate", "shard") for hsdp,
    parameters sharded within groups of `dp_shard` ranks (0 = the ranks of one node) and replicated
    across groups."""
    from torch.distributed.device_mesh import init_device_mesh

    if dp_mode != "hsdp":
        return init_device_mesh(device.type, (env.world_size,), mesh_dim_names=("dp",))
    shard = dp_shard or env.local_world_size
    if shard < 1 or env.world_size % shard:
        raise UserError(
            f"parallel.dp_shard={shard} must divide the number of ranks ({env.world_size}) for hsdp"
        )
    return init_device_mesh(
        device.type, (env.world_size // shard, shard), mesh_dim_names=("replicate", "shard")
    )


def agree(env: DistEnv, phase: Callable[[], T], what: str = "its result") -> T:
    """`phase()` on every rank, failing on all of them if it failed on any, or if the ranks got different
    results: the ranks exchange their UserError (or None) and their result (as text) in one all_gather. So
    an input that only some ranks lack (a data dir missing on one node) ends every rank with the same
    message instead of leaving the others blocked in their next collective, and ranks that see different
    files (a checkpoint on one node only) stop instead of silently diverging. Without a process group this
    is just `phase()`."""
    if not env.distributed:
        return phase()
    import torch.distributed as dist

    result, error = None, None
    try:
        result = phase()
    except UserError as e:
        error = e
    outcomes: list[tuple[str | None, str] | None] = [None] * env.world_size
    shown = "none" if result is None else str(result)
    dist.all_gather_object(outcomes, (None if error is None else str(error), shown))
    errors = [message for message, _ in outcomes]
    if any(message is not None for message in errors):
        raise RanksError(merge_by_rank(errors)) from error
    results = [value for _, value in outcomes]
    if len(set(results)) > 1:
        raise RanksError(f"the ranks disagree on {what}: {merge_by_rank(results)}")
    return result


def ranks_on_this_host(env: DistEnv) -> int:
    """How many ranks of the launch run on this host (by host name; LOCAL_WORLD_SIZE, which a bare srun
    does not set, is not relied on). A collective: every rank calls it."""
    import socket

    import torch.distributed as dist

    hosts: list[str | None] = [None] * env.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.count(socket.gethostname())


def merge_by_rank(messages: list[str | None]) -> str:
    """One message for the ranks' messages (None: that rank has none): the message alone when every rank
    has the same, else each distinct message after the ranks that have it (`ranks 1-3, 6: …`)."""
    ranks_of: dict[str, list[int]] = {}
    for rank, message in enumerate(messages):
        if message is not None:
            ranks_of.setdefault(message, []).append(rank)
    if len(ranks_of) == 1 and None not in messages:
        return next(iter(ranks_of))
    return " | ".join(f"{_rank_list(ranks)}: {message}" for message, ranks in ranks_of.items())


def _rank_list(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    spans = ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
    return f"rank{'s' if len(ranks) > 1 else ''} {spans}"
