"""Our names ↔ the published DeepSeek-V3 checkpoint layout (what transformers' DeepseekV3 reads).

Our module names already are the checkpoint's, so the table is short:
  ours                                   checkpoint
  embed_tokens.weight                    model.embed_tokens.weight
  norm.weight                            model.norm.weight
  lm_head.weight                         lm_head.weight
  layers.{i}.<rest>                      model.layers.{i}.<rest>
  layers.{i}.mlp.e_score_correction_bias model.layers.{i}.mlp.gate.e_score_correction_bias
  layers.{i}.mlp.experts.gate_up_proj    model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight (split)
  layers.{i}.mlp.experts.down_proj       model.layers.{i}.mlp.experts.{e}.down_proj.weight      (split)
  mtp.{k}.{enorm,hnorm,eh_proj}.weight   model.layers.{L+k}.{enorm,hnorm,eh_proj}.weight
  mtp.{k}.norm.weight                    model.layers.{L+k}.shared_head.norm.weight
  mtp.{k}.block.<rest>                   model.layers.{L+k}.<rest>     (same renames as a layer)
  (shared, written as copies)            model.layers.{L+k}.embed_tokens.weight, .shared_head.head.weight
with L = num_hidden_layers. transformers ignores the MTP layers on load; `load_hf` reads them back.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from seektrain.errors import UserError
from seektrain.model.config import YARN_FIELDS, ModelConfig

TOP_LEVEL = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}  # fmt: skip
BLOCK_RENAMES = {"mlp.e_score_correction_bias": "mlp.gate.e_score_correction_bias"}
MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
           "norm.weight": "shared_head.norm.weight"}  # fmt: skip
MTP_SHARED_COPIES = {
    "embed_tokens.weight": "embed_tokens.weight",
    "shared_head.head.weight": "lm_head.weight",
}
EXPERT_KEY = re.compile(r"(.*mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
FP32_SUFFIXES = ("e_score_correction_bias",)  # kept in fp32 whatever the export dtype (transformers does too)


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> checkpoint names, experts split per expert (views; nothing is copied)."""
    L, out = cfg.num_hidden_layers, {}
    for name, t in sd.items():
        if name in TOP_LEVEL:
            if not (name == "lm_head.weight" and cfg.tie_word_embeddings):
                out[TOP_LEVEL[name]] = t
            continue
        m = re.fullmatch(r"(layers|mtp)\.(\d+)\.(.+)", name)
        if m is None:
            raise KeyError(f"no checkpoint name for {name!r}")
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "mtp":
            prefix = f"model.layers.{L + idx}."
            if rest in MTP_OWN:
                out[prefix + MTP_OWN[rest]] = t
                continue
            if not rest.startswith("block."):
                raise KeyError(f"no checkpoint name for {name!r}")
            rest = rest.removeprefix("block.")
        else:
            prefix = f"model.layers.{idx}."
        if rest.endswith("mlp.experts.gate_up_proj"):
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = t[e, inter:]
        elif rest.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = t[e]
        else:
            out[prefix + BLOCK_RENAMES.get(rest, rest)] = t
    for k in range(cfg.num_mtp_layers):
        for hf_name, ours in MTP_SHARED_COPIES.items():
            if ours == "lm_head.weight" and cfg.tie_word_embeddings:
                ours = "embed_tokens.weight"
            out[f"model.layers.{L + k}.{hf_name}"] = sd[ours]
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours, per-expert weights stacked back into `[E, …]` tensors."""
    L, out = cfg.num_hidden_layers, {}
    inverse_top = {v: k for k, v in TOP_LEVEL.items()}
    inverse_block = {v: k for k, v in BLOCK_RENAMES.items()}
    inverse_mtp = {v: k for k, v in MTP_OWN.items()}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}  # our prefix -> proj -> e -> tensor
    for name, t in hf.items():
        if name.endswith("weight_scale_inv"):
            raise UserError(
                f"{name}: FP8 block-quantized checkpoints are not supported; dequantize to bf16 first"
            )
        if name in inverse_top:
            out[inverse_top[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            raise UserError(f"unexpected tensor {name!r} in a deepseek_v3 checkpoint")
        idx, rest = int(m.group(1)), m.group(2)
        if idx < L:
            prefix = f"layers.{idx}."
        elif idx < L + cfg.num_mtp_layers:
            prefix = f"mtp.{idx - L}."
            if rest in MTP_SHARED_COPIES:
                continue  # copies of the shared embedding / head
            if rest in inverse_mtp:
                out[prefix + inverse_mtp[rest]] = t
                continue
            prefix += "block."
        else:
            raise UserError(
                f"tensor {name!r} is beyond the {L} layers + {cfg.num_mtp_layers} MTP modules of config.json"
            )
        em = EXPERT_KEY.fullmatch(rest)
        if em:
            experts.setdefault(prefix + em.group(1), {}).setdefault(em.group(3), {})[int(em.group(2))] = t
        else:
            out[prefix + inverse_block.get(rest, rest)] = t
    for prefix, projs in experts.items():
        stacks = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = projs.get(proj, {})
            missing = sorted(set(range(cfg.n_routed_experts)) - set(got))
            if missing:
                raise UserError(f"{prefix}: {proj} missing for experts {missing[:8]}")
            stacks[proj] = torch.stack([got[e] for e in range(cfg.n_routed_experts)])
        out[prefix + ".gate_up_proj"] = torch.cat([stacks["gate_proj"], stacks["up_proj"]], dim=1)
        out[prefix + ".down_proj"] = stacks["down_proj"]
    return out


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for `DeepseekV3ForCausalLM` (transformers ≥ 5), plus the legacy keys older loaders read."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        y = cfg.yarn()
        assert y is not None
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **y}
    d = {f: v for f, v in cfg.to_dict().items() if f not in NOT_HF_FIELDS}
    d.update(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        num_key_value_heads=cfg.num_attention_heads,
        hidden_act="silu",
        rope_parameters=rope,
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=0.0,
        q_lora_rank=cfg.q_lora_rank,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        num_nextn_predict_layers=cfg.num_mtp_layers,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        dtype=str(dtype).removeprefix("torch."),
        use_cache=True,
        seektrain={name: getattr(cfg, name) for name in SEEKTRAIN_EXTRAS},  # fields transformers lacks
    )
    return d


# ModelConfig fields that config.json spells differently (rope, MTP depth) or that transformers lacks.
SEEKTRAIN_EXTRAS = ("mtp_loss_weight", "mtp_input", "seq_aux_loss_alpha")
NOT_HF_FIELDS = ("num_mtp_layers", "rope_scaling", "rope_theta", *SEEKTRAIN_EXTRAS)


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Inverse of `hf_config`; also reads published DeepSeek-V3 configs (legacy `rope_scaling`)."""
    if d.get("model_type") != "deepseek_v3":
        raise UserError(
            f"config.json has model_type {d.get('model_type')!r}; only 'deepseek_v3' can be imported"
        )
    if d.get("quantization_config"):
        method = _table(d, "quantization_config").get("quant_method", "?")
        raise UserError(f"config.json describes a {method}-quantized checkpoint; dequantize it to bf16 first")
    for key, want in (("rope_interleave", True), ("attention_bias", False), ("hidden_act", "silu"),
                      ("scoring_func", "sigmoid")):  # fmt: skip
        if key in d and d[key] != want:
            raise UserError(f"config.json has {key}={d[key]!r}; seektrain supports only {want!r}")
    fields = {f for f in ModelConfig.__dataclass_fields__ if f not in NOT_HF_FIELDS}
    kw: dict[str, Any] = {**HF_DEFAULTS, **{k: v for k, v in d.items() if k in fields}}
    kw["n_group"] = kw["n_group"] or 1  # null: no grouping
    kw["topk_group"] = kw["topk_group"] or 1
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    rope, legacy = _table(d, "rope_parameters"), _table(d, "rope_scaling")
    kw["rope_theta"] = _number("rope_theta", rope.get("rope_theta", d.get("rope_theta", 10000.0)), float)
    legacy_kind = legacy.get("type") or legacy.get("rope_type")
    if rope.get("rope_type") and legacy_kind:
        shared = [k for k in YARN_FIELDS if k in rope and k in legacy and rope[k] != legacy[k]]
        if rope["rope_type"] != legacy_kind or shared:
            # transformers merges the two one way; importing the other would give another model
            differ = f"types {rope['rope_type']!r} and {legacy_kind!r}" if not shared else ", ".join(shared)
            raise UserError(
                f"config.json's rope_parameters and its legacy rope_scaling disagree ({differ}): "
                "keep the one that describes the model and remove the other"
            )
    kind = rope.get("rope_type") or legacy_kind or "default"
    if kind == "yarn":
        src = rope if rope.get("rope_type") == "yarn" else legacy
        _check_rope_extras(src)
        kw["rope_scaling"] = {
            "type": "yarn",
            **{k: v for k, v in src.items() if k in YARN_FIELDS and v is not None},
        }
    elif kind != "default":
        raise UserError(f"config.json uses rope type {kind!r}; seektrain supports 'default' and 'yarn'")
    else:
        _check_rope_extras(rope)
    mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0
    kw["num_mtp_layers"] = _number("num_nextn_predict_layers", mtp, int)
    ours = _table(d, "seektrain")
    if ours and "mtp_input" not in ours and kw["num_mtp_layers"]:
        kw["mtp_input"] = "unnormed"  # seektrain's exports before 2026-11-27 trained MTP on pre-norm states
    kw.update(ours)
    return ModelConfig.from_dict(kw)


