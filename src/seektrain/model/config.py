"""ModelConfig: the DeepSeek-V3 architecture as one torch-free dataclass, plus named presets.

Field names are those of transformers' `DeepseekV3Config` so that `config.json` export is a rename-free
copy. Every inconsistency is collected in `__post_init__` and raised as one `UserError`, so a bad
`--set model.x=…` fails before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

from seektrain.errors import UserError

# The numeric parameters of YaRN, and every key a `rope_scaling` dict may carry (HF-style; `type` is
# the legacy spelling of `rope_type`).
YARN_FIELDS = (
    "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
)
YARN_KEYS = {"type", "rope_type", *YARN_FIELDS}


@dataclass
class ModelConfig:
    """Dimensions and routing of a DeepSeek-V3-style model (MLA + DeepSeekMoE + MTP).

    Optional fields default to None so that `to_dict` (which drops None: TOML has no null) round-trips.
    The defaults are toy dimensions; use `from_preset` for real models.
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768  # dense SwiGLU layers (the first `first_k_dense_replace`)
    moe_intermediate_size: int = 64  # each routed / shared expert
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    q_lora_rank: int | None = None  # None: q = W_q h directly, no low-rank path
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_shared_experts: int = 1
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or HF-style YaRN dict
    max_position_embeddings: int = 2048
    num_mtp_layers: int = 1  # MTP depth D
    mtp_loss_weight: float = 0.3  # λ
    # what MTP depth k reads of the previous stage: its hidden state after its final norm ("normed", as
    # DeepSeek's MTP checkpoints were trained) or before ("unnormed": seektrain's runs before 2026-11-27)
    mtp_input: str = "normed"
    seq_aux_loss_alpha: float = 0.0  # α of the sequence-wise balance loss (0 = off)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        problems = _type_problems(self)
        if not problems:
            problems = _value_problems(self)
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)

    # ----- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # ----- presets and (de)serialization ---------------------------------------------------------
    @staticmethod
    def preset_names() -> list[str]:
        return list(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"unknown model preset {name!r}{hint}; choose from {', '.join(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/TOML-safe dict. None values are dropped (TOML has no null); `from_dict` restores them."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = dict(value) if isinstance(value, dict) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`. A `preset` key, if present, supplies the base values the others override."""
        d = dict(d)
        base: dict[str, Any] = {}
        if "preset" in d:
            name = d.pop("preset")
            if name not in PRESETS:
                cls.from_preset(str(name))  # raises the helpful error
            base = dict(PRESETS[name])
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            msgs = []
            for key in unknown:
                close = difflib.get_close_matches(key, names, n=3)
                msgs.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise UserError(f"unknown model config key {', '.join(msgs)}")
        return cls(**{**base, **d})

    # ----- parameter counts (torch-free; tests check them against the meta-device model) --------
    def num_params(self, include_mtp: bool = False) -> int:
        """Trainable parameters (the router correction bias is a buffer and is not counted)."""
        d, embed = self.hidden_size, self.vocab_size * self.hidden_size
        total = embed + d  # embedding + final norm
        if not self.tie_word_embeddings:
            total += embed
        for i in range(self.num_hidden_layers):
            total += self._block_params(moe=self.is_moe_layer(i))
        if include_mtp:
            mtp_block = self._block_params(moe=self.num_moe_layers > 0)
            total += self.num_mtp_layers * (3 * d + 2 * d * d + mtp_block)
        return total

    def num_active_params(self) -> int:
        """Parameters that touch each token: the embedding table is excluded (a lookup, no FLOPs),
        the output head and only `num_experts_per_tok` routed experts per MoE layer are included.
        This is the N of the 6·N FLOPs/token estimate (MTP modules excluded)."""
        d = self.hidden_size
        unused_experts = self.n_routed_experts - self.num_experts_per_tok
        total = self.num_params() - self.num_moe_layers * unused_experts * 3 * d * self.moe_intermediate_size
        if not self.tie_word_embeddings:
            total -= self.vocab_size * d
        return total

    def _block_params(self, moe: bool) -> int:
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            attn = d * h * self.qk_head_dim
        else:
            attn = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        attn += d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        attn += h * self.v_head_dim * d
        if moe:
            expert = 3 * d * self.moe_intermediate_size
            mlp = (self.n_routed_experts + self.n_shared_experts) * expert + self.n_routed_experts * d
        else:
            mlp = 3 * d * self.intermediate_size
        return attn + mlp + 2 * d  # + the two RMSNorms

    # ----- RoPE / YaRN constants shared by the model and the HF export ---------------------------
    def yarn(self) -> dict[str, float] | None:
        """Resolved YaRN parameters (factor, original length, betas, mscales), or None without YaRN."""
        if self.rope_scaling is None:
            return None
        rs = self.rope_scaling
        return {
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(
                rs.get("original_max_position_embeddings", self.max_position_embeddings)
            ),
            "beta_fast": float(rs.get("beta_fast") or 32),
            "beta_slow": float(rs.get("beta_slow") or 1),
            "mscale": float(rs.get("mscale") or 0.0),
            "mscale_all_dim": float(rs.get("mscale_all_dim") or 0.0),
        }

    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale² under YaRN (mscale = 0.1·mscale_all_dim·ln(factor) + 1)."""
        scale = self.qk_head_dim**-0.5
        y = self.yarn()
        if y is not None and y["mscale_all_dim"]:
            m = yarn_mscale(y["factor"], y["mscale_all_dim"])
            scale = scale * m * m
        return scale


def _yarn_problems(rs: dict[str, Any]) -> list[str]:
    """What makes a YaRN table unusable beyond its type and factor: a non-numeric field, an original
    length that is not a positive integer, a beta that is not positive (YaRN's correction range divides by
    the logarithms of the betas' wavelengths, and of rope_theta, which `_value_problems` keeps above 1),
    betas in the wrong order, a negative mscale."""
    out = []
    numbers = {k: v for k, v in sorted(rs.items()) if k not in ("type", "rope_type")}
    for key, v in numbers.items():
        if not is_finite_number(v):
            out.append(f"rope_scaling.{key} must be a finite number, got {v!r}")
    original = numbers.get("original_max_position_embeddings")
    if is_finite_number(original) and (original < 1 or original != int(original)):
        out.append(f"rope_scaling.original_max_position_embeddings must be an integer >= 1, got {original!r}")
    for key in ("beta_fast", "beta_slow"):
        if is_finite_number(numbers.get(key)) and numbers[key] <= 0:
            out.append(f"rope_scaling.{key} must be > 0, got {numbers[key]!r}")
    fast, slow = numbers.get("beta_fast", 32.0), numbers.get("beta_slow", 1.0)  # YaRN's defaults
    if is_finite_number(fast) and is_finite_number(slow) and fast <= slow:
        out.append(f"rope_scaling.beta_fast ({fast!r}) must exceed beta_slow ({slow!r}): the two swapped?")
    for key in ("mscale", "mscale_all_dim"):
        if is_finite_number(numbers.get(key)) and numbers[key] < 0:
            out.append(f"rope_scaling.{key} must be >= 0, got {numbers[key]!r}")
    return out


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_INT_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "first_k_dense_replace",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "n_group",
    "topk_group",
    "max_position_embeddings",
    "num_mtp_layers",
}
_OPT_INT_FIELDS = {"q_lora_rank", "bos_token_id", "eos_token_id", "pad_token_id"}
_FLOAT_FIELDS = {
    "routed_scaling_factor",
    "rms_norm_eps",
    "rope_theta",
    "mtp_loss_weight",
    "seq_aux_loss_alpha",
    "initializer_range",
}
_BOOL_FIELDS = {"norm_topk_prob", "tie_word_embeddings"}
MTP_INPUTS = ("normed", "unnormed")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _type_problems(c: ModelConfig) -> list[str]:
    out = []
    for name in _INT_FIELDS:
        if not _is_int(getattr(c, name)):
            out.append(f"{name} must be an integer, got {getattr(c, name)!r}")
    for name in _OPT_INT_FIELDS:
        v = getattr(c, name)
        if v is not None and not _is_int(v):
            out.append(f"{name} must be an integer or unset, got {v!r}")
    for name in sorted(_INT_FIELDS | _OPT_INT_FIELDS):  # sizes and token ids end up in int64 tensors
        v = getattr(c, name)
        if _is_int(v) and not -(2**63) <= v < 2**63:
            out.append(f"{name}={v} is out of range (a 64-bit integer)")
    for name in _FLOAT_FIELDS:
        v = getattr(c, name)
        if _is_int(v):
            setattr(c, name, float(v))
        elif not isinstance(v, float):
            out.append(f"{name} must be a number, got {v!r}")
        elif not math.isfinite(v):
            out.append(f"{name} must be finite, got {v}")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(c, name), bool):
            out.append(f"{name} must be true or false, got {getattr(c, name)!r}")
    if c.mtp_input not in MTP_INPUTS:
        out.append(f"mtp_input must be one of {', '.join(map(repr, MTP_INPUTS))}, got {c.mtp_input!r}")
    if c.rope_scaling is not None and not isinstance(c.rope_scaling, dict):
        out.append(
            f"rope_scaling must be a table like {{type = 'yarn', factor = 40}}, not {c.rope_scaling!r}"
        )
    return sorted(out)


def _value_problems(c: ModelConfig) -> list[str]:
    out = []
    for name in sorted(_INT_FIELDS - {"first_k_dense_replace", "num_mtp_layers", "n_shared_experts"}):
        if getattr(c, name) < 1:
            out.append(f"{name} must be >= 1, got {getattr(c, name)}")
    for name in ("first_k_dense_replace", "num_mtp_layers", "n_shared_experts"):
        if getattr(c, name) < 0:
            out.append(f"{name} must be >= 0, got {getattr(c, name)}")
    if c.q_lora_rank is not None and c.q_lora_rank < 1:
        out.append(f"q_lora_rank must be >= 1 or unset, got {c.q_lora_rank}")
    for name in ("mtp_loss_weight", "seq_aux_loss_alpha"):
        if getattr(c, name) < 0:
            out.append(f"{name} must be >= 0, got {getattr(c, name)}")
    # 0 would silence the routed experts, or start every weight at 0 (all heads and experts the same)
    for name in ("routed_scaling_factor", "initializer_range"):
        if getattr(c, name) <= 0:
            out.append(f"{name} must be > 0, got {getattr(c, name)}")
    if not 0 < c.rms_norm_eps < 1:  # an epsilon that outweighs the activations' mean square erases them
        out.append(f"rms_norm_eps must be in (0, 1), got {c.rms_norm_eps}")
    if c.rope_theta <= 1:  # every rotation frequency is theta^(-2i/d): 1 for all at theta = 1
        out.append(f"rope_theta must be > 1, got {c.rope_theta}")
    if c.first_k_dense_replace > c.num_hidden_layers:
        out.append(
            f"first_k_dense_replace ({c.first_k_dense_replace}) exceeds "
            f"num_hidden_layers ({c.num_hidden_layers})"
        )
    if c.qk_rope_head_dim % 2:
        out.append(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {c.qk_rope_head_dim}")
    if c.n_group >= 1 and c.n_routed_experts % c.n_group:
        out.append(f"n_routed_experts ({c.n_routed_experts}) must be divisible by n_group ({c.n_group})")
    elif c.n_group >= 1 and c.n_routed_experts // c.n_group < 2:
        out.append(
            f"each expert group needs >= 2 experts (group score = sum of its top-2), "
            f"got {c.n_routed_experts} experts in {c.n_group} groups"
        )
    elif c.topk_group > c.n_group:
        out.append(f"topk_group ({c.topk_group}) exceeds n_group ({c.n_group})")
    elif c.num_experts_per_tok > c.topk_group * (c.n_routed_experts // max(c.n_group, 1)):
        allowed = c.topk_group * (c.n_routed_experts // c.n_group)
        out.append(
            f"num_experts_per_tok ({c.num_experts_per_tok}) exceeds the {allowed} experts the group limit "
            f"allows (topk_group {c.topk_group} x {c.n_routed_experts // c.n_group} experts per group)"
        )
    if isinstance(c.rope_scaling, dict):
        rs = c.rope_scaling
        unknown = sorted(set(rs) - YARN_KEYS)
        kind = rs.get("rope_type", rs.get("type"))
        if unknown:
            out.append(f"rope_scaling has unknown keys {unknown}; allowed: {sorted(YARN_KEYS)}")
        elif kind != "yarn":
            out.append(f"rope_scaling type must be 'yarn', got {kind!r}")
        elif not is_finite_number(rs.get("factor")) or rs["factor"] < 1:
            out.append(f"rope_scaling.factor must be a finite number >= 1, got {rs.get('factor')!r}")
        else:
            out += _yarn_problems(rs)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(c, name)
        if v is not None and not 0 <= v < c.vocab_size:
            out.append(f"{name} ({v}) must be in [0, vocab_size={c.vocab_size})")
    return out


_V3_YARN = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
_V2_LITE_YARN = {**_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo (~7.8M params + ~1M MTP): every feature on at toy size.
    "tiny": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        max_position_embeddings=2048,
        num_mtp_layers=1,
    ),
    # GPU benchmark model: 1.26B total, ~223M active parameters.
    "small": dict(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=512,
        num_hidden_layers=12,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=4096,
        num_mtp_layers=1,
    ),
    # DeepSeek-V2-Lite dimensions (with V3 sigmoid routing): 15.7B parameters.
    "v2-lite": dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        max_position_embeddings=163840,
        rope_scaling=_V2_LITE_YARN,
        num_mtp_layers=0,
        bos_token_id=100000,
        eos_token_id=100001,
    ),
    # The published DeepSeek-V3 dimensions: 671B parameters (+ one MTP module).
    "v3": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_shared_experts=1,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        max_position_embeddings=163840,
        rope_scaling=_V3_YARN,
        num_mtp_layers=1,
        bos_token_id=0,
        eos_token_id=1,
    ),
}
