"""RunConfig: everything one training run needs, as typed dataclasses read from TOML.

Sources, applied in order: a preset (`configs/NAME.toml`, shipped in the package), a TOML file, then
`--set section.key=value` overrides. Unknown keys and bad values raise `UserError` naming the key and
the closest valid ones. The resolved config (every value spelled out) is written to the run directory
and into every checkpoint, so a run can always be reproduced from its own files.

The `model` section is a model preset name plus overrides of any `ModelConfig` field; it resolves
to a `ModelConfig` through `RunConfig.model_config()`.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from seektrain.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _opt(default: Any, help: str, choices: tuple | None = None, aliases: dict | None = None) -> Any:
    """A dataclass field with its help text (used by the generated config reference), choices, and
    aliases: older spellings still read (e.g. a former bool), mapped to the current value."""
    meta = {"help": help, "choices": choices, "aliases": aliases or {}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    path: str = _opt("data/stdlib", "prepared data directory (`seektrain prepare --out`)")
    seq_len: int = _opt(256, "tokens per training sequence")

    def validate(self) -> None:
        _positive(self, "seq_len")
        if not self.path.strip():
            raise UserError("data.path is empty: give a prepared data directory (`seektrain prepare --out`)")


@dataclass
class TrainConfig:
    steps: int = _opt(1000, "optimizer steps in the whole run")
    micro_batch_size: int = _opt(8, "sequences per forward/backward")
    global_batch_size: int = _opt(8, "sequences per optimizer step (a multiple of micro batch × ranks)")
    batch_ramp_steps: int = _opt(0, "grow the global batch linearly over this many steps (0 = off)")
    batch_ramp_start: int = _opt(
        0, "global batch at step 1 while ramping (required then: a multiple of micro batch × ranks)"
    )
    precision: str = _opt(
        "fp32",
        "fp32, bf16 (autocast, fp32 master weights), fp16 (GradScaler), or auto: bf16 where the device "
        "computes it natively (CUDA GPUs from Ampere on; CPUs with AVX-512 BF16 or AMX), else fp32",
        ("fp32", "bf16", "fp16", "auto"),
    )
    grad_clip: float = _opt(1.0, "clip gradients to this global L2 norm (0 = off; the norm is logged)")
    seed: int = _opt(0, "seed for weights and data order")
    device: str = _opt("auto", "auto (cuda if available), cpu or cuda", ("auto", "cpu", "cuda"))
    eval_every: int = _opt(
        100, "evaluate val_loss at step 0, every N steps and at the end (0 = at step 0 and the end only)"
    )
    eval_batches: int = _opt(
        20, "micro-batches of the validation split per evaluation, the same on any number of ranks (0 = all)"
    )
    log_every: int = _opt(10, "write a metrics line every N steps")
    compile: bool = _opt(False, "torch.compile each transformer block and the loss head")
    cuda_graphs: bool = _opt(
        False, "with compile, on a GPU: replay each block's kernels as CUDA graphs (less host overhead)"
    )
    activation_checkpointing: str = _opt(
        "none",
        "recompute activations in the backward pass to save memory: none; full (keep each block's input); "
        "selective (also keep GEMM and attention outputs, recompute the rest)",
        ("none", "full", "selective"),
        aliases={True: "full", False: "none"},
    )
    bias_update_speed: float = _opt(
        0.001, "γ of aux-loss-free balancing: bias += γ·sign(mean_load − load); 0 = off"
    )
    mtp_weight_schedule: list = _opt(
        [],
        "MTP loss weight λ over the run as [[fraction, λ], …], "
        "e.g. [[0, 0.3], [0.7, 0.1]]; empty = model.mtp_loss_weight",
    )
    max_bad_steps: int = _opt(
        5, "roll back to the last checkpoint after this many consecutive non-finite steps"
    )
    spike_zscore: float = _opt(
        6.0, "roll back when the loss exceeds the window mean by this many σ (0 = off)"
    )
    spike_window: int = _opt(50, "number of recent losses the spike detector compares against")

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_every", "max_bad_steps"):
            _positive(self, name)
        for name in (
            "batch_ramp_steps",
            "batch_ramp_start",
            "eval_every",
            "eval_batches",
            "grad_clip",
            "bias_update_speed",
            "spike_zscore",
        ):
            _non_negative(self, name)
        if self.global_batch_size % self.micro_batch_size:
            raise UserError(
                f"train.micro_batch_size={self.micro_batch_size} does not divide "
                f"train.global_batch_size={self.global_batch_size}"
            )
        if self.batch_ramp_steps:
            start = self.batch_ramp_start
            if not 0 < start <= self.global_batch_size or start % self.micro_batch_size:
                raise UserError(
                    f"train.batch_ramp_start={start} must be a positive multiple of "
                    f"train.micro_batch_size={self.micro_batch_size}, at most train.global_batch_size"
                )
        if self.spike_window < 2:
            raise UserError(f"train.spike_window={self.spike_window} must be at least 2")
        if self.cuda_graphs and not self.compile:
            raise UserError("train.cuda_graphs replays the compiled blocks: set train.compile=true too")
        if self.cuda_graphs and self.activation_checkpointing != "none":
            raise UserError("train.cuda_graphs with activation checkpointing is not supported yet")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"train.seed={self.seed} must be in [0, 2**32) (numpy's seed range)")
        _check_fraction_schedule(self.mtp_weight_schedule, "train.mtp_weight_schedule", "λ")


@dataclass
class OptimConfig:
    name: str = _opt("adamw", "adamw (fused where available) or lamb", ("adamw", "lamb"))
    lr: float = _opt(3e-4, "peak learning rate")
    weight_decay: float = _opt(0.1, "decoupled weight decay, applied to matrices only")
    beta1: float = _opt(0.9, "first-moment decay")
    beta2: float = _opt(0.95, "second-moment decay")
    eps: float = _opt(1e-8, "denominator epsilon")
    state_dtype: str = _opt(
        "fp32",
        "AdamW's moments in fp32, or bf16 (half their memory and traffic, as DeepSeek-V3; for β2 ≤ ~0.99)",
        ("fp32", "bf16"),
    )
    schedule: str = _opt(
        "cosine",
        "cosine, wsd (warmup-stable-decay), multistep (DeepSeek) or constant",
        ("cosine", "wsd", "multistep", "constant"),
    )
    warmup_steps: int = _opt(100, "linear warmup from 0 to lr over this many steps")
    min_lr_ratio: float = _opt(0.01, "final lr as a fraction of lr (cosine and wsd)")
    decay_fraction: float = _opt(
        0.2, "wsd: fraction of the steps after warmup spent in the final linear decay"
    )
    multistep_milestones: list = _opt(
        [[0.8, 0.316], [0.9, 0.1]], "multistep: [[fraction of tokens, lr factor], …]"
    )

    def state_bytes_per_param(self) -> int:
        """What the optimizer keeps per parameter: two moments (AdamW, LAMB), fp32 or bf16."""
        return 4 if self.state_dtype == "bf16" else 8

    def validate(self) -> None:
        _positive(self, "lr")
        if self.state_dtype != "fp32" and self.name != "adamw":
            raise UserError(f"optim.state_dtype={self.state_dtype} is for adamw, not {self.name}")
        _positive(self, "eps")  # 0 divides by sqrt(v) = 0 where a gradient was 0
        if self.eps >= 1:  # it is added to sqrt(v), of gradients' size: this large, no weight moves
            raise UserError(f"optim.eps={self.eps} must be below 1 (typically 1e-8)")
        for name in ("weight_decay", "warmup_steps"):
            _non_negative(self, name)
        if self.lr * self.weight_decay >= 1:  # decoupled decay multiplies each weight by 1 - lr·wd
            raise UserError(
                f"optim.lr × optim.weight_decay = {self.lr * self.weight_decay:g} must be below 1: each step "
                "would shrink every weight past zero"
            )
        for name in ("beta1", "beta2"):  # 1 would never move the moments (torch refuses it)
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise UserError(f"optim.{name}={value} must be in [0, 1)")
        for name in ("min_lr_ratio", "decay_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise UserError(f"optim.{name}={value} must be in [0, 1]")
        _check_fraction_schedule(
            self.multistep_milestones, "optim.multistep_milestones", "factor", lr_factors=True
        )


@dataclass
class CheckpointConfig:
    every: int = _opt(500, "save a checkpoint every N steps (also on SIGTERM/SIGINT and at the end)")
    keep: int = _opt(3, "keep the newest K checkpoints")
    async_save: bool = _opt(
        False,
        "under torchrun: write sharded checkpoints in a background thread while training goes on "
        "(completed at the next checkpoint or the end of the run)",
    )

    def validate(self) -> None:
        _positive(self, "every")
        _positive(self, "keep")


@dataclass
class LogConfig:
    progress: bool = _opt(True, "show a progress bar")
    tensorboard: bool = _opt(True, "write TensorBoard events to RUN_DIR/tb")

    def validate(self) -> None:
        pass


@dataclass
class ParallelConfig:
    dp_mode: str = _opt(
        "ddp",
        "under torchrun: ddp (replicate), fsdp (FSDP2, shard over all ranks) or hsdp (shard within groups "
        "of parallel.dp_shard ranks, replicate across them); one process: ignored",
        ("ddp", "fsdp", "hsdp"),
    )
    dp_shard: int = _opt(0, "hsdp: ranks per shard group (0 = the ranks of one node)")

    def validate(self) -> None:
        _non_negative(self, "dp_shard")


@dataclass
class ModelSection:
    """A model preset plus overrides of `ModelConfig` fields (checked against them)."""

    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        self.build()

    def build(self):
        from seektrain.model.config import ModelConfig

        if self.preset not in ModelConfig.preset_names():
            raise UserError(_unknown("model.preset", self.preset, ModelConfig.preset_names()))
        base = ModelConfig.from_preset(self.preset)
        for key in self.overrides:
            self.check_key(key)
        values = {k: _none_from_toml(v) for k, v in self.overrides.items()}
        return dataclasses.replace(base, **values)

    @staticmethod
    def check_key(key: str, origin: str = "") -> None:
        """UserError unless `key` is `preset` or a `ModelConfig` field, naming where it came from."""
        from seektrain.model.config import ModelConfig

        names = ["preset", *(f.name for f in dataclasses.fields(ModelConfig))]
        if key not in names:
            raise UserError(_unknown(f"model.{key}", None, [f"model.{n}" for n in names], origin))


SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
    "parallel": ParallelConfig,
}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def model_config(self):
        """The resolved `ModelConfig` (preset + overrides)."""
        return self.model.build()

    def validate(self) -> RunConfig:
        for name in ["model", *SECTIONS]:
            getattr(self, name).validate()
        if self.train.mtp_weight_schedule and not self.model_config().num_mtp_layers:
            raise UserError(  # it would change nothing, silently
                "train.mtp_weight_schedule weighs the MTP loss, but model.num_mtp_layers = 0: the model has "
                "no MTP module (set num_mtp_layers, or leave the schedule empty)"
            )
        return self

    def to_dict(self, resolved_model: bool = True) -> dict:
        """Plain dict for TOML. With `resolved_model`, the model section lists every ModelConfig field."""
        out: dict[str, Any] = {"model": {"preset": self.model.preset}}
        if resolved_model:
            resolved = self.model_config()
            out["model"].update({f.name: getattr(resolved, f.name) for f in dataclasses.fields(resolved)})
        else:
            out["model"].update(self.model.overrides)
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return _apply(cls(), d, "").validate()

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


# --- loading ---------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5]
        for p in resources.files("seektrain").joinpath("configs").iterdir()
        if p.name.endswith(".toml")
    )


def load_config(
    config: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """Resolve a RunConfig: preset (or `tiny` when neither preset nor file is given), file, overrides."""
    cfg = RunConfig()
    from_file: set[str] = set()  # section.key the config file set
    if preset is None and config is None:
        preset = "tiny"
    if preset is not None:
        names = preset_names()
        if preset not in names:
            raise UserError(_unknown("--preset", preset, names))
        text = resources.files("seektrain").joinpath("configs", f"{preset}.toml").read_text()
        cfg = _apply(cfg, parse_toml(text, f"preset {preset}"), f"preset {preset}")
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise UserError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is dropped
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}), as TOML must be") from None
        except OSError as e:
            raise UserError(f"config file {path}: cannot read it ({e.strerror or e})") from None
        values = parse_toml(text, str(path))
        cfg = _apply(cfg, values, str(path))
        from_file = {f"{section}.{key}" for section, table in values.items() for key in table}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set train.steps=100")
        section, _, name = key.strip().partition(".")
        cfg = _apply(cfg, {section: {name: parse_value(raw.strip(), _field_type(section, name))}}, "--set")
        from_file.discard(f"{section}.{name}")
    try:
        return cfg.validate()
    except UserError as e:  # a value the file set (and no --set replaced): the line names the file
        named = re.match(r"[a-z]+\.[a-z_0-9]+", str(e))
        if config is None or named is None or named.group() not in from_file:
            raise
        raise UserError(f"{config}: {e}") from None


def parse_value(raw: str, kind: Any = None) -> Any:
    """A `--set` value as TOML (numbers, booleans, lists, quoted strings), else the raw string; a number
    given to a key of `kind` str is the text as written (`--set data.path=2024` names a folder). TOML's
    dates and times, which no key takes, stay text too. (Booleans stay: some string keys take them as
    aliases; `_apply` gives the others the text.)"""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, (datetime.date, datetime.time)) or (kind is str and number):
        return raw
    return value


def _field_type(section: str, name: str) -> Any:
    """The type of config key section.name, None where there is no such key (reported by `_apply`)."""
    cls = SECTIONS.get(section)
    return typing.get_type_hints(cls).get(name) if cls is not None else None


def parse_toml(text: str, origin: str) -> dict:
    """TOML text as a dict (tomllib, or tomli before Python 3.11); a syntax error is a UserError naming
    `origin`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{origin}: not valid TOML: {e}") from None


