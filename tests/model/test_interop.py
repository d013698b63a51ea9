"""Parity with the real transformers DeepseekV3ForCausalLM loaded from our export, and export/import."""

import dataclasses
import json
import re

import pytest
import torch

from seektrain.errors import UserError
from seektrain.interop import load_hf, save_hf
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

# initializer_range 0.1 instead of 0.02 gives O(1) logits and peaked routing, so 1e-4 is a strict bound.
TINY = dataclasses.replace(ModelConfig.from_preset("tiny"), vocab_size=1024, initializer_range=0.1)
TOY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=512)  # fmt: skip
CONFIGS = {
    "tiny": TINY,
    # no q low-rank path, one expert group, YaRN RoPE with mscale (softmax scale and cos/sin amplitude)
    "no_q_lora_one_group_yarn": dataclasses.replace(
        TINY,
        **{**TOY, "q_lora_rank": None},
        n_group=1,
        topk_group=1,
        num_experts_per_tok=3,
        n_shared_experts=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        max_position_embeddings=256,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "beta_fast": 32,
            "beta_slow": 1,
        },  # fmt: skip
    ),
    # q low-rank, 8 groups of 2 with 3 kept, no dense layer, two MTP modules on the legacy pre-norm input
    # (carried through config.json), tied embeddings, and a large rms_norm_eps: the block norms take it,
    # the latent norms (q_a, kv_a) keep 1e-6 as in transformers
    "q_lora_eight_groups_tied": dataclasses.replace(
        TINY,
        **TOY,
        rms_norm_eps=1e-2,
        first_k_dense_replace=0,
        num_hidden_layers=3,
        n_group=8,
        topk_group=3,
        num_experts_per_tok=5,
        num_mtp_layers=2,
        mtp_input="unnormed",
        tie_word_embeddings=True,
    ),
}

# fp32 on both sides; the only differences are accumulation order (SDPA vs eager attention, grouped GEMM vs
# per-expert matmuls, sum over top-k vs index_add). Observed max |Δ| is ~1e-6 on logits of magnitude ~1.
TOL = 1e-4


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # a non-zero correction bias, so that parity covers it too
        for moe in model.moe_layers():
            moe.e_score_correction_bias.normal_(std=0.05)
    return model


def load_transformers(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def greedy(forward, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    ids = prompt
    for _ in range(steps):
        ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1] :]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_decoding_match_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    ours = build(cfg)
    save_hf(ours, tmp_path)
    theirs = load_transformers(tmp_path)
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"

    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(tokens).logits, theirs(tokens).logits
        assert (a - b).abs().max().item() <= TOL, (
            f"max |Δ| {(a - b).abs().max():.2e}, logits std {a.std():.2f}"
        )
        print(f"{name}: max |Δ| {(a - b).abs().max():.2e}, logits std {a.std():.2f}")
        ours_ids = greedy(lambda ids: ours(ids).logits, tokens[:, :8], 32)
        theirs_ids = greedy(lambda ids: theirs(ids).logits, tokens[:, :8], 32)
    assert torch.equal(ours_ids, theirs_ids)
    assert len(ours_ids.unique()) > 4  # a decode that repeats one token would prove little


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_then_import_is_bitwise(name, tmp_path):
    ours = build(CONFIGS[name])
    save_hf(ours, tmp_path)
    back = load_hf(tmp_path)
    assert back.cfg == ours.cfg
    want, got = ours.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k


def test_checkpoint_layout_uses_published_names(tmp_path):
    from safetensors import safe_open

    save_hf(build(TINY), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["rope_interleave"] is True and config["num_nextn_predict_layers"] == 1
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    L = TINY.num_hidden_layers
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.self_attn.q_a_proj.weight",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.1.mlp.gate.weight",
        f"model.layers.1.mlp.experts.{TINY.n_routed_experts - 1}.down_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        f"model.layers.{L}.eh_proj.weight",
        f"model.layers.{L}.enorm.weight",
        f"model.layers.{L}.shared_head.norm.weight",
        f"model.layers.{L}.shared_head.head.weight",
        f"model.layers.{L}.embed_tokens.weight",
        f"model.layers.{L}.mlp.experts.0.gate_proj.weight",
    ]:
        assert name in names, name


