"""Learning-rate schedules, batch-size ramp and the MTP weight schedule: pure functions of the step.

Being pure functions of the step (no hidden state), they resume exactly: the only state is the
step counter, which the checkpoint holds. Steps count from 1 (the first optimizer step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import accumulate

from seektrain.config import OptimConfig, TrainConfig


def lr_factor(
    step: int, total_steps: int, cfg: OptimConfig, token_fraction: Callable[[int], float] | None = None
) -> float:
    """Multiplier of `cfg.lr` at optimizer step `step` (1-based).

    `token_fraction(step)` (tokens seen before this step / all tokens) places the multistep
    milestones by tokens, as DeepSeek does; without a batch ramp it equals (step-1)/total_steps.
    """
    warmup = cfg.warmup_steps
    if warmup and step <= warmup:
        return step / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "multistep":
        frac = token_fraction(step) if token_fraction else (step - 1) / total_steps
        factor = 1.0
        for milestone, value in cfg.multistep_milestones:
            if frac >= milestone:
                factor = value
        return factor
    # (0, 1] after the last step at the peak: warmup's last, or the first step where there is no warmup
    # (counted from step 0 instead, no step would ever run at cfg.lr: a one-step run's at min_lr_ratio)
    peak = max(warmup, 1)
    progress = min((step - peak) / max(1, total_steps - peak), 1.0)
    if cfg.schedule == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_start = 1 - cfg.decay_fraction
        if progress <= decay_start or cfg.decay_fraction == 0:
            return 1.0
        t = (progress - decay_start) / cfg.decay_fraction
        return 1 - (1 - cfg.min_lr_ratio) * t
    raise AssertionError(f"unknown schedule {cfg.schedule}")


def global_batch_at(step: int, cfg: TrainConfig, ranks: int = 1) -> int:
    """Sequences in optimizer step `step`: ramps linearly from `batch_ramp_start` to the global batch
    over `batch_ramp_steps`, rounded down to whole units of one micro batch on each of `ranks` ranks
    (the step is what every rank's micro-batches add up to)."""
    gb = cfg.global_batch_size
    if not cfg.batch_ramp_steps or step > cfg.batch_ramp_steps:
        return gb
    unit = cfg.micro_batch_size * ranks
    start = cfg.batch_ramp_start
    value = start + (gb - start) * (step - 1) / cfg.batch_ramp_steps
    return max(start, int(value) // unit * unit)


def token_fraction(cfg: TrainConfig, ranks: int = 1) -> Callable[[int], float]:
    """step -> the fraction of the run's sequences in the steps before it (the multistep schedule's
    milestones are in tokens), without a table of every step: the batch ramp's steps are summed once (at
    most `batch_ramp_steps` of them) and every later step holds the full global batch."""
    ramp = min(cfg.batch_ramp_steps, cfg.steps)
    ramp_before = list(accumulate((global_batch_at(s, cfg, ranks) for s in range(1, ramp + 1)), initial=0))

    def before(step: int) -> int:
        done = min(step - 1, ramp)
        return ramp_before[done] + max(0, step - 1 - ramp) * cfg.global_batch_size

    total = max(before(cfg.steps + 1), 1)
    return lambda step: before(step) / total


def mtp_weight_at(step: int, total_steps: int, schedule: list, default: float) -> float:
    """λ for `step`: the last schedule entry whose fraction has been reached, else `default`."""
    frac = (step - 1) / total_steps
    weight = default
    for start, value in schedule:
        if frac >= start:
            weight = float(value)
    return weight
