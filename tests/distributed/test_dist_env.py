"""The torchrun environment as the trainer reads it, and mistakes refused before any process group."""

from __future__ import annotations

import pytest

from seektrain.config import load_config
from seektrain.distributed.env import DistEnv, detect
from seektrain.errors import RanksError, UserError
from seektrain.train.trainer import Trainer

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h"}


def set_env(monkeypatch, env: dict[str, str]) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_detect(monkeypatch):
    set_env(monkeypatch, {})
    assert detect() == DistEnv() and not detect().distributed and detect().is_main
    set_env(monkeypatch, TORCHRUN)
    env = detect()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 4, 1, 2)
    assert env.distributed and not env.is_main
    set_env(monkeypatch, {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h"})
    assert detect().distributed  # one rank under torchrun still takes the distributed path


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "bad torchrun environment"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "bad torchrun environment"),
    ],
)
def test_bad_environment(monkeypatch, env, message):
    set_env(monkeypatch, env)
    with pytest.raises(UserError, match=message):
        detect()


def test_fp16_with_sharding_is_refused_before_joining(monkeypatch, toy, tmp_path):
    set_env(monkeypatch, TORCHRUN)
    cfg = load_config(
        None, "tiny", [*toy, "train.precision=fp16", "parallel.dp_mode=fsdp", "train.device=cpu"]
    )
    with pytest.raises(UserError, match="fp16 with parallel.dp_mode=fsdp"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_dp_mode_is_checked(toy):
    with pytest.raises(UserError, match="parallel.dp_mode='zero3' is not one of ddp, fsdp, hsdp"):
        load_config(None, "tiny", [*toy, "parallel.dp_mode=zero3"])


@pytest.mark.parametrize(
    "error, line",
    [
        (UserError("config file r.toml does not exist"), "error: rank 1: config file r.toml does not exist"),
        (RanksError("rank 1: no prepared data at data/x"), "error: rank 1: no prepared data at data/x"),
    ],
)
def test_a_rank_names_itself_once_under_other_launchers(monkeypatch, capsys, error, line):
    """Under a launcher that sets RANK but is not torchrun, ranks > 0 report at once with their rank; an
    error the ranks agreed on names the ranks already (it read `rank 1: rank 1: …`)."""
    import seektrain.commands.train as train_command
    from seektrain import cli

    set_env(monkeypatch, TORCHRUN)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def fail(args):
        raise error

    monkeypatch.setattr(train_command, "run", fail)
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err == line + "\n"
