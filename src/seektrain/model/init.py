"""Weight initialization that does not depend on how a parameter is sharded.

Each parameter's rows (its first dimension) are drawn in fixed chunks, each from a generator seeded by a
hash of (base seed, parameter name, chunk index). A rank holding rows [a, b) of a parameter draws only
the chunks that overlap them, so an FSDP2 model initialized after sharding holds exactly the weights one
process would (on the same kind of device: CPU and CUDA generators differ), and no rank ever
materializes more than its shards and one chunk. CPU generators keep 32 bits of a seed, so two of n
chunks share one with probability ≈ n²/2^33 (`small`'s 1,340 chunks: 2e-4), CUDA's keep 64.
"""

from __future__ import annotations

import hashlib

import torch

CHUNK_ELEMENTS = 1 << 20  # values drawn per generator: rows per chunk = this // one row's values


def base_seed() -> int:
    """A base seed drawn from torch's global generator: `torch.manual_seed` decides the weights."""
    return int(torch.randint(0, 2**62, (1,)).item())


def local_part(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what elementwise work needs), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def normal_rows_(param: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill `param` (a tensor, or a DTensor sharded on dim 0 or replicated) with N(0, std²) values that
    depend only on (seed, name, the parameter's global shape)."""
    local = local_part(param)
    rows, start = _global_rows_and_offset(param, local)
    if local.numel() == 0:
        return
    row_numel = local[0].numel()
    per_chunk = max(1, CHUNK_ELEMENTS // max(row_numel, 1))
    stop = start + local.shape[0]
    for chunk in range(start // per_chunk, (stop - 1) // per_chunk + 1):
        first = chunk * per_chunk
        count = min(per_chunk, rows - first)
        gen = torch.Generator(local.device).manual_seed(chunk_seed(seed, name, chunk, local.device))
        lo, hi = max(first, start), min(first + count, stop)
        if (lo, hi) == (first, first + count):  # the whole chunk is here: drawn in place
            local[lo - start : hi - start].normal_(0.0, std, generator=gen)
        else:  # the same draw (same op, same shape), then this shard's rows of it
            values = local.new_empty((count, *local.shape[1:])).normal_(0.0, std, generator=gen)
            local[lo - start : hi - start].copy_(values[lo - first : hi - first])


def chunk_seed(seed: int, name: str, chunk: int, device: torch.device) -> int:
    """The seed of one chunk's generator: all of (seed, name, chunk) mixed by a cryptographic hash, cut to
    what the device's generator keeps: 32 bits on CPU (mt19937 ignores the rest), 63 on CUDA (Philox)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    bits = 32 if torch.device(device).type == "cpu" else 63
    return int.from_bytes(digest, "little") % (1 << bits)


def _global_rows_and_offset(param: torch.Tensor, local: torch.Tensor) -> tuple[int, int]:
    """The parameter's global number of rows and the first global row of `local`. A DTensor sharded on
    dim 0 (FSDP2's Shard(0), also on one dim of a 2-D mesh) holds torch.chunk's share of the rows."""
    if not hasattr(param, "placements"):
        return local.shape[0], 0
    rows, start = param.shape[0], 0
    size = rows
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            if placement.dim != 0:
                raise ValueError(f"cannot initialize a parameter sharded on dim {placement.dim}")
            chunk = -(-size // param.device_mesh.size(mesh_dim))
            offset = chunk * param.device_mesh.get_local_rank(mesh_dim)
            start += min(offset, size)
            size = max(0, min(chunk, size - offset))
    if size != local.shape[0]:
        raise ValueError(f"local shard of {size} rows expected, got {local.shape[0]}")
    return rows, start
