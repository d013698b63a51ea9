"""Decoding speed and KV-cache size: MLA latent cache vs a per-head K/V cache, no cache, and transformers.

Cases, all greedy on the same randomly initialized model and prompt, interleaved over rounds (median):
  latent        `seektrain.infer.generate`: c_kv + k_rope per token and layer, absorbed attention
  per-head      this file: every head's key (d_qk) and value (d_v) per token and layer, standard attention
                (how MLA is usually cached without absorption; the "naive" cache of the issue)
  no-cache      the full forward over the whole sequence at every step
  transformers  DeepseekV3ForCausalLM.generate on the same weights, with its own cache
Reports prefill ms, decode tokens/s (after the first token), cache bytes per token measured from the
allocated cache tensors, and the ratio to the per-head cache, which should be
(kv_lora_rank + qk_rope_head_dim) / (heads · (d_qk + d_v)).

Run:  python bench/bench_decode.py [--preset tiny] [--prompt 128] [--new 128] [--rounds 3]
                                   [--dtype fp32|bf16] [--threads N] [--no-hf] [--json]
On a GPU it defaults to the `small` preset in bf16. Prints JSON lines (with --json) and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from seektrain.infer.generate import SamplingConfig, generate
from seektrain.infer.kv_cache import LatentCache, naive_bytes_per_token
from seektrain.model.config import ModelConfig
from seektrain.model.layers import apply_rope, rope_cos_sin
from seektrain.model.transformer import Transformer


class PerHeadCache:
    """Standard cache: k (L, B, H, S, d_qk) and v (L, B, H, S, d_v)."""

    def __init__(self, cfg: ModelConfig, max_len: int, device, dtype) -> None:
        L, H = cfg.num_hidden_layers, cfg.num_attention_heads
        self.k = torch.zeros(L, 1, H, max_len, cfg.qk_head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(L, 1, H, max_len, cfg.v_head_dim, device=device, dtype=dtype)
        self.length = 0

    def bytes_per_token(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size() // self.k.shape[3]


def per_head_attention(attn, x, cache: PerHeadCache, layer: int, cos, sin) -> torch.Tensor:
    """MLA expanded per head (k_nope, v from kv_b_proj), keys and values cached per head."""
    B, T, _ = x.shape
    H, nope, rope, r = attn.n_heads, attn.nope, attn.rope, attn.kv_lora_rank
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))) if attn.q_lora else attn.q_proj(x)
    q = q.view(B, T, H, nope + rope).transpose(1, 2)  # (B, H, T, d_qk)
    q_nope, q_rope = q.split([nope, rope], dim=-1)
    c_kv, k_rope = attn.kv_a_proj_with_mqa(x).split([r, rope], dim=-1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(c_kv)).view(B, T, H, nope + attn.v_dim).transpose(1, 2)
    k_nope, v = kv.split([nope, attn.v_dim], dim=-1)  # (B, H, T, nope), (B, H, T, v)
    k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).expand(B, H, T, rope)
    start, end = cache.length, cache.length + T
    cache.k[layer, :, :, start:end] = torch.cat([k_nope, k_rope], dim=-1)
    cache.v[layer, :, :, start:end] = v
    q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
    mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(end - T) if T > 1 else None
    y = F.scaled_dot_product_attention(
        q, cache.k[layer, :, :, :end], cache.v[layer, :, :, :end], attn_mask=mask, scale=attn.scale
    )
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * attn.v_dim))


@torch.no_grad()
def per_head_forward(model: Transformer, tokens: torch.Tensor, cache: PerHeadCache) -> torch.Tensor:
    start, T = cache.length, tokens.shape[1]
    cos, sin = rope_cos_sin(model.cfg, start + T, tokens.device)
    cos, sin = cos[start:], sin[start:]
    h = model.embed_tokens(tokens)
    for i, block in enumerate(model.layers):
        h = h + per_head_attention(block.self_attn, block.input_layernorm(h), cache, i, cos, sin)
        y = block.mlp(block.post_attention_layernorm(h))
        h = h + (y[0] if isinstance(y, tuple) else y)
    cache.length += T
    return model.lm_head(model.norm(h[:, -1:]))[:, -1]


@torch.no_grad()
def per_head_generate(model: Transformer, prompt: list[int], n: int, holder: dict) -> Iterator[int]:
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    cache = PerHeadCache(model.cfg, len(prompt) + n, device, dtype)
    holder["cache"] = cache
    logits = per_head_forward(model, torch.tensor([prompt], device=device), cache)
    for i in range(n):
        token = logits.argmax(-1)
        yield int(token)
        if i < n - 1:
            logits = per_head_forward(model, token.view(1, 1), cache)


def timed(tokens: Iterator[int], sync: Callable[[], None]) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds for the rest)."""
    out, t0 = [], time.perf_counter()
    t_first = None
    for tok in tokens:
        out.append(tok)
        if t_first is None:
            sync()
            t_first = time.perf_counter()
    sync()
    return out, t_first - t0, time.perf_counter() - t_first