def test_sharded_bf16_export_loads_in_both(tmp_path):
    ours = build(TINY)
    save_hf(ours, tmp_path, dtype=torch.bfloat16, max_shard_bytes=2**20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    back = load_hf(tmp_path, dtype=torch.bfloat16)
    for k, v in ours.state_dict().items():
        want = v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
        assert torch.equal(back.state_dict()[k], want), k
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = torch.randint(0, TINY.vocab_size, (1, 16))
    with torch.no_grad():
        # both sides hold the same bf16-rounded weights, computed in fp32
        assert (back.float()(tokens).logits - theirs(tokens).logits).abs().max() <= TOL
    # a later unsharded save into the same directory removes the stale shards and index
    save_hf(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_import_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="model_type 'llama'"):
        load_hf(tmp_path)
    save_hf(build(TINY), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(UserError, match="do not match config.json"):
        load_hf(tmp_path)


def test_a_tied_config_with_a_distinct_head_imports_untied_as_transformers_loads_it(tmp_path):
    """`tie_word_embeddings: true` over files holding a different lm_head.weight: transformers keeps both
    tensors as stored; the import tied them to the head's and silently lost the embedding (generate then
    repeated one token). It now reads both, untied, and says so."""
    untied = build(TINY)
    save_hf(untied, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    notes: list[str] = []
    back = load_hf(tmp_path, notes=notes)
    assert not back.cfg.tie_word_embeddings and len(notes) == 1 and "imported untied" in notes[0]
    theirs = load_transformers(tmp_path)
    tokens = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, theirs(tokens).logits, rtol=0, atol=TOL)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(back.state_dict()[name], untied.state_dict()[name]), name
    tied = build(CONFIGS["q_lora_eight_groups_tied"])  # a truly tied export stays tied, without a note
    save_hf(tied, tmp_path / "tied")
    notes.clear()
    assert load_hf(tmp_path / "tied", notes=notes).cfg.tie_word_embeddings and not notes


def test_weights_that_do_not_fit_config_json_are_refused_before_the_model_is_allocated(tmp_path):
    """A config.json without its sizes reads as DeepSeek-V3's (hidden 7168, 61 layers, vocab 129280): the
    import allocated that whole model (hundreds of GB) before comparing it with the 8M-parameter weights.
    Run under a 6 GB address-space limit, where allocating first fails with an out-of-memory error."""
    import subprocess
    import sys

    save_hf(build(TINY), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from seektrain.errors import UserError
from seektrain.interop import load_hf
try:
    load_hf({str(tmp_path)!r})
except UserError as e:
    print("UserError:", e)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("UserError:") and "do not match config.json" in result.stdout, result


# config.json of the published deepseek-ai/DeepSeek-V3 (auto_map and quantization_config dropped).
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}  # fmt: skip


def test_published_v3_config_reads_as_the_v3_preset():
    from seektrain.model.hf import config_from_hf, hf_config

    assert config_from_hf(PUBLISHED_V3) == ModelConfig.from_preset("v3")
    assert config_from_hf(
        hf_config(ModelConfig.from_preset("v3"), torch.bfloat16)
    ) == ModelConfig.from_preset("v3")
    fp8 = {**PUBLISHED_V3, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}
    with pytest.raises(UserError, match="fp8-quantized"):
        config_from_hf(fp8)


def test_an_export_from_before_mtp_input_imports_its_mtp_as_trained():
    """A published config (no "seektrain" table) means DeepSeek's MTP input, after the final norm; a
    seektrain export whose table lacks `mtp_input` predates it, and its MTP modules read the pre-norm
    state. Without MTP modules nothing reads it."""
    from seektrain.model.hf import config_from_hf, hf_config

    assert config_from_hf(PUBLISHED_V3).mtp_input == "normed"
    old = hf_config(ModelConfig.from_preset("tiny"), torch.float32)
    del old["seektrain"]["mtp_input"]
    assert config_from_hf(old).mtp_input == "unnormed"
    assert config_from_hf({**old, "num_nextn_predict_layers": 0}).mtp_input == "normed"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"rope_parameters": [1]}, "rope_parameters=[1]; expected an object"),
        ({"rope_scaling": "yarn"}, "rope_scaling='yarn'; expected an object"),
        ({"quantization_config": "fp8"}, "quantization_config='fp8'; expected an object"),
        ({"rope_theta": "10000"}, "rope_theta='10000'; expected a number"),
        ({"num_nextn_predict_layers": 1.5}, "num_nextn_predict_layers=1.5; expected an integer"),
    ],
)
def test_a_config_json_with_a_wrongly_typed_entry_is_one_error_line(change, words):
    """These were AttributeError / ValueError tracebacks from `seektrain import`."""
    from seektrain.model.hf import config_from_hf

    with pytest.raises(UserError, match=re.escape(words)):
        config_from_hf({**PUBLISHED_V3, **change})


