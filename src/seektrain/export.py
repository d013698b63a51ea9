"""Run directory <-> Hugging Face model directory (the DeepSeek-V3 layout transformers, vLLM, lm-eval read).

`export_run` writes config.json + safetensors (`seektrain.interop.save_hf`), the tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) and generation_config.json into a
temporary directory beside the target and renames it into place at the end, so a failed export leaves
nothing behind and an existing non-empty target is refused, never touched.

`import_hf` turns such a directory into a run: config.toml, tokenizer.json and one checkpoint at step 0.
With a data directory the checkpoint is a complete trainer state (fresh optimizer, loader at the start
of that data), so `seektrain train --config RUN/config.toml --run-dir RUN` continues from the imported
weights; without one it holds the weights only (enough for generate, eval and export).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from seektrain.errors import UserError, first_line
from seektrain.paths import check_dir_target, recover_interrupted

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_FILE = "tokenizer.json"


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "fp32",
    checkpoint: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_file: str | os.PathLike | None = None,
) -> Path:
    """Write the run's newest (or the given) checkpoint as a transformers directory `out_dir`; returns it.
    The tokenizer is the run's (see `run_tokenizer`) unless `tokenizer_file` is given."""
    from seektrain.infer.runs import load_run, run_tokenizer
    from seektrain.interop import save_hf

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    _claim_target(out, "export target")
    run = load_run(run_dir, checkpoint=checkpoint)
    tokenizer, tok_file = run_tokenizer(run, tokenizer_file)
    specials = _special_tokens(tokenizer, run.model.cfg)
    cfg = dataclasses.replace(run.model.cfg, **{f"{role}_token_id": s["id"] for role, s in specials.items()})
    run.model.cfg = cfg  # config.json then names the same special ids as the tokenizer files

    def write(tmp: Path) -> None:
        save_hf(run.model, tmp, dtype=DTYPES[dtype], max_shard_bytes=max_shard_bytes)
        shutil.copyfile(tok_file, tmp / TOKENIZER_FILE)
        names = {f"{role}_token": s["token"] for role, s in specials.items()}
        _write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **names,
                "model_max_length": cfg.max_position_embeddings,
                "clean_up_tokenization_spaces": False,
                "add_bos_token": False,
                "add_eos_token": False,
            },
        )
        _write_json(tmp / "special_tokens_map.json", names)
        _write_json(
            tmp / "generation_config.json",
            {**{f"{role}_token_id": s["id"] for role, s in specials.items()}, "do_sample": False},
        )

    return _build_atomically(out, write)


def import_hf(
    hf_dir: str | os.PathLike,
    out_run: str | os.PathLike,
    data: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    notes: list[str] | None = None,
) -> Path:
    """Make run directory `out_run` from a transformers DeepSeek-V3 directory; returns it.
    `overrides` are `--set section.key=value` strings for the run config (not `model.*`); what was read
    otherwise than config.json says is appended to `notes` (`load_hf`)."""
    from seektrain.checkpoint.manager import CheckpointManager
    from seektrain.config import ModelSection, load_config
    from seektrain.infer.runs import WEIGHTS_ONLY, check_tokenizer_fits
    from seektrain.interop import load_hf

    out = Path(out_run)
    _claim_target(out, "import target")
    bad = [o for o in overrides if o.strip().startswith("model.")]
    if bad:
        raise UserError(f"--set {bad[0]}: the model comes from {hf_dir}/config.json and cannot be overridden")
    src = Path(hf_dir)
    model = load_hf(src, notes=notes)
    cfg = model.cfg
    tok_file = src / TOKENIZER_FILE
    tokenizer = _load_tokenizer(tok_file) if tok_file.is_file() else None
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, tok_file, cfg.vocab_size)
    run_cfg = load_config(None, None, overrides)
    if data is not None:
        run_cfg = dataclasses.replace(
            run_cfg, data=dataclasses.replace(run_cfg.data, path=str(Path(data).resolve()))
        )
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    run_cfg = dataclasses.replace(run_cfg, model=ModelSection(preset=run_cfg.model.preset, overrides=fields))
    run_cfg.validate()
    if data is not None:
        _check_same_tokenizer(tokenizer, Path(data), src)

    def write(tmp: Path) -> None:
        if tokenizer is not None:
            shutil.copyfile(tok_file, tmp / TOKENIZER_FILE)
        if data is None:
            # No data, so no loader/optimizer state: this loader "version" makes `train --resume` stop
            # with a clear error line (TokenLoader.load_state_dict names it) instead of a KeyError.
            state = {
                "model": model.state_dict(),
                "config": run_cfg.to_dict(),
                "loader": {"version": WEIGHTS_ONLY},
            }
            CheckpointManager(tmp / "checkpoints", keep=1).save(
                0, state, run_cfg.to_toml(), {"imported": str(src)}
            )
            (tmp / "config.toml").write_text(run_cfg.to_toml())
            return
        from seektrain.train.trainer import Trainer

        trainer = Trainer(run_cfg, tmp, resume="never")  # a fresh run on `data` ...
        try:
            trainer.model.load_state_dict(model.state_dict())  # ... that starts from the imported weights
            trainer.save_checkpoint()
            (tmp / "config.toml").write_text(trainer.cfg.to_toml())
        finally:
            trainer.close()

    return _build_atomically(out, write)


