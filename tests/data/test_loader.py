"""TokenLoader: packing, order, coverage, exact resume across rank counts, corrupt data detection."""

import shutil

import numpy as np
import pytest
import torch

from seektrain.data.loader import TokenLoader, permute
from seektrain.data.shards import load_manifest
from seektrain.errors import UserError

T = 64


def _stream(data_dir, split="train"):
    m = load_manifest(data_dir)
    return np.concatenate(
        [np.fromfile(data_dir / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    )


def _global_batches(loaders, steps):
    """Each step's global batch: the ranks' micro-batches concatenated in rank order -> list of (GB, T+1)."""
    out = []
    for _ in range(steps):
        parts = []
        for ld in loaders:
            for _ in range(ld.micro_steps):
                x, y = next(ld)
                parts.append(torch.cat([x, y[:, -1:]], dim=1))
        out.append(torch.cat(parts))
    return out


def _loaders(data_dir, world, mb, gb=8, seed=3):
    return [
        TokenLoader(
            data_dir,
            seq_len=T,
            micro_batch_size=mb,
            global_batch_size=gb,
            rank=r,
            world_size=world,
            seed=seed,
        )
        for r in range(world)
    ]


def test_windows_are_shifted_slices_of_the_stream(prepared):
    data_dir, _ = prepared
    stream = _stream(data_dir)
    ld = TokenLoader(data_dir, seq_len=T, micro_batch_size=4, shuffle=False)
    assert ld.num_sequences == (len(stream) - 1) // T
    for _ in range(3):
        x, y = next(ld)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in range(4):  # the 3rd micro-batch holds windows 8..11 (a window crosses a 4096-token shard)
        w = 8 + row
        assert x[row].tolist() == stream[w * T : w * T + T].tolist()
        assert y[row].tolist() == stream[w * T + 1 : w * T + T + 1].tolist()
    assert ld.vocab_size == 384 and ld.eos_id == 1 and ld.tokens_per_step == 4 * T


@pytest.mark.parametrize("n", [1, 2, 3, 31, 1000, 65537])
def test_permute_is_a_bijection_keyed_by_seed_and_epoch(n):
    i = np.arange(n, dtype=np.uint64)
    p = permute(i, n, seed=3, epoch=0)
    assert np.array_equal(np.sort(p), i)
    if n >= 1000:  # looks random: other keys agree on ~1/n of the points, no correlation with the index
        assert (p == permute(i, n, seed=3, epoch=1)).mean() < 0.01
        assert (p == permute(i, n, seed=4, epoch=0)).mean() < 0.01
        assert abs(np.corrcoef(i.astype(float), p.astype(float))[0, 1]) < 0.1


def test_shuffled_epoch_covers_every_window_once(prepared):
    data_dir, _ = prepared
    ld = TokenLoader(data_dir, seq_len=T, micro_batch_size=1, seed=5)
    n = ld.num_sequences
    ordered = TokenLoader(data_dir, seq_len=T, micro_batch_size=1, shuffle=False)
    ref = {tuple(x[0].tolist()): i for i, (x, _) in enumerate(ordered.epoch())}
    epoch0 = [ref[tuple(next(ld)[0][0].tolist())] for _ in range(n)]
    epoch1 = [ref[tuple(next(ld)[0][0].tolist())] for _ in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))  # reshuffled each epoch
    other_seed = TokenLoader(data_dir, seq_len=T, micro_batch_size=1, seed=6)
    assert [ref[tuple(next(other_seed)[0][0].tolist())] for _ in range(n)] != epoch0


def test_global_stream_does_not_depend_on_ranks(prepared):
    data_dir, _ = prepared
    one = _global_batches(_loaders(data_dir, 1, 2), 6)
    two = _global_batches(_loaders(data_dir, 2, 2), 6)
    four = _global_batches(_loaders(data_dir, 4, 1), 6)
    for a, b, c in zip(one, two, four, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("before, after", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_resume_exact_across_rank_counts(prepared, before, after):
    data_dir, _ = prepared
    n_steps = TokenLoader(data_dir, seq_len=T, micro_batch_size=8).num_sequences // 8 + 3  # crosses an epoch
    reference = _global_batches(_loaders(data_dir, 1, 4), n_steps)
    k = n_steps - 5
    first = _loaders(data_dir, before, 8 // before // 2)
    _global_batches(first, k)
    states = [ld.state_dict() for ld in first]
    assert all(s == states[0] for s in states)  # the state is global: every rank saves the same
    assert states[0]["sequences_consumed"] == 8 * k
    resumed = _loaders(data_dir, after, 8 // after // 2, seed=3)
    for ld in resumed:
        ld.load_state_dict(states[0])
    for want, got in zip(reference[k:], _global_batches(resumed, 5), strict=True):
        assert torch.equal(want, got)


def test_resume_at_a_position_that_is_not_a_whole_number_of_new_steps(prepared):
    """A batch-size ramp in one process (micro-batch 2) stops after 6 sequences; 2 ranks with micro-batch 2
    (global batch 4, or 8) go on from sequence 6: the stream continues exactly where one process would."""
    data_dir, _ = prepared
    reference = torch.cat(_global_batches(_loaders(data_dir, 1, 2, gb=2), 11))  # 22 sequences in order
    ramp = _loaders(data_dir, 1, 2, gb=2)
    _global_batches(ramp, 3)
    state = ramp[0].state_dict()
    assert state["sequences_consumed"] == 6
    for gb in (4, 8):
        resumed = _loaders(data_dir, 2, 2, gb=gb)
        for ld in resumed:
            ld.load_state_dict(state)
        got = torch.cat(_global_batches(resumed, 16 // gb))
        assert torch.equal(got, reference[6:22])


def test_mid_step_resume_same_ranks_only(prepared):
    data_dir, _ = prepared
    ref = TokenLoader(data_dir, seq_len=T, micro_batch_size=2, global_batch_size=8, seed=1)
    batches = [next(ref) for _ in range(7)]
    ld = TokenLoader(data_dir, seq_len=T, micro_batch_size=2, global_batch_size=8, seed=1)
    for _ in range(5):
        next(ld)
    state = ld.state_dict()
    again = TokenLoader(data_dir, seq_len=T, micro_batch_size=2, global_batch_size=8, seed=1)
    again.load_state_dict(state)
    assert torch.equal(next(again)[0], batches[5][0]) and torch.equal(next(again)[0], batches[6][0])
    other = TokenLoader(data_dir, seq_len=T, micro_batch_size=4, global_batch_size=8, seed=1)
    with pytest.raises(UserError, match="middle of a step"):
        other.load_state_dict(state)
    changed = TokenLoader(data_dir, seq_len=T + 1, micro_batch_size=2, global_batch_size=8, seed=1)
    with pytest.raises(UserError, match="seq_len"):
        changed.load_state_dict(state)
    # states no loader writes: a micro-batch past the step (the position would never move again), a
    # negative position, or not a state at all
    for bad in ({**state, "micro": 4}, {**state, "micro": -1}, {**state, "sequences_consumed": -8}):
        with pytest.raises(UserError, match="loader state out of range"):
            again.load_state_dict(bad)
    position = "sequences_consumed"
    not_integers = ({**state, position: "8"}, {**state, position: 8.7}, {**state, "micro": True})
    for bad in ([1], None, {**state, "micro": "x"}, *not_integers):  # 8.7 was cut to 8, "8" read as 8
        with pytest.raises(UserError, match="not a TokenLoader state"):
            again.load_state_dict(bad)


def test_eval_epoch_is_finite_and_split_across_ranks(prepared):
    data_dir, _ = prepared
    full = [x for x, _ in TokenLoader(data_dir, "val", seq_len=T, micro_batch_size=3, shuffle=False).epoch()]
    n = TokenLoader(data_dir, "val", seq_len=T, micro_batch_size=3).num_sequences
    assert sum(len(x) for x in full) == n
    ranks = [
        list(
            TokenLoader(
                data_dir,
                "val",
                seq_len=T,
                micro_batch_size=1,
                global_batch_size=4,
                rank=r,
                world_size=2,
                shuffle=False,
            ).epoch()
        )
        for r in range(2)
    ]
    rows = sorted(tuple(x[0].tolist()) for r in ranks for x, _ in r)
    assert rows == sorted(tuple(row.tolist()) for x in full for row in x)


def test_ranks_taking_turns_read_the_one_process_pass(prepared):
    """micro_batches(range(r, n, R)) for r < R, interleaved, is epoch()'s pass in one process, the short
    last micro-batch included."""
    data_dir, _ = prepared
    ld = TokenLoader(data_dir, "val", seq_len=T, micro_batch_size=3, shuffle=False)
    full = list(ld.epoch())
    assert len(full[-1][0]) < 3 or ld.num_sequences % 3 == 0
    got = {}
    for rank in range(2):
        mine = range(rank, len(full), 2)
        got.update(zip(mine, ld.micro_batches(mine), strict=True))
    assert sorted(got) == list(range(len(full)))
    for i, (want_x, want_y) in enumerate(full):
        assert torch.equal(got[i][0], want_x) and torch.equal(got[i][1], want_y)
    with pytest.raises(IndexError, match=f"micro-batch {len(full)} of a pass that has {len(full)}"):
        next(ld.micro_batches([len(full)]))  # not an empty batch


def test_bad_shapes_and_missing_or_corrupt_data(prepared, tmp_path):
    data_dir, _ = prepared
    with pytest.raises(UserError, match="multiple of micro batch size"):
        TokenLoader(data_dir, seq_len=T, micro_batch_size=3, global_batch_size=8, world_size=2)
    with pytest.raises(UserError, match="global_batch_size=-2"):  # was accepted: the position never moved
        TokenLoader(data_dir, seq_len=T, micro_batch_size=2, global_batch_size=-2)
    with pytest.raises(UserError, match="global_batch_size=0"):  # was taken as "not given"
        TokenLoader(data_dir, seq_len=T, micro_batch_size=2, global_batch_size=0)
    with pytest.raises(UserError, match="seq_len=64.0"):
        TokenLoader(data_dir, seq_len=64.0)
    with pytest.raises(UserError, match="seed='x'"):
        TokenLoader(data_dir, seq_len=T, seed="x")
    with pytest.raises(UserError, match="seektrain prepare"):
        TokenLoader(tmp_path / "nothing", seq_len=T)
    with pytest.raises(UserError, match="fewer than seq_len"):
        TokenLoader(data_dir, "val", seq_len=10**7)
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    shard = bad / load_manifest(bad)["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        TokenLoader(bad, seq_len=T)
    TokenLoader(bad, seq_len=T, verify=False)  # size still right: only the checksum catches it
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(UserError, match="truncated"):
        TokenLoader(bad, seq_len=T, verify=False)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="corrupt manifest .*: delete .*, then run `seektrain prepare --out"):
        TokenLoader(bad, seq_len=T)  # which refuses to replace a folder without a readable manifest
    (bad / "manifest.json").unlink()  # or a folder of raw text: prepare from it, delete only a data dir
    with pytest.raises(UserError, match=r"manifest.json missing\): prepare one from raw text .*: delete it"):
        TokenLoader(bad, seq_len=T)


def test_few_shards_open_at_once(prepared, monkeypatch):
    import seektrain.data.loader as loader_module

    data_dir, _ = prepared
    free = TokenLoader(data_dir, seq_len=T, micro_batch_size=4, seed=2)
    monkeypatch.setattr(loader_module, "_OPEN_SHARDS", 2)
    capped = TokenLoader(data_dir, seq_len=T, micro_batch_size=4, seed=2)
    assert len(capped._files) > 3
    for _ in range(30):
        assert torch.equal(next(free)[0], next(capped)[0])
        assert len(capped._maps) <= 2