def test_directory_saved_by_transformers_loads_back(tmp_path):
    """transformers re-saves our export without the MTP layers: the main model comes back bitwise and the
    MTP modules start fresh."""
    ours = build(TINY)
    save_hf(ours, tmp_path / "ours")
    load_transformers(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    back = load_hf(tmp_path / "theirs")
    want, got = ours.state_dict(), back.state_dict()
    assert back.cfg == ours.cfg and want.keys() == got.keys()
    for k in want:
        if not k.startswith("mtp."):
            assert torch.equal(want[k], got[k]), k
    assert not torch.equal(want["mtp.0.eh_proj.weight"], got["mtp.0.eh_proj.weight"])


def test_keys_a_config_json_leaves_out_read_as_transformers_reads_them():
    """Routing keys change no tensor shape: left out of a hand-written config.json, they took seektrain's
    toy defaults (k=4, one group) while transformers loads the same directory with its own (k=8, 8 groups
    of which 4): a different model, silently."""
    from seektrain.model.hf import config_from_hf, hf_config

    cfg = dataclasses.replace(TINY, n_routed_experts=32, n_group=8, topk_group=4, num_experts_per_tok=8)
    trimmed = hf_config(cfg, torch.float32)
    left_out = ("n_group", "topk_group", "num_experts_per_tok", "routed_scaling_factor", "norm_topk_prob")
    for key in left_out:
        del trimmed[key]
    theirs = transformers.DeepseekV3Config(**trimmed)
    ours = config_from_hf(trimmed)
    assert {k: getattr(ours, k) for k in left_out} == {k: getattr(theirs, k) for k in left_out}


@pytest.mark.parametrize(
    "extra, refused",
    [({"attention_factor": 1.5}, True), ({"truncate": False}, True), ({"partial_rotary_factor": 0.5}, True),
     ({"truncate": True}, False), ({"attention_factor": None}, False)],
)  # fmt: skip
def test_rope_parameters_seektrain_does_not_implement_are_refused_on_import(extra, refused):
    """transformers honours these YaRN keys; import dropped them and loaded another model (logits off by
    ~2). A value that means what seektrain computes is accepted."""
    from seektrain.model.hf import config_from_hf, hf_config

    d = hf_config(CONFIGS["no_q_lora_one_group_yarn"], torch.float32)
    d["rope_parameters"] = {**d["rope_parameters"], **extra}
    if refused:
        with pytest.raises(UserError, match=f"rope parameters set {next(iter(extra))}="):
            config_from_hf(d)
    else:
        assert config_from_hf(d) == CONFIGS["no_q_lora_one_group_yarn"]


def test_rope_parameters_and_a_legacy_rope_scaling_that_disagree_are_refused_on_import():
    """A config.json with both tables (a default `rope_parameters` beside a legacy YaRN `rope_scaling`):
    transformers reads it as YaRN, import took the default one and loaded another model without a word.
    Two tables that agree import as either would."""
    from seektrain.model.hf import config_from_hf, hf_config

    plain = hf_config(TINY, torch.float32)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    with pytest.raises(UserError, match=r"rope_parameters and its legacy rope_scaling disagree \(types 'de"):
        config_from_hf({**plain, "rope_scaling": yarn})
    scaled = hf_config(CONFIGS["no_q_lora_one_group_yarn"], torch.float32)
    with pytest.raises(UserError, match=r"disagree \(factor\)"):
        config_from_hf({**scaled, "rope_scaling": {**scaled["rope_parameters"], "factor": 2.0}})
    legacy = {k: v for k, v in scaled["rope_parameters"].items() if k != "rope_theta"}
    assert config_from_hf({**scaled, "rope_scaling": legacy}) == CONFIGS["no_q_lora_one_group_yarn"]