def _apply(cfg: RunConfig, d: dict, origin: str) -> RunConfig:
    """A copy of cfg with the values of d (nested {section: {key: value}}) checked and set."""
    sections = ["model", *SECTIONS]
    updates: dict[str, Any] = {}
    for section, values in d.items():
        if section not in sections:
            raise UserError(_unknown(section, None, sections, origin))
        if not isinstance(values, dict):
            raise UserError(f"{origin}: [{section}] must be a table of keys")
        if section == "model":
            model = dataclasses.replace(cfg.model, overrides=dict(cfg.model.overrides))
            for key, value in values.items():
                ModelSection.check_key(key, origin)
                if key == "preset":
                    model.preset = _check_type("model.preset", value, str, origin)
                else:
                    model.overrides[key] = value
            updates["model"] = model
            continue
        current = getattr(cfg, section)
        hints = typing.get_type_hints(type(current))
        known = {f.name: f for f in dataclasses.fields(current)}
        changes = {}
        for key, value in values.items():
            if key not in known:
                raise UserError(_unknown(f"{section}.{key}", None, [f"{section}.{k}" for k in known], origin))
            aliases = known[key].metadata.get("aliases", {})
            if isinstance(value, bool) and value in aliases:
                value = aliases[value]
            elif isinstance(value, bool) and hints[key] is str and origin == "--set":
                value = str(value).lower()  # the text as written (`--set data.path=true` names a folder)
            value = _check_type(f"{section}.{key}", value, hints[key], origin)
            choices = known[key].metadata.get("choices")
            if choices and value not in choices:
                raise UserError(_unknown(f"{section}.{key}", value, list(choices), origin))
            changes[key] = value
        updates[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(cfg, **updates)


def _check_type(key: str, value: Any, kind: type, origin: str = "") -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and ok and not math.isfinite(value):
        ok = False
    where = f"{origin}: " if origin and origin != "--set" else ""
    if not ok:
        expected = "a finite float" if kind is float else kind.__name__
        raise UserError(f"{where}{key}={value!r}: expected {expected}")
    if kind is int and not -(2**63) <= value < 2**63:  # steps, sizes and seeds end up in int64 tensors
        raise UserError(f"{where}{key}={value}: out of range (a 64-bit integer)")
    return value


def _unknown(key: str, value: Any, valid: list[str], origin: str = "") -> str:
    where = f"{origin}: " if origin and origin != "--set" else ""
    if value is None:
        bare = {v.rpartition(".")[2]: v for v in valid}  # compare names without their shared section
        close = [bare[c] for c in difflib.get_close_matches(key.rpartition(".")[2], bare, n=3, cutoff=0.6)]
        hint = f"; did you mean {', '.join(close)}?" if close else f"; valid: {', '.join(valid)}"
        return f"{where}unknown config key {key!r}{hint}"
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=3, cutoff=0.5)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return f"{where}{key}={value!r} is not one of {', '.join(map(str, valid))}{hint}"


