"""transformers interop: save our model as a DeepSeek-V3 checkpoint directory and read one back.

The directory holds `config.json` (`model_type: deepseek_v3`) and `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` above `max_shard_bytes`.
`transformers.AutoModelForCausalLM.from_pretrained(dir)` loads it as `DeepseekV3ForCausalLM`; the
name table lives in `seektrain.model.hf`. Every file is written to a temp name and `os.replace`d.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from seektrain.errors import UserError, first_line
from seektrain.model.hf import FP32_SUFFIXES, config_from_hf, from_hf_state_dict, hf_config, to_hf_state_dict
from seektrain.model.moe import MoE
from seektrain.model.transformer import Transformer
from seektrain.paths import atomic_write

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def save_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` as a transformers DeepSeek-V3 directory; returns its path. The routers' correction
    biases stay fp32 whatever `dtype` is."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tensors = {
        # copy=True: per-expert slices and the MTP copies of embedding/head must not share storage
        name: t.detach().to("cpu", _save_dtype(name, dtype), copy=True).contiguous()
        for name, t in to_hf_state_dict(model.state_dict(), cfg).items()
    }
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards, strict=True):
        atomic_write(out / fname, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: f for f, shard in zip(names, shards, strict=True) for k in sorted(shard)},
        }
        _write_json(out / INDEX_NAME, index)
    _write_json(out / "config.json", hf_config(cfg, dtype))
    # Remove what an earlier, differently sharded save left (only files with our exact names).
    for stale in out.iterdir():
        ours = stale.name == SINGLE_NAME or SHARD_NAME.fullmatch(stale.name) or stale.name == INDEX_NAME
        if ours and stale.name not in names and not (stale.name == INDEX_NAME and len(shards) > 1):
            stale.unlink()
    return out


_INDEX = "a safetensors index (a JSON object with a weight_map of file names)"


def _indexed_files(index: Path) -> list[str]:
    """The weight files a sharded directory's index names; UserError when it is not such an index."""
    weight_map = _read_json_object(index, _INDEX).get("weight_map")
    files = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else None
    if files is None or not all(isinstance(f, str) for f in files):
        raise UserError(f"{index} is not {_INDEX}")
    return files


def _read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; UserError naming `what` it should be when it does not parse or is not an
    object (a list, say)."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not {what}: {first_line(e)}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a JSON object: not {what}")
    return obj


def load_hf(
    hf_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    notes: list[str] | None = None,
) -> Transformer:
    """Read a DeepSeek-V3 directory (single or sharded safetensors) into our `Transformer`, the model
    transformers loads from it. MTP modules absent from the files (e.g. a directory transformers saved)
    keep their fresh init. The keys and shapes of the weights are checked against config.json before the
    model is allocated. What was read otherwise than config.json says is appended to `notes`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} is not a transformers model directory (no config.json)")
    cfg = config_from_hf(_read_json_object(src / "config.json", "a transformers config.json"))
    if (src / INDEX_NAME).is_file():
        files = _indexed_files(src / INDEX_NAME)
    elif (src / SINGLE_NAME).is_file():
        files = [SINGLE_NAME]
    else:
        raise UserError(f"{src} has neither {SINGLE_NAME} nor {INDEX_NAME}")
    hf: dict[str, torch.Tensor] = {}
    for fname in files:
        if not (src / fname).is_file():
            raise UserError(f"{src / fname} is listed in {INDEX_NAME} but missing")
        try:
            hf.update(load_file(src / fname))
        except (SafetensorError, OSError) as e:  # truncated or not a safetensors file at all
            raise UserError(f"{src / fname} cannot be read as safetensors ({first_line(e)})") from e
    sd = from_hf_state_dict(hf, cfg)
    embed, head = sd.get("embed_tokens.weight"), sd.get("lm_head.weight")
    if cfg.tie_word_embeddings and embed is not None and head is not None and not torch.equal(embed, head):
        # transformers keeps both tensors as stored (a tied model would silently lose one of them)
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        if notes is not None:
            notes.append(
                f"{src}/config.json ties the embeddings, but the weights hold a different lm_head.weight: "
                "imported untied, as transformers loads it"
            )
    if cfg.tie_word_embeddings:
        sd.setdefault("lm_head.weight", embed)

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.startswith("mtp.")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{src}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, t in sd.items():
        if t.shape != expected[name].shape:
            raise UserError(
                f"{src}: {name} has shape {tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
    model.to_empty(device=device)
    model.init_weights()
    model.to(dtype=dtype)
    for module in model.modules():  # the correction biases stay fp32
        if isinstance(module, MoE):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    model.load_state_dict(sd, strict=False)
    return model


def _save_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.endswith(FP32_SUFFIXES) else dtype


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_json(path: Path, obj: dict) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    atomic_write(path, write)


__all__ = ["load_hf", "save_hf"]
