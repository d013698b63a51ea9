"""Host memory on CPU: keep freed memory in the process, so a training step reuses it instead of faulting
it back in; and refuse a model whose training state cannot fit at all.

glibc's malloc serves blocks over its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mappings
and returns them to the kernel on free, and trims its heap's free top likewise. A CPU training step
allocates and frees the same multi-MiB activations, logits slices and gradients every step, so each step
touches freshly zeroed pages again: one page fault per 4 KiB. Raising both thresholds keeps freed blocks
in the heap for the next step, as torch's CUDA caching allocator does on the GPU (`tiny`, bf16, one
thread: a step 295 -> 271 ms). The resident size then stays at the step's peak.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

from seektrain.errors import UserError
from seektrain.host_limits import available_host_memory

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
# Blocks below 1 GiB come from the heap (some glibc versions accept at most 32 MiB: the fallback), and a free
# heap top below 2 GiB is kept.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_TRIM_THRESHOLD = (2 << 30) - 1


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to keep freed memory, for the rest of the process; False where that is not
    glibc or it refused (nothing changes then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no libc.so.6 or no mallopt
        return False
    if not any(mallopt(_M_MMAP_THRESHOLD, threshold) for threshold in _MMAP_THRESHOLDS):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


@dataclass(frozen=True)
class RanksOnHost:
    """How the training state is spread over the ranks of one host under torchrun."""

    dp_mode: str  # ddp, fsdp or hsdp
    ranks: int  # ranks on this host
    shard: int  # ranks each parameter is sharded over (1 under ddp)
    tied_embeddings: bool  # fsdp then builds the whole model on every rank before sharding it

    def share(self, state: float) -> tuple[float, str]:
        """Bytes a parameter on this host, one rank's being `state`: under ddp each rank holds all of it and
        DDP's gradient buckets (a second copy of the gradients), else its shard. And what each holds, said."""
        if self.dp_mode == "ddp":
            per_rank, holds = state + 4.0, "all of it, and DDP's gradient buckets"
        else:
            per_rank, holds = state / self.shard, "all of it" if self.shard == 1 else f"1/{self.shard} of it"
            if self.tied_embeddings and per_rank < 4.0:  # built whole, sharded after
                per_rank, holds = 4.0, "the whole fp32 weights while building (tied embeddings)"
        several = self.ranks > 1
        ranks = f"{self.ranks} rank{'s' if several else ''} on this node under {self.dp_mode}"
        return self.ranks * per_rank, f"{ranks}, {'each ' if several else ''}holding {holds}"

    def relief(self) -> str:
        """What else would lower this host's share, for a hint: `, …` items."""
        if self.dp_mode == "ddp":
            return f"{', fewer ranks on this node' if self.ranks > 1 else ''}, parallel.dp_mode=fsdp"
        if self.dp_mode == "fsdp":
            return ", more nodes"
        if self.shard < self.ranks:  # several replicas on this node
            return ", a larger parallel.dp_shard"
        return ", parallel.dp_mode=fsdp over more nodes"


def check_training_state_fits(
    n_params: int, state_bytes: int, what: str, hint: str, layout: RanksOnHost | None = None
) -> None:
    """Refuse, in one line, a model whose fp32 weights, gradients and optimizer state (`state_bytes` per
    parameter: 8 for fp32 moments) alone exceed the host memory available now. Linux overcommits, so
    such a model is not refused when allocated: it grows until the OOM killer ends the process, or the
    machine swaps. Activations come on top, so passing this is no promise; no-op where the figure is
    unknown (no /proc/meminfo). With a `layout`, every rank on the host counts with what it holds."""
    available = available_host_memory()
    per_param, holders = float(4 + 4 + state_bytes), ""
    if layout is not None:
        per_param, holders = layout.share(per_param)
    need = int(n_params * per_param)
    if available is not None and need > available:
        count = f"{n_params / 1e9:.2f} B" if n_params >= 1e9 else f"{n_params / 1e6:.1f} M"
        raise UserError(
            f"{what}: {count} parameters need {_size(need)} of host memory for weights, gradients and "
            f"optimizer state alone{f' ({holders})' if holders else ''}; {_size(available)} is available "
            f"({hint})"
        )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"
