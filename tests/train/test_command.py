"""`seektrain train` with no arguments: the tiny preset on data/stdlib, written to runs/tiny."""

import argparse
from pathlib import Path

from seektrain.commands import train
from seektrain.config import load_config


def test_no_arguments_mean_tiny_on_stdlib():
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.config, args.preset, args.overrides, args.resume) == (None, None, [], "auto")
    cfg = load_config(args.config, args.preset, args.overrides)
    assert cfg.model.preset == "tiny" and cfg.data.path == "data/stdlib" and cfg.train.precision == "auto"
    assert train.default_run_dir(None, None) == Path("runs/tiny")
    assert train.default_run_dir("configs/big_run.toml", None) == Path("runs/big_run")
    assert train.default_run_dir(None, "small") == Path("runs/small")


def test_a_runs_own_config_file_continues_that_run(tmp_path):
    """Resume refusals point at RUN/checkpoints/step_N/config.toml: given alone as --config, it made a new
    run in runs/config instead of continuing RUN."""
    run = tmp_path / "runs/mine"
    (run / "checkpoints/step_00000010").mkdir(parents=True)
    for config in (run / "config.toml", run / "checkpoints/step_00000010/config.toml"):
        assert train.default_run_dir(str(config), None) == run
    assert train.default_run_dir(str(tmp_path / "elsewhere/config.toml"), None) == Path("runs/config")
