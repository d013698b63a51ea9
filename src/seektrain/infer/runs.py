"""Open a run directory for inference: its newest checkpoint's model and the tokenizer it was trained with.

The model config comes from the checkpoint itself (every checkpoint carries its resolved config), so
a run whose config.toml was edited later still loads the weights it saved. The tokenizer is
`RUN_DIR/tokenizer.json` when present (imported runs), else the one in the run's data directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from seektrain.checkpoint.manager import STATE_FILE, CheckpointManager, is_complete, load_checkpoint
from seektrain.checkpoint.sharded import is_sharded, read_model_state
from seektrain.config import RunConfig
from seektrain.errors import UserError
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class LoadedRun:
    model: Transformer  # in eval mode
    config: RunConfig  # as saved in the checkpoint
    checkpoint: Path
    step: int
    run_dir: Path

    @property
    def model_config(self) -> ModelConfig:
        return self.model.cfg


def find_checkpoint(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """`checkpoint` if given (a step_XXXXXXXX directory), else the run's newest complete checkpoint."""
    run = Path(run_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not is_complete(path):
            raise UserError(f"{path} is not a complete checkpoint (state.pt, meta.json, config.toml)")
        return path
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    latest = CheckpointManager(run / "checkpoints", keep=1).latest()
    if latest is None:
        raise UserError(
            f"{run} has no checkpoints (checkpoints/step_XXXXXXXX/): train it first with "
            f"`seektrain train --run-dir {run}`, or import one with `seektrain import`"
        )
    return latest


def load_run(
    run_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: str | os.PathLike | None = None,
) -> LoadedRun:
    """The model of a run's newest (or the given) checkpoint, on `device` in `dtype`
    (the routers' correction biases stay fp32)."""
    path = find_checkpoint(run_dir, checkpoint)
    state = _load_state(path)
    if "model" not in state and is_sharded(path):  # written by several ranks: weights in path/dcp
        state["model"] = read_model_state(path)
    if "model" not in state or "config" not in state:
        raise UserError(f"{path / 'state.pt'} is not a seektrain checkpoint (no model or config)")
    config = RunConfig.from_dict(state["config"])
    with torch.device("meta"):
        model = Transformer(config.model_config())
    model.load_state_dict(state["model"], assign=True)
    model.to(device=device, dtype=dtype)
    for moe in model.moe_layers():  # routing stays in fp32 whatever the weights' dtype
        moe.e_score_correction_bias.data = moe.e_score_correction_bias.data.float()
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    step = int(path.name.removeprefix("step_")) if path.name.startswith("step_") else -1
    return LoadedRun(model=model.eval(), config=config, checkpoint=path, step=step, run_dir=Path(run_dir))


def _load_state(path: Path) -> dict:
    """The checkpoint memory-mapped: only the model's tensors are read, not the optimizer's moments
    (2x the weights) that share the file."""
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file (mmap needs one): read it the ordinary way
        return load_checkpoint(path)


def data_dir_of(run: LoadedRun) -> Path:
    """The run's data directory as recorded; a relative path is tried from the cwd, then from the
    run's project root (runs/NAME -> ./data/NAME)."""
    data = Path(run.config.data.path)
    if data.is_absolute() or data.exists():
        return data
    beside = run.run_dir.resolve().parent.parent / data  # runs/NAME -> ./data/NAME
    return beside if beside.exists() else data


def tokenizer_path(run: LoadedRun) -> Path:
    """RUN_DIR/tokenizer.json, else DATA_DIR/tokenizer.json; UserError when neither exists."""
    candidates = [run.run_dir / TOKENIZER_FILE, data_dir_of(run) / TOKENIZER_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"no tokenizer for {run.run_dir}: neither {candidates[0]} nor {candidates[1]} exists "
        "(pass --tokenizer FILE)"
    )