# transformers' DeepseekV3Config defaults for the keys a config.json may leave out: read as transformers
# reads them (routing keys change no tensor shape, so a missing one would load a different model silently).
# The token ids are not among them: a missing one is taken from the tokenizer.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "initializer_range": 0.02,
}  # fmt: skip

# YaRN keys of transformers' rope parameters that seektrain does not implement, with the value that means
# what seektrain computes (DeepSeek's YaRN: correction range rounded outward, attention factor from mscale).
_ROPE_DEFAULTS = {"truncate": True, "partial_rotary_factor": 1.0, "attention_factor": None}


def _check_rope_extras(rope: dict[str, Any]) -> None:
    """UserError for a rope parameter that would make transformers compute another model than seektrain."""
    for key, v in rope.items():
        if key in YARN_FIELDS or key in ("type", "rope_type", "rope_theta") or v is None:
            continue
        if key not in _ROPE_DEFAULTS or v != _ROPE_DEFAULTS[key]:
            raise UserError(
                f"config.json's rope parameters set {key}={v!r}, which seektrain's YaRN does not implement"
            )


def _table(d: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested object of config.json ({} when absent or null); one error line when it is another type."""
    value = d.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"config.json has {key}={value!r}; expected an object")
    return value


def _number(key: str, value: Any, kind: type) -> Any:
    """A config.json number as `kind` (int or float); one error line for a string, bool or fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or kind(value) != value:
        expected = "an integer" if kind is int else "a number"
        raise UserError(f"config.json has {key}={value!r}; expected {expected}")
    return kind(value)

