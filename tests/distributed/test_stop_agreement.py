"""The ranks' agreement to stop on a signal (`Trainer._stopping`), on a real one-rank gloo group: a signal
that arrives while a rank waits in the agreement's all-reduce is kept for the next step. It used to be
overwritten by the reduced "no", so a SIGTERM sent to torchrun was lost in 2 of 4 tries and the run went
on to the end without a checkpoint."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist

from seektrain.distributed.env import DistEnv
from seektrain.train.trainer import Trainer, _SignalFlag


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_signal_during_the_agreement_is_kept_for_the_next_step(one_rank_group, monkeypatch):
    trainer = Trainer.__new__(Trainer)  # only what `_stopping` reads
    trainer.dist, trainer.device = DistEnv(launched=True), torch.device("cpu")
    trainer.display = type("Display", (), {"closed": False})()
    real_all_reduce = dist.all_reduce

    def all_reduce_then_signal(tensor, *args, **kwargs):
        work = real_all_reduce(tensor, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as if it came while this rank waited in the collective
        return work

    stop = _SignalFlag(announce=False)
    try:
        monkeypatch.setattr(dist, "all_reduce", all_reduce_then_signal)
        assert not trainer._stopping(stop)  # the ranks agreed on "go on" before the signal came
        assert stop.signum == signal.SIGTERM
        monkeypatch.setattr(dist, "all_reduce", real_all_reduce)
        assert trainer._stopping(stop) and stop.signum == signal.SIGTERM  # the next step stops
    finally:
        stop.restore()