def _check_fraction_schedule(entries: list, key: str, value_name: str, lr_factors: bool = False) -> None:
    """[[fraction, value], …]: numbers, fractions increasing within [0, 1] (an unsorted list would let a
    later entry override an earlier one silently), values finite and ≥ 0; `lr_factors` in (0, 1]: a factor
    above 1 would lift the lr past its peak `optim.lr`, and 0 would train the rest of the run at lr 0."""
    from seektrain.model.config import is_finite_number

    values = f"{value_name} in (0, 1]" if lr_factors else f"{value_name} ≥ 0"
    last = -math.inf
    for entry in entries:
        ok = isinstance(entry, list) and len(entry) == 2 and all(is_finite_number(v) for v in entry)
        if ok:
            value = entry[1]
            ok = 0 <= entry[0] <= 1 and entry[0] > last and (0 < value <= 1 if lr_factors else value >= 0)
        if not ok:
            raise UserError(
                f"{key}: bad entry {entry!r}; expected [[fraction, {value_name}], …] with increasing "
                f"fractions in [0, 1] and {values}"
            )
        last = entry[0]


def _positive(section: Any, name: str) -> None:
    value = getattr(section, name)
    if value <= 0:
        raise UserError(f"{_section_name(section)}.{name}={value} must be positive")


