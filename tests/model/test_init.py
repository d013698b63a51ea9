"""Initialization that does not depend on sharding: every rank's shard, drawn alone, equals its rows of the
parameter drawn whole (what lets FSDP2 initialize after sharding and still match one process)."""

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from seektrain.model import init as init_mod
from seektrain.model.init import normal_rows_


class FakeMesh:
    def __init__(self, sizes: tuple[int, ...], coords: tuple[int, ...]):
        self.sizes, self.coords = sizes, coords

    def size(self, dim: int) -> int:
        return self.sizes[dim]

    def get_local_rank(self, dim: int) -> int:
        return self.coords[dim]


class FakeShard:
    """What `normal_rows_` reads of a DTensor: global shape, placements, mesh and the local tensor."""

    def __init__(self, shape, placements, mesh: FakeMesh, local: torch.Tensor):
        self.shape, self.placements, self.device_mesh, self._local = (
            torch.Size(shape),
            placements,
            mesh,
            local,
        )

    def to_local(self) -> torch.Tensor:
        return self._local


@pytest.mark.parametrize("rows", [1000, 7, 1])
@pytest.mark.parametrize("mesh", [(1,), (2,), (3,), (4,), (2, 2)], ids=str)
def test_shards_drawn_alone_equal_the_whole(rows, mesh, monkeypatch):
    """torch.chunk's share of the rows on each rank (the last ones short or empty, as FSDP2 shards); a
    2-D mesh replicates on its first dim and shards on its second (HSDP). Chunks of 700 values (10 rows
    of 70) make every shard boundary cut through a chunk."""
    monkeypatch.setattr(init_mod, "CHUNK_ELEMENTS", 700)
    whole = torch.empty(rows, 7, 10)
    normal_rows_(whole, 0.02, seed=123, name="layers.0.w")
    shard_sizes = mesh[-1]
    placements = (Shard(0),) if len(mesh) == 1 else (Replicate(), Shard(0))
    per_rank = -(-rows // shard_sizes)
    for replica in range(mesh[0] if len(mesh) == 2 else 1):
        pieces = []
        for k in range(shard_sizes):
            start, stop = min(k * per_rank, rows), min((k + 1) * per_rank, rows)
            local = torch.empty(stop - start, 7, 10)
            coords = (k,) if len(mesh) == 1 else (replica, k)
            normal_rows_(
                FakeShard(whole.shape, placements, FakeMesh(mesh, coords), local), 0.02, 123, "layers.0.w"
            )
            pieces.append(local)
        assert torch.equal(torch.cat(pieces), whole)


def test_values_are_normal_with_the_given_std():
    """400,000 draws: mean and std within 5 standard errors (std's ≈ σ/√(2n))."""
    w = torch.empty(2000, 200)
    normal_rows_(w, 0.02, seed=9, name="embed_tokens.weight")
    n = w.numel()
    assert abs(w.mean().item()) < 5 * 0.02 / n**0.5
    assert abs(w.std().item() - 0.02) < 5 * 0.02 / (2 * n) ** 0.5


def test_values_depend_on_seed_and_name():
    a, b, c = torch.empty(50, 40), torch.empty(50, 40), torch.empty(50, 40)
    normal_rows_(a, 1.0, seed=1, name="x")
    normal_rows_(b, 1.0, seed=2, name="x")
    normal_rows_(c, 1.0, seed=1, name="y")
    assert not torch.equal(a, b) and not torch.equal(a, c)
    again = torch.empty(50, 40)
    normal_rows_(again, 1.0, seed=1, name="x")
    assert torch.equal(a, again)


def test_a_shard_that_does_not_match_its_placement_is_refused():
    local = torch.empty(3, 4)  # rank 0 of 2 over 10 rows holds 5
    with pytest.raises(ValueError, match="5 rows expected"):
        normal_rows_(FakeShard((10, 4), (Shard(0),), FakeMesh((2,), (0,)), local), 1.0, 0, "w")


def test_every_bit_of_the_seed_and_name_counts_on_cpu():
    """The CPU generator keeps 32 bits of its seed: (seed, name, chunk) are hashed into them, so seeds that
    differ only above bit 32, or names that differ anywhere, still draw differently."""
    a, b = torch.empty(8, 8), torch.empty(8, 8)
    normal_rows_(a, 1.0, seed=5, name="w")
    normal_rows_(b, 1.0, seed=5 + 2**40, name="w")
    assert not torch.equal(a, b)


@pytest.mark.parametrize("preset", ["small", "v2-lite"])
def test_no_two_chunks_of_a_preset_share_a_cpu_seed(preset):
    """Every chunk that `init_weights` draws for the preset gets its own 32-bit CPU seed (with a hash,
    collisions among n chunks come with probability ≈ n²/2^33: ~2e-4 for `small`'s ~1,400)."""
    from seektrain.model.config import ModelConfig
    from seektrain.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(preset))
    seeds = []
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            per_chunk = max(1, init_mod.CHUNK_ELEMENTS // p[0].numel())
            n_chunks = -(-p.shape[0] // per_chunk)
            seeds += [init_mod.chunk_seed(7, name, c, torch.device("cpu")) for c in range(n_chunks)]
    assert len(set(seeds)) == len(seeds)
