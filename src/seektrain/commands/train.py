"""Train a model: `seektrain train` alone trains the `tiny` preset on Python's stdlib (prepared if missing).

Config comes from a preset (`--preset`, default tiny), a TOML file (`--config`) and `--set key=value`
overrides, in that order. The run directory holds config.toml, the data's tokenizer.json, metrics.jsonl,
tb/ (TensorBoard) and checkpoints/. `--resume auto` (the default) continues from the newest complete
checkpoint there.
SIGINT/SIGTERM write a checkpoint and exit 130/143.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML run config (sections model, data, train, …)")
    parser.add_argument(
        "--preset", metavar="NAME", help="a shipped run config: tiny (CPU demo) or small (GPU)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.steps=100 (repeatable)",
    )
    parser.add_argument(
        "--run-dir",
        metavar="DIR",
        help="run directory (default runs/PRESET or runs/CONFIG_NAME; for a run's own config.toml, that run)",
    )
    parser.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|PATH",
        help="auto: continue from the newest checkpoint in the run dir if any (default); "
        "never: start fresh; PATH: a checkpoint or run directory",
    )


def run(args: argparse.Namespace) -> int:
    from seektrain.config import load_config

    cfg = load_config(args.config, args.preset, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config, args.preset)

    from seektrain.distributed.env import destroy_process_group
    from seektrain.train.trainer import Trainer

    try:
        return Trainer(cfg, run_dir, resume=args.resume).fit()  # the Trainer is dropped on return
    finally:
        destroy_process_group()  # joined by the Trainer under torchrun


def default_run_dir(config: str | None, preset: str | None) -> Path:
    """runs/PRESET, or runs/CONFIG_NAME; a run's own config file (RUN/config.toml, or a checkpoint's,
    which resume refusals point at) is that run's: `--config RUN/config.toml` continues RUN, not a new
    run in runs/config."""
    if config:
        from seektrain.checkpoint.manager import CONFIG_FILE
        from seektrain.train.metrics import METRICS_FILE

        path = Path(config)
        if path.name == CONFIG_FILE:
            run = path.parent.parent.parent if path.parent.parent.name == "checkpoints" else path.parent
            if (run / "checkpoints").is_dir() or (run / METRICS_FILE).is_file():
                return run
        return Path("runs") / path.stem
    return Path("runs") / (preset or "tiny")