def _non_negative(section: Any, name: str) -> None:
    value = getattr(section, name)
    if value < 0:
        raise UserError(f"{_section_name(section)}.{name}={value} must not be negative")


def _section_name(section: Any) -> str:
    return next(k for k, v in SECTIONS.items() if isinstance(section, v))


# --- TOML writing (tomllib reads only) -------------------------------------------------------------

_NONE = "none"  # TOML has no null: None model fields (e.g. q_lora_rank) are written as this string


def _none_from_toml(value: Any) -> Any:
    return None if value == _NONE else value


def dumps_toml(d: dict) -> str:
    """Write {section: {key: value}} as TOML; None becomes "none" (read back by ModelSection)."""
    lines = []
    for section, values in d.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if v is None:
        return f'"{_NONE}"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):  # JSON's string escapes are TOML's too, except that TOML also escapes DEL
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


# --- reference (README.md keeps this in sync; a test checks) ---------------------------------------


def config_reference() -> str:
    """The Markdown table of every config key with its default and help."""
    rows = [
        "| key | default | meaning |",
        "|---|---|---|",
        '| `model.preset` | `"tiny"` | model preset (`ModelConfig.from_preset`) |',
        "| `model.<field>` | preset's | override any `ModelConfig` field, e.g. `model.num_hidden_layers` |",
    ]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append(f"| `{section}.{f.name}` | `{_toml_value(default)}` | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_reference())
