"""ModelConfig: presets, validation messages, (de)serialization, parameter counts."""

import dataclasses
import json
import math

import pytest
import torch

from seektrain.errors import UserError
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer


def meta_params(cfg: ModelConfig, include_mtp: bool) -> int:
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for n, p in model.named_parameters() if include_mtp or not n.startswith("mtp."))


def test_preset_names():
    assert ModelConfig.preset_names() == ["tiny", "small", "v2-lite", "v3"]


# The figures transformers' own DeepseekV3Config gives for these dimensions (main model, no MTP).
@pytest.mark.parametrize("name, expected", [("v2-lite", 15_706_484_224), ("v3", 671_026_404_352)])
def test_published_parameter_counts_on_meta(name, expected):
    cfg = ModelConfig.from_preset(name)
    assert meta_params(cfg, include_mtp=False) == expected
    assert cfg.num_params() == expected


@pytest.mark.parametrize("name", ModelConfig.preset_names())
def test_arithmetic_counts_match_the_meta_model(name):
    cfg = ModelConfig.from_preset(name)
    assert cfg.num_params(include_mtp=True) == meta_params(cfg, include_mtp=True)


def test_small_preset_sizes():
    cfg = ModelConfig.from_preset("small")
    assert round(cfg.num_params() / 1e9, 2) == 1.26
    assert 215e6 < cfg.num_active_params() < 230e6  # ~223M active (input embedding excluded)


def test_tiny_exercises_every_feature_and_is_small():
    cfg = ModelConfig.from_preset("tiny")
    assert cfg.num_params(include_mtp=True) <= 10_000_000
    assert cfg.q_lora_rank is not None
    assert cfg.first_k_dense_replace >= 1 and cfg.num_moe_layers >= 2
    assert cfg.n_shared_experts >= 1 and cfg.n_routed_experts > cfg.num_experts_per_tok
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    assert cfg.num_mtp_layers == 1


@pytest.mark.parametrize("name", ModelConfig.preset_names())
def test_dict_round_trip_is_json_safe(name):
    cfg = ModelConfig.from_preset(name)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert None not in d.values()
    assert ModelConfig.from_dict(d) == cfg


def test_from_dict_with_preset_key_and_overrides():
    cfg = ModelConfig.from_dict({"preset": "small", "num_hidden_layers": 2})
    assert cfg == dataclasses.replace(ModelConfig.from_preset("small"), num_hidden_layers=2)


def test_unknown_key_names_the_closest_valid_ones():
    with pytest.raises(UserError, match=r"'hiden_size'.*did you mean hidden_size"):
        ModelConfig.from_dict({"hiden_size": 64})
    with pytest.raises(UserError, match=r"unknown model preset 'tinny'.*tiny"):
        ModelConfig.from_preset("tinny")


YARN = {"type": "yarn", "factor": 4}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_routed_experts=10, n_group=4), "divisible by n_group"),
        (dict(topk_group=5), "topk_group .5. exceeds n_group"),
        (dict(num_experts_per_tok=9), "exceeds the 8 experts the group limit allows"),
        (dict(qk_rope_head_dim=15), "qk_rope_head_dim must be even"),
        (dict(first_k_dense_replace=9), "exceeds num_hidden_layers"),
        (dict(hidden_size=0), "hidden_size must be >= 1"),
        (dict(hidden_size="256"), "hidden_size must be an integer"),
        (dict(rope_scaling={"type": "yarn", "factor": 4, "fctor": 2}), "unknown keys"),
        (dict(rope_scaling={"type": "linear", "factor": 4}), "must be 'yarn'"),
        # YaRN fields that built a model whose first forward failed (log of 0 or of a negative number)
        (dict(rope_scaling={**YARN, "original_max_position_embeddings": 0}), "integer >= 1"),
        (dict(rope_scaling={**YARN, "original_max_position_embeddings": 64.9}), "integer"),
        (dict(rope_scaling={**YARN, "beta_fast": -1}), "beta_fast must be > 0"),
        (dict(rope_scaling={**YARN, "beta_slow": 0}), "beta_slow must be > 0"),
        (dict(rope_scaling=YARN, rope_theta=1.0), "rope_theta must be > 1, got 1.0"),
        # values that built a model that trains, but not as anyone would mean it
        (dict(rope_theta=1.0), "rope_theta must be > 1, got 1.0"),
        (dict(rope_scaling={**YARN, "beta_fast": 1, "beta_slow": 32}), r"beta_fast \(1\) must exceed beta_"),
        (dict(rope_scaling={**YARN, "mscale": -5}), "rope_scaling.mscale must be >= 0, got -5"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be > 0, got 0.0"),
        (dict(initializer_range=0.0), "initializer_range must be > 0, got 0.0"),
        (dict(rms_norm_eps=1e30), r"rms_norm_eps must be in \(0, 1\), got 1e\+30"),
        (dict(eos_token_id=9000), "eos_token_id"),
        (dict(mtp_input="pre-norm"), "mtp_input must be one of 'normed', 'unnormed', got 'pre-norm'"),
    ],
)
def test_inconsistent_configs_fail_at_construction(change, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(ModelConfig.from_preset("tiny"), **change)


def test_all_problems_in_one_message():
    with pytest.raises(UserError) as err:
        dataclasses.replace(ModelConfig.from_preset("tiny"), qk_rope_head_dim=7, n_group=3)
    assert "qk_rope_head_dim" in str(err.value) and "n_group" in str(err.value)


def test_yarn_softmax_scale():
    cfg = ModelConfig.from_preset("v3")
    mscale = 0.1 * 1.0 * math.log(40.0) + 1.0  # mscale_all_dim = 1, factor = 40
    assert cfg.softmax_scale() == pytest.approx(192**-0.5 * mscale**2, rel=1e-12)
    assert ModelConfig.from_preset("tiny").softmax_scale() == 48**-0.5
