"""What a resumed run may change and what it must keep: the checks between a checkpoint and this run's
config, each refusal naming the setting, the checkpoint and the way to continue."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from seektrain.checkpoint.manager import CONFIG_FILE, upgrade_config
from seektrain.config import RunConfig, parse_toml
from seektrain.errors import UserError

if TYPE_CHECKING:
    from seektrain.data.loader import TokenLoader

# Model fields a resume may change: no weight depends on them (the ids of BOS/PAD, which an export then
# import fills in from the tokenizer; the scale of the initial weights), or they weigh a loss term as the
# learning rate weighs a step (MTP's λ, which train.mtp_weight_schedule may change anyway; the balance α).
RESUMABLE_MODEL_CHANGES = {
    "preset",
    "bos_token_id",
    "pad_token_id",
    "initializer_range",
    "mtp_loss_weight",
    "seq_aux_loss_alpha",
}
# Model fields the data sets (`Trainer._open_inputs`): a check before the data is open leaves them out.
SET_BY_THE_DATA = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def check_same_model(saved: dict, cfg: RunConfig, path: Path) -> None:
    """The weights mean what they meant: every model field the same, but those no weight depends on."""
    now = cfg.to_dict()["model"]
    resumable = set(RESUMABLE_MODEL_CHANGES)
    if not saved.get("num_mtp_layers") and not now.get("num_mtp_layers"):
        resumable.add("mtp_input")  # no MTP module reads it
    keys = sorted(set(saved) | set(now))
    differing = [k for k in keys if k not in resumable and saved.get(k) != now.get(k)]
    if not differing:
        return
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in differing]
    if differing == ["mtp_input"] and saved.get("mtp_input") == "unnormed":
        advice = (
            "this checkpoint's MTP modules were trained on the hidden state before the final norm, as "
            "seektrain did before 2026-11-27: --set model.mtp_input=unnormed continues it as trained"
        )
    else:
        advice = f"use the same model config (--config {path / 'config.toml'} has it) or a new --run-dir"
    raise UserError(
        f"cannot resume from {path}: the model differs ({'; '.join(diffs[:4])}"
        f"{' …' if len(diffs) > 4 else ''}); {advice}"
    )


def check_before_data(path: Path, cfg: RunConfig) -> None:
    """The model, optimizer, sequence length and seed checks, before the data is opened, from the
    checkpoint's config.toml (the vocabulary and special ids, which the data sets, are left to the full
    check): a run this config cannot continue is refused before the default corpus is prepared for it."""
    config = path / CONFIG_FILE
    try:
        raw = parse_toml(config.read_text(encoding="utf-8"), str(config))
        saved = RunConfig.from_dict(upgrade_config({"config": raw})["config"]).to_dict()
    except (OSError, UnicodeDecodeError, UserError):
        return  # an older or damaged checkpoint: the full checks follow once it is loaded
    now = cfg.to_dict()["model"]
    check_same_model({**saved["model"], **{k: now.get(k) for k in SET_BY_THE_DATA}}, cfg, path)
    check_same_optimizer(saved["optim"], cfg, path)
    stream = {"seq_len": saved["data"]["seq_len"], "seed": saved["train"]["seed"]}
    _check_same_stream_settings(stream, {"seq_len": cfg.data.seq_len, "seed": cfg.train.seed}, path)


def check_same_optimizer(saved: dict, cfg: RunConfig, path: Path) -> None:
    """AdamW's moments mean something else to LAMB's trust ratio and back: the optimizer stays."""
    if saved.get("name", cfg.optim.name) != cfg.optim.name:
        raise UserError(
            f"cannot resume from {path}: optim.name was {saved['name']!r}, now {cfg.optim.name!r} "
            "(its state would not carry over); keep the optimizer or start a new --run-dir"
        )


def check_same_stream(saved: dict, now: dict, cfg: RunConfig, path: Path) -> None:
    """The token stream must go on where the checkpoint left it: the same data, sequence length and seed
    (the loader checks the rest of its state)."""
    _check_same_stream_settings(saved, now, path)
    if any(saved.get(key, now[key]) != now[key] for key in ("data", "num_sequences")):
        raise UserError(
            f"cannot resume from {path}: it was trained on other data than data.path={cfg.data.path!r} "
            f"holds now (another data dir, or this one prepared again from other inputs or settings); "
            f"{_stream_advice(path)}"
        )


def _check_same_stream_settings(saved: dict, now: dict, path: Path) -> None:
    """The sequence length and seed of the stream (`seq_len`, `seed` in both dicts) are the checkpoint's."""
    for key, setting in (("seq_len", "data.seq_len"), ("seed", "train.seed")):  # seq_len: before the count
        if saved.get(key, now[key]) != now[key]:
            raise UserError(
                f"cannot resume from {path}: {setting} was {saved[key]!r}, now {now[key]!r} (the run would "
                f"not continue the same token stream); {_stream_advice(path)}"
            )


def _stream_advice(path: Path) -> str:
    settings = path / CONFIG_FILE
    return f"use the run's settings (--config {settings} has them) or start a new run in a new --run-dir"


def validation_change(saved: dict, cfg: RunConfig, val: TokenLoader | None) -> list[str]:
    """A note where a resume changes which validation sequences val_loss averages over: `eval_batches`
    counts micro-batches, so a new micro batch size (as after running out of memory) moves it."""
    t = cfg.train
    before = saved.get("eval_batches", t.eval_batches) * saved.get("micro_batch_size", t.micro_batch_size)
    now = t.eval_batches * t.micro_batch_size
    if val is None or before == now or not (t.eval_batches and before):
        return []
    if min(before, now) >= val.num_sequences:  # both score the whole split
        return []
    same = ""
    if before % t.micro_batch_size == 0:
        same = f"; --set train.eval_batches={before // t.micro_batch_size} scores the same ones"
    return [
        f"val_loss now averages over the first {min(now, val.num_sequences)} validation sequences "
        f"(train.eval_batches={t.eval_batches} × micro batch {t.micro_batch_size}), the checkpoint's "
        f"evaluations over {min(before, val.num_sequences)}: its curve may step here{same}"
    ]