# --- helpers -----------------------------------------------------------------------------------------


def _claim_target(out: Path, what: str) -> None:
    """`_check_empty_target`, after removing the temp directory a killed export or import (SIGKILL, a
    power cut) left beside `out`, as a later prepare does for a killed one."""
    recover_interrupted(out)  # its own `.tmp-` dirs only: export and import never swap
    _check_empty_target(out, what)


def _check_empty_target(out: Path, what: str) -> None:
    check_dir_target(out, what)
    if out.resolve() == Path.cwd().resolve():  # built beside it and renamed over it: the shell's folder
        raise UserError(  # would be replaced by one it no longer sees (and the temp dir would sit inside)
            f"{what} {out} is the current folder, which the new directory would replace: name a folder "
            "below it, or run from another one"
        )
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{what} {out} exists and is not empty; choose a new directory (nothing was written)")


def _build_atomically(out: Path, write) -> Path:
    """Call write(tmp) on a temporary sibling of `out`, then rename it to `out` (an absent or empty dir)."""
    from safetensors import SafetensorError

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        _make_temp_dir(out, tmp)
        try:
            write(tmp)
        except OSError as e:  # a full disk or a quota halfway through; or an input that went away
            source = e.filename and not Path(e.filename).is_relative_to(tmp)
            what = f"read {e.filename}" if source else f"write {out}"
            raise UserError(f"cannot {what}: {e.strerror or first_line(e)}") from e
        except SafetensorError as e:  # safetensors' own writer: its I/O errors carry no file name
            raise UserError(f"cannot write {out}: {first_line(e)}") from e
        _make_readable(tmp)
        _check_empty_target(out, "target")  # it may have been filled meanwhile
        os.replace(tmp, out)  # POSIX rename replaces an empty directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _make_temp_dir(out: Path, tmp: Path) -> None:
    """Create `tmp` (and the folder that holds `out`); UserError when that folder cannot be written (no
    permission, a read-only or special filesystem), before anything is written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from e


def _make_readable(root: Path) -> None:
    """Files written via mkstemp are private (0600); an exported model is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _load_tokenizer(path: Path):
    from seektrain.data.tokenizer import load_tokenizer

    return load_tokenizer(str(path))


def _special_tokens(tokenizer, cfg) -> dict[str, dict]:
    """{"bos"|"eos"|"pad": {"token", "id"}}: the model's own ids where set, else found by name."""
    from seektrain.data.tokenizer import TokenizerConfig, special_tokens

    found = special_tokens(tokenizer, TokenizerConfig())
    for role in ("bos", "eos", "pad"):
        i = getattr(cfg, f"{role}_token_id")
        if i is not None and tokenizer.id_to_token(i) is not None:
            found[role] = {"token": tokenizer.id_to_token(i), "id": int(i)}
    return found


def _check_same_tokenizer(tokenizer, data: Path, src: Path) -> None:
    from seektrain.data.shards import tokenizer_file

    data_tok = tokenizer_file(data)
    if tokenizer is not None and _load_tokenizer(data_tok).get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"{data} was tokenized with another tokenizer than {src}; prepare it with "
            f"`seektrain prepare --tokenizer {src / TOKENIZER_FILE} …`"
        )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
