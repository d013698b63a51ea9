"""RunConfig: presets, files, --set overrides, and errors that name the key and the closest valid ones."""

import dataclasses
import re
from pathlib import Path

import pytest
import tomllib

from seektrain.config import RunConfig, config_reference, load_config, preset_names
from seektrain.errors import UserError

README = Path(__file__).resolve().parents[2] / "README.md"


def test_presets_load_and_validate():
    assert {"tiny", "small"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(preset=name)
        assert cfg.model.preset == name
        cfg.model_config()  # resolves against ModelConfig


def test_set_overrides_are_typed():
    cfg = load_config(
        overrides=[
            "train.steps=7",
            "optim.lr=1e-3",
            "optim.name=lamb",
            "train.compile=true",
            "model.num_hidden_layers=3",
            "train.mtp_weight_schedule=[[0, 0.3], [0.5, 0.1]]",
        ]
    )
    assert (
        cfg.train.steps == 7
        and cfg.optim.lr == 1e-3
        and cfg.optim.name == "lamb"
        and cfg.train.compile is True
    )
    assert cfg.model_config().num_hidden_layers == 3
    assert cfg.train.mtp_weight_schedule == [[0, 0.3], [0.5, 0.1]]
    assert load_config(overrides=["train.grad_clip=2"]).train.grad_clip == 2.0  # int accepted for float


def test_a_set_value_for_a_string_key_is_its_text():
    """A key that takes a string takes the text as written where TOML would read a number or a date
    (`--set data.path=2024-01-01` gave "expected str" with a Python repr); quoted text stays as quoted.
    Other keys still get their TOML types, and a date for one is reported as the text."""
    for raw in ("123", "2024-01-01", "1e3", "07:30:00"):
        assert load_config(overrides=[f"data.path={raw}"]).data.path == raw
    assert load_config(overrides=['data.path="x y"']).data.path == "x y"
    assert load_config(overrides=["data.path=true"]).data.path == "true"  # was "expected str"
    with pytest.raises(UserError, match=r"^train\.steps='2024-01-01': expected int$"):
        load_config(overrides=["train.steps=2024-01-01"])
    with pytest.raises(UserError, match=r"^data\.path is empty"):
        load_config(overrides=["data.path="])


@pytest.mark.parametrize(
    "value, mode", [("true", "full"), ("false", "none"), ('"selective"', "selective"), ("full", "full")]
)
def test_activation_checkpointing_reads_its_former_bool_too(value, mode):
    """Configs written before the selective mode existed (a bool) still load, as full / none."""
    cfg = load_config(overrides=[f"train.activation_checkpointing={value}"])
    assert cfg.train.activation_checkpointing == mode


def test_config_file_then_set(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\npreset = "tiny"\nhidden_size = 64\n[train]\nsteps = 11\n')
    cfg = load_config(config=f, overrides=["train.steps=12"])
    assert cfg.train.steps == 12 and cfg.model_config().hidden_size == 64


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.stpes=3", ["train.stpes", "train.steps"]),
        ("optim.learning_rate=1", ["optim.learning_rate", "optim.lr"]),
        ("model.hidden_sise=8", ["model.hidden_sise", "model.hidden_size"]),
        ("trian.steps=3", ["trian", "train"]),
        ("optim.schedule=cosin", ["optim.schedule", "cosine"]),
        ("train.precision=fp8", ["train.precision", "fp16"]),
        ("train.activation_checkpointing=some", ["train.activation_checkpointing", "selective"]),
        ("train.steps=abc", ["train.steps", "int"]),
        ("train.steps=0", ["train.steps", "positive"]),
        ("train.global_batch_size=12", ["micro_batch_size", "global_batch_size"]),
        ("model.n_group=3", ["n_group"]),
        ("train.seed=-1", ["train.seed", "2**32"]),
        ("train.seed=4294967296", ["train.seed", "2**32"]),  # numpy's seed would raise mid-setup
        ('optim.multistep_milestones=[["a", 1]]', ["optim.multistep_milestones", "increasing"]),
        ("optim.multistep_milestones=[[0.9, 0.1], [0.8, 0.316]]", ["optim.multistep_milestones", "[0.8"]),
        ("optim.multistep_milestones=[[0.8, 1.5]]", ["optim.multistep_milestones", "(0, 1]"]),  # above peak
        ("optim.multistep_milestones=[[0.8, 0]]", ["optim.multistep_milestones", "(0, 1]"]),  # lr 0 after 80%
        ("train.mtp_weight_schedule=[[-0.5, 0.1]]", ["train.mtp_weight_schedule", "-0.5"]),
        ("train.mtp_weight_schedule=[[0, 0.5]]\0model.num_mtp_layers=0", ["mtp_weight_schedule", "no MTP"]),
        ("train.steps=9223372036854775808", ["train.steps=9223372036854775808", "64-bit"]),  # 2**63
        ("checkpoint.every=-9223372036854775809", ["checkpoint.every", "64-bit"]),
        ("model.max_position_embeddings=9223372036854775808", ["max_position_embeddings", "64-bit"]),
        ("model.rope_theta=nan", ["rope_theta", "finite"]),
        ("model.rms_norm_eps=inf", ["rms_norm_eps", "finite"]),
        ('model.rope_scaling={type="yarn", factor=nan}', ["rope_scaling.factor", "finite"]),
        ('model.rope_scaling={type="yarn", factor=4, beta_fast=inf}', ["rope_scaling.beta_fast", "finite"]),
        ("optim.beta1=1.0", ["optim.beta1=1.0", "[0, 1)"]),  # torch refuses it mid-setup (a traceback)
        ("optim.beta2=1", ["optim.beta2=1", "[0, 1)"]),  # bf16 moments took it: every step NaN
        ("optim.eps=0", ["optim.eps", "positive"]),  # sqrt(v) = 0 where a gradient was 0: NaN
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(UserError) as e:
        load_config(overrides=override.split("\0"))  # NUL: between several overrides
    for word in words:
        assert word in str(e.value)


def test_a_type_error_in_a_config_file_names_the_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[train]\nsteps = "x"\n')
    with pytest.raises(UserError, match=f"^{f}: train.steps='x': expected int$"):
        load_config(config=f)


def test_a_value_out_of_range_in_a_config_file_names_the_file(tmp_path):
    """Type and key errors named the file, range and schedule errors (checked once all is read) did not;
    a value a --set replaces is not the file's to answer for."""
    f = tmp_path / "run.toml"
    f.write_text("[train]\nsteps = 0\n[optim]\nmultistep_milestones = [[0.9, 0.1], [0.8, 0.3]]\n")
    with pytest.raises(UserError, match=f"^{f}: optim.multistep_milestones: bad entry"):
        load_config(config=f, overrides=["train.steps=5"])
    with pytest.raises(UserError, match=r"^train.steps=0 must be positive$"):  # the --set's own value
        load_config(config=f, overrides=["train.steps=0", "optim.multistep_milestones=[]"])
    f.write_text("[train]\nsteps = 0\n")
    with pytest.raises(UserError, match=f"^{f}: train.steps=0 must be positive$"):
        load_config(config=f)
    f.write_text("[optim]\nbeta2 = 1.0\n")  # a key with a digit
    with pytest.raises(UserError, match=rf"^{f}: optim.beta2=1.0 must be in \[0, 1\)$"):
        load_config(config=f)


def test_a_mistake_in_a_config_files_model_table_names_the_file(tmp_path):
    """The model table's keys are checked where the file is read, as the other tables' are (they were
    checked later, when the model config was built, and the file went unnamed)."""
    f = tmp_path / "run.toml"
    for table, key in (("[model]\nhidden_sise = 64\n", "hidden_sise"), ("[model.sub]\nx = 1\n", "sub")):
        f.write_text(table)
        with pytest.raises(UserError, match=rf"^{f}: unknown config key 'model\.{key}'"):
            load_config(config=f)
    f.write_text("[model]\npreset = 5\n")
    with pytest.raises(UserError, match=f"^{f}: model.preset=5: expected str$"):
        load_config(config=f)


def test_a_config_file_with_a_byte_order_mark_loads(tmp_path):
    """Windows editors may start UTF-8 with a byte-order mark, which TOML does not allow: it is dropped."""
    f = tmp_path / "run.toml"
    f.write_bytes("\ufeff[train]\nsteps = 3\n".encode())
    assert load_config(config=f).train.steps == 3


def test_cuda_graphs_need_compile_and_no_activation_checkpointing():
    with pytest.raises(UserError, match="train.compile=true"):
        load_config(overrides=["train.cuda_graphs=true"])
    with pytest.raises(UserError, match="activation checkpointing"):
        load_config(
            overrides=["train.compile=true", "train.cuda_graphs=true", "train.activation_checkpointing=full"]
        )
    assert load_config(overrides=["train.compile=true", "train.cuda_graphs=true"]).train.cuda_graphs


def test_optimizer_values_that_would_stop_every_weight_are_refused():
    with pytest.raises(UserError, match=r"^optim.eps=1e\+30 must be below 1"):
        load_config(overrides=["optim.eps=1e30"])
    with pytest.raises(UserError, match=r"^optim.lr × optim.weight_decay = 2 must be below 1"):
        load_config(overrides=["optim.lr=2e-3", "optim.weight_decay=1000"])
    assert load_config(overrides=["optim.lr=1e-3", "optim.weight_decay=10"]).optim.weight_decay == 10


def test_bf16_moments_are_for_adamw():
    with pytest.raises(UserError, match="optim.state_dtype=bf16 is for adamw, not lamb"):
        load_config(overrides=["optim.name=lamb", "optim.state_dtype=bf16"])


def test_a_config_file_that_is_not_utf8_is_one_error(tmp_path):
    f = tmp_path / "run.toml"
    f.write_bytes(b"# caf\xe9 (Latin-1)\n[train]\nsteps = 3\n")
    with pytest.raises(UserError, match=f"^{f}: not UTF-8 text \\(byte 5\\), as TOML must be$"):
        load_config(config=f)


def test_strings_with_control_characters_survive_the_written_config():
    """config.toml is read back on resume and by --config: a path with a carriage return, an escape or
    DEL must be escaped (TOML forbids them raw; only \\, " and newline were)."""
    path = 'runs/a\rb\x1bc\x7fd\te "q" \\ é\n'
    cfg = load_config(overrides=["train.steps=5"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))
    again = RunConfig.from_dict(tomllib.loads(cfg.to_toml()))
    assert again.data.path == path


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="tiny"):
        load_config(preset="tinny")
    with pytest.raises(UserError, match="does not exist"):
        load_config(config=tmp_path / "nope.toml")
    with pytest.raises(UserError, match="is not a file"):
        load_config(config=tmp_path)  # a directory


def test_resolved_round_trip():
    cfg = load_config(overrides=["model.q_lora_rank=none", "train.steps=5", "optim.schedule=wsd"])
    text = cfg.to_toml()
    again = RunConfig.from_dict(tomllib.loads(text))
    assert again.to_toml() == text
    assert again.model_config() == cfg.model_config()
    assert again.model_config().q_lora_rank is None
    assert dataclasses.asdict(again.train) == dataclasses.asdict(cfg.train)


def test_readme_config_reference_in_sync():
    """README.md carries the generated table verbatim (regenerate with `python -m seektrain.config`)."""
    text = README.read_text()
    assert config_reference() in text, "README.md config reference is stale: run python -m seektrain.config"
    keys = set(re.findall(r"^\| `([a-z_]+\.[a-z_<>]+)`", config_reference(), flags=re.M))
    assert {"data.path", "train.steps", "optim.lr", "checkpoint.every", "parallel.dp_mode"} <= keys
