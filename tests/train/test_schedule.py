"""Learning-rate schedules, batch ramp and λ schedule at their key points (exact arithmetic)."""

import math

import pytest

from seektrain.config import OptimConfig, TrainConfig
from seektrain.train.schedule import global_batch_at, lr_factor, mtp_weight_at, token_fraction


def cfg(**kw):
    return OptimConfig(**{"warmup_steps": 10, **kw})


def test_warmup_is_linear_for_every_schedule():
    for name in ("cosine", "wsd", "multistep", "constant"):
        c = cfg(schedule=name)
        assert lr_factor(1, 100, c) == pytest.approx(0.1)
        assert lr_factor(5, 100, c) == pytest.approx(0.5)
        assert lr_factor(10, 100, c) == pytest.approx(1.0)


def test_cosine_key_points():
    c = cfg(schedule="cosine", min_lr_ratio=0.01)
    assert lr_factor(11, 110, c) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 100)))
    assert lr_factor(60, 110, c) == pytest.approx(0.01 + 0.99 * 0.5)  # halfway after warmup
    assert lr_factor(110, 110, c) == pytest.approx(0.01)  # ends at min_lr_ratio
    values = [lr_factor(s, 110, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_without_warmup_the_first_step_runs_at_the_peak():
    """Counted from step 0, a run without warmup never used cfg.lr: its first step was already on the
    decay (a one-step run's only step at min_lr_ratio)."""
    for name in ("cosine", "wsd"):
        c = cfg(schedule=name, warmup_steps=0, min_lr_ratio=0.1)
        assert lr_factor(1, 1, c) == 1.0 and lr_factor(1, 100, c) == 1.0
        assert lr_factor(100, 100, c) == pytest.approx(0.1)
    c = cfg(schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(51, 101, c) == pytest.approx(0.5)  # halfway between step 1 and the last


def test_wsd_key_points():
    c = cfg(schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(11, 110, c) == 1.0
    assert lr_factor(90, 110, c) == 1.0  # progress 0.8: still stable
    assert lr_factor(100, 110, c) == pytest.approx(0.5)  # half of the decay
    assert lr_factor(110, 110, c) == pytest.approx(0.0)


def test_multistep_by_tokens():
    c = cfg(schedule="multistep", warmup_steps=0)
    assert lr_factor(1, 100, c) == 1.0
    assert lr_factor(80, 100, c) == 1.0  # 79 % of tokens seen before step 80
    assert lr_factor(81, 100, c) == 0.316
    assert lr_factor(91, 100, c) == 0.1
    # with a batch ramp the milestones follow tokens, not steps
    assert lr_factor(50, 100, c, token_fraction=lambda s: 0.85) == 0.316


def test_constant():
    assert lr_factor(500, 1000, cfg(schedule="constant")) == 1.0


def test_batch_ramp():
    t = TrainConfig(micro_batch_size=2, global_batch_size=16, batch_ramp_steps=8, batch_ramp_start=4)
    sizes = [global_batch_at(s, t) for s in range(1, 12)]
    assert sizes[0] == 4 and sizes[-1] == 16 and all(s % 2 == 0 for s in sizes)
    assert all(a <= b for a, b in zip(sizes, sizes[1:], strict=False))
    assert global_batch_at(3, TrainConfig(global_batch_size=16, micro_batch_size=2)) == 16
    # Under torchrun a step is whole micro-batches on every rank: 2 ranks of micro 2 -> multiples of 4,
    # which is what the trainer both runs and logs.
    t = TrainConfig(micro_batch_size=2, global_batch_size=24, batch_ramp_steps=4, batch_ramp_start=8)
    assert [global_batch_at(s, t, ranks=2) for s in range(1, 6)] == [8, 12, 16, 20, 24]
    assert [global_batch_at(s, t, ranks=4) for s in range(1, 6)] == [8, 8, 16, 16, 24]


def test_token_fraction_matches_the_table_of_every_step_without_making_it():
    """The sequences before each step over all of them, under a ramp and without; a run of 10^12 steps
    (whose per-step table would not fit in memory) is answered at once."""
    for ramp in (0, 7):
        t = TrainConfig(
            steps=20, micro_batch_size=2, global_batch_size=16, batch_ramp_steps=ramp, batch_ramp_start=4
        )
        sizes = [global_batch_at(s, t, ranks=2) for s in range(1, 21)]
        fraction = token_fraction(t, ranks=2)
        for step in range(1, 21):
            assert fraction(step) == sum(sizes[: step - 1]) / sum(sizes)
    huge = TrainConfig(steps=10**12, micro_batch_size=2, global_batch_size=16)
    assert token_fraction(huge)(10**12 // 2 + 1) == 0.5


def test_mtp_weight_schedule():
    sched = [[0.0, 0.3], [0.7, 0.1]]
    assert mtp_weight_at(1, 100, sched, 0.5) == 0.3
    assert mtp_weight_at(70, 100, sched, 0.5) == 0.3
    assert mtp_weight_at(71, 100, sched, 0.5) == 0.1
    assert mtp_weight_at(10, 100, [], 0.5) == 0.5
