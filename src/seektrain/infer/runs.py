"""Open a run directory for inference: its newest checkpoint's model and the tokenizer it was trained with.

The model config comes from the checkpoint itself (every checkpoint carries its resolved config), so
a run whose config.toml was edited later still loads the weights it saved. The tokenizer is
`RUN_DIR/tokenizer.json` when present (a trained run keeps its data's there, an imported one the
directory's), else the one in the run's data directory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from seektrain.checkpoint.manager import CheckpointManager, load_checkpoint, missing_files
from seektrain.checkpoint.sharded import is_sharded, read_model_state
from seektrain.config import RunConfig
from seektrain.data.shards import TOKENIZER_FILE
from seektrain.errors import UserError
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer

# The loader "version" of a run imported without data: `train --resume` then stops with this line.
WEIGHTS_ONLY = "weights only, imported without --data: to train, re-import with `seektrain import --data DIR`"


@dataclass
class LoadedRun:
    model: Transformer  # in eval mode
    config: RunConfig  # as saved in the checkpoint
    checkpoint: Path
    step: int
    run_dir: Path
    has_data: bool = True  # False when imported without --data: data.path is only a preset's default

    @property
    def model_config(self) -> ModelConfig:
        return self.model.cfg


def find_checkpoint(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """`checkpoint` if given (a step_XXXXXXXX directory), else the run's newest complete checkpoint."""
    run = Path(run_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_dir():
            why = "is not a directory" if path.exists() else "does not exist"
            raise UserError(f"checkpoint {path} {why}")
        if missing := missing_files(path):
            raise UserError(f"{path} is not a complete checkpoint: it lacks {', '.join(missing)}")
        return path
    if not run.is_dir():
        raise UserError(f"run directory {run} {'is not a directory' if run.exists() else 'does not exist'}")
    checkpoints = CheckpointManager(run / "checkpoints", keep=1)
    latest = checkpoints.latest()
    aside = [(p, final) for p, final in checkpoints.moved_aside() if not latest or final.name > latest.name]
    if aside:  # a save killed between its renames: `seektrain train` on the run puts it back
        p, final = aside[-1]
        said = f"{p.name} is {final.name}, moved aside by a killed save (`seektrain train --run-dir {run}`"
        said += " puts it back)"
        if latest is None:
            raise UserError(f"{run} has no checkpoint under its own name: {said}")
        print(f"note: {said}: using {latest.name}", file=sys.stderr)
    damaged = checkpoints.damaged()
    if latest is None and damaged:
        lacks = "; ".join(f"{p.name} lacks {', '.join(missing_files(p))}" for p in damaged[-3:])
        raise UserError(f"{run} has no complete checkpoint ({lacks})")
    if latest is None:
        raise UserError(
            f"{run} has no checkpoints (checkpoints/step_XXXXXXXX/): train it first with "
            f"`seektrain train --run-dir {run}`, or import one with `seektrain import`"
        )
    for path in damaged:
        if path.name > latest.name:  # the run's newest, but not whole: say which one is used instead
            lacks = ", ".join(missing_files(path))
            print(f"note: {path} lacks {lacks}: using {latest.name}", file=sys.stderr)
    return latest


def load_run(
    run_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: str | os.PathLike | None = None,
) -> LoadedRun:
    """The model of a run's newest (or the given) checkpoint, on `device` in `dtype`
    (the routers' correction biases stay fp32)."""
    for attempt in range(3):
        path = find_checkpoint(run_dir, checkpoint)
        try:
            state = load_checkpoint(path, mmap=True)  # only the model's tensors, not the optimizer's
            if "model" not in state and is_sharded(path):  # written by several ranks: weights in path/dcp
                state["model"] = read_model_state(path)
            break
        except UserError:
            # The newest checkpoint of a run in training can go while it is read (retention keeps
            # `checkpoint.keep`; a sharded one takes a while to read): then the newest again.
            if checkpoint is not None or path.exists() or attempt == 2:
                raise
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
    has_data = state.get("loader", {}).get("version") != WEIGHTS_ONLY
    return LoadedRun(model.eval(), config, path, step, Path(run_dir), has_data)


def data_dir_of(run: LoadedRun) -> Path | None:
    """The run's data directory as recorded (None for a run imported without data); a relative path is
    tried from the cwd, then from the run's project root (runs/NAME -> ./data/NAME)."""
    if not run.has_data:
        return None
    data = Path(run.config.data.path)
    if data.is_absolute() or data.exists():
        return data
    beside = run.run_dir.resolve().parent.parent / data  # runs/NAME -> ./data/NAME
    return beside if beside.exists() else data


def find_tokenizer(run: LoadedRun) -> Path | None:
    """RUN_DIR/tokenizer.json, else DATA_DIR/tokenizer.json; None when neither exists (a run imported
    without one)."""
    return next((p for p in _tokenizer_candidates(run) if p.is_file()), None)


def tokenizer_path(run: LoadedRun) -> Path:
    """`find_tokenizer`, or a UserError naming the files looked for."""
    path = find_tokenizer(run)
    if path is None:
        looked = " nor ".join(str(p) for p in _tokenizer_candidates(run))
        raise UserError(f"no tokenizer for {run.run_dir}: {looked} does not exist (pass --tokenizer FILE)")
    return path


def _tokenizer_candidates(run: LoadedRun) -> list[Path]:
    data = data_dir_of(run)
    return [run.run_dir / TOKENIZER_FILE] + ([data / TOKENIZER_FILE] if data is not None else [])


def run_tokenizer(run: LoadedRun, path: str | os.PathLike | None = None):
    """The tokenizer at `path`, else the run's (`tokenizer_path`), and its path; UserError when it has
    more tokens than the model's vocabulary (then it is not the tokenizer the model was trained with, and
    its extra ids would index past the embedding)."""
    from seektrain.data.tokenizer import load_tokenizer

    file = Path(path) if path is not None else tokenizer_path(run)
    tokenizer = load_tokenizer(str(file))
    check_tokenizer_fits(tokenizer, file, run.model.cfg.vocab_size)
    return tokenizer, file


def check_tokenizer_fits(tokenizer, path: Path, vocab_size: int) -> None:
    """UserError when `tokenizer` (read from `path`) has more tokens than a model of `vocab_size`."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise UserError(
            f"{path} has {size} tokens, more than the model's vocab_size {vocab_size}: "
            "it is not the tokenizer the model was trained with"
        )