def hf_case(model: Transformer, dtype: torch.dtype, prompt: list[int], n: int):
    """transformers' generate on the same weights; yields tokens via a streamer, records its cache size."""
    import transformers
    from transformers.generation.streamers import BaseStreamer

    from seektrain.interop import save_hf

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d, dtype=dtype)
        hf = (
            transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
            .to(model.lm_head.weight.device)
            .eval()
        )
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0

    def run(holder: dict) -> Iterator[int]:
        tokens: list[int] = []

        class Collect(BaseStreamer):
            def put(self, value):
                tokens.extend(value.view(-1).tolist())

            def end(self):
                pass

        # generate is not a generator: run it, then replay with the first token's time measured separately
        device = hf.lm_head.weight.device
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            t0 = time.perf_counter()
            hf.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1)
            sync()
            holder["prefill_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = hf.generate(
                ids,
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                streamer=Collect(),
                return_dict_in_generate=True,
            )
            sync()
            holder["total_s"] = time.perf_counter() - t0
        cache = getattr(out, "cache", None) or out.past_key_values  # renamed in newer transformers
        try:
            elems = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
            holder["bytes_per_token"] = elems * cache.layers[0].keys.element_size() // cache.get_seq_length()
        except AttributeError:  # cache layout of another transformers version
            holder["bytes_per_token"] = None
        return iter(tokens[len(prompt) :])

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = torch.cuda.is_available()
    p.add_argument("--preset", default="small" if on_gpu else "tiny")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bf16" if on_gpu else "fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers case")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    cfg = dataclasses.replace(
        ModelConfig.from_preset(args.preset), max_position_embeddings=args.prompt + args.new
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).eval()
    model.to(dtype)
    for moe in model.moe_layers():
        moe.e_score_correction_bias.data = moe.e_score_correction_bias.data.float()
    prompt = torch.randint(
        0, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    greedy = SamplingConfig(max_new_tokens=args.new, temperature=0)

    def latent(holder: dict) -> Iterator[int]:
        holder["cache"] = LatentCache(cfg, 1, 1, device, dtype)  # for bytes_per_token only
        return generate(model, prompt, greedy)

    cases: dict[str, Callable[[dict], Iterator[int]]] = {
        "latent": latent,
        "per-head": lambda holder: per_head_generate(model, prompt, args.new, holder),
        "no-cache": lambda holder: generate(model, prompt, greedy, use_cache=False),
    }
    if not args.no_hf:
        cases["transformers"] = hf_case(model, dtype, prompt, args.new)

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    tokens: dict[str, list[int]] = {}
    sizes: dict[str, int | None] = {}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, case in list(cases.items()):
            holder: dict = {}
            try:
                out, first_s, rest_s = timed(case(holder), sync)
            except Exception as e:  # a peer that breaks (e.g. another transformers version) drops out
                print(f"case {name} failed and is skipped: {type(e).__name__}: {e}")
                del cases[name], times[name]
                continue
            if name == "transformers":  # timed as whole generate() calls, see hf_case
                first_s, rest_s = holder["prefill_s"], holder["total_s"] - holder["prefill_s"]
                sizes[name] = holder["bytes_per_token"]
            elif "cache" in holder:
                sizes[name] = holder["cache"].bytes_per_token()
            times[name].append((first_s, rest_s))
            tokens[name] = out
    times = {k: v[1:] for k, v in times.items()}

    naive = naive_bytes_per_token(cfg, dtype)
    assert sizes["per-head"] == naive, (sizes["per-head"], naive)
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (
        cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    )
    rows = []
    for name, runs in times.items():
        prefill = statistics.median(r[0] for r in runs)
        rates = [(args.new - 1) / r[1] for r in runs]
        size = sizes.get(name)
        row = {
            "case": name,
            "preset": args.preset,
            "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "dtype": args.dtype,
            "prompt": args.prompt,
            "new": args.new,
            "prefill_ms": 1e3 * prefill,
            "decode_tok_s": statistics.median(rates),
            "decode_tok_s_min": min(rates),
            "decode_tok_s_max": max(rates),
            "cache_bytes_per_token": size,
            "vs_per_head": size / naive if size else None,
            "same_tokens_as_no_cache": tokens[name] == tokens["no-cache"],
        }
        rows.append(row)
        if args.json:
            print(json.dumps(row))
    print(
        f"\n{args.preset} on {rows[0]['device']}, {args.dtype}, prompt {args.prompt}, {args.new} new tokens, "
        f"median of {args.rounds} rounds; expected latent/per-head ratio {expected:.4f}"
    )
    print(
        f"{'case':<13} {'prefill ms':>10} {'decode tok/s':>13} {'(min-max)':>17} {'cache B/token':>14} "
        f"{'vs per-head':>11} {'same tokens':>11}"
    )
    for r in rows:
        size = f"{r['cache_bytes_per_token']:,}" if r["cache_bytes_per_token"] else "-"
        ratio = f"{r['vs_per_head']:.4f}" if r["vs_per_head"] else "-"
        spread = f"{r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}"
        print(
            f"{r['case']:<13} {r['prefill_ms']:>10.1f} {r['decode_tok_s']:>13.1f} {spread:>17} {size:>14} "
            f"{ratio:>11} {str(r['same_tokens_as_no_cache']):>11}"
        )


if __name__ == "__main__":
    main()
