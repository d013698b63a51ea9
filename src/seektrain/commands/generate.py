"""Generate text from a trained run with MLA's compressed (latent) KV cache.

The prompt is encoded with the run's tokenizer, run through the model once, then extended one token at a
time through the cache (kv_lora_rank + qk_rope_head_dim values per token and layer). Prints the prompt and
its continuation; `--verbose` adds the cache size per token and the speed on stderr. `--temperature 0` is
greedy; otherwise --top-k and --top-p filter the distribution and --seed makes the sample reproducible.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", required=True, metavar="DIR", help="run directory (its newest checkpoint is used)"
    )
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)"
    )
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus: smallest set with mass P")
    p.add_argument(
        "--seed", type=int, default=None, metavar="S", help="seed for sampling (reproducible output)"
    )
    p.add_argument("--checkpoint", metavar="DIR", help="a step_XXXXXXXX directory instead of the newest")
    p.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer.json (default: the run's or its data dir's)"
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available"
    )
    p.add_argument(
        "--no-cache", action="store_true", help="re-run the full forward each step (reference path)"
    )
    p.add_argument("--verbose", action="store_true", help="cache bytes per token and speed on stderr")


def run(args: argparse.Namespace) -> int:
    from seektrain.distributed.env import pick_device
    from seektrain.host_limits import fit_torch_threads
    from seektrain.infer.generate import SamplingConfig, generate, stream_text
    from seektrain.infer.kv_cache import latent_bytes_per_token, naive_bytes_per_token
    from seektrain.infer.runs import load_run, run_tokenizer

    check_prompt(args.prompt)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    device = pick_device(args.device)
    if device.type == "cpu":
        fit_torch_threads()  # at most one per CPU it may use, as the trainer runs
    loaded = load_run(args.run, device=device, checkpoint=args.checkpoint)
    tokenizer, _ = run_tokenizer(loaded, args.tokenizer)
    prompt = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    cfg = loaded.model.cfg

    start = time.perf_counter()
    eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer_eos(tokenizer)
    new: list[int] = []
    first_token_s = None

    def timed(tokens):
        nonlocal first_token_s
        for token in tokens:
            first_token_s = first_token_s or time.perf_counter() - start
            new.append(token)
            yield token

    tokens = generate(loaded.model, prompt, sampling, eos_id=eos_id, use_cache=not args.no_cache)
    sys.stdout.write(args.prompt)
    for piece in stream_text(tokenizer, prompt, timed(tokens)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    total = time.perf_counter() - start

    if args.verbose:
        dtype = loaded.model.embed_tokens.weight.dtype
        latent, naive = latent_bytes_per_token(cfg, dtype), naive_bytes_per_token(cfg, dtype)
        decode_s = total - (first_token_s or 0.0)
        speed = (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else float("nan")
        print(
            f"checkpoint {loaded.checkpoint} (step {loaded.step}) on {device}\n"
            f"prompt {len(prompt)} tokens, generated {len(new)} tokens"
            f"{' (stopped at EOS)' if new and new[-1] == eos_id else ''}\n"
            f"kv cache: {'none (full forward each step)' if args.no_cache else 'MLA latent'}; "
            f"{latent:,} bytes/token ({cfg.num_hidden_layers} layers x (kv_lora_rank {cfg.kv_lora_rank} + "
            f"rope {cfg.qk_rope_head_dim}) x {dtype.itemsize} B) vs {naive:,} for a per-head K/V cache "
            f"({latent / naive:.3f}x)\n"
            f"time: first token {1e3 * (first_token_s or 0):.1f} ms, then {speed:.1f} tokens/s",
            file=sys.stderr,
        )
    return 0


def check_prompt(prompt: str) -> None:
    """UserError unless --prompt is text: bytes that are not UTF-8 reach argv as lone surrogates, which
    neither the tokenizer nor stdout can take (checked before anything is loaded or printed)."""
    from seektrain.errors import UserError

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError("--prompt is not valid UTF-8 text") from e


def tokenizer_eos(tokenizer) -> int | None:
    """The end-of-document token's id found by name in the tokenizer (for a model whose config has none,
    as a transformers checkpoint may lack `eos_token_id`), or None."""
    from seektrain.data.tokenizer import TokenizerConfig, special_tokens
    from seektrain.errors import UserError

    try:
        return special_tokens(tokenizer, TokenizerConfig())["eos"]["id"]
    except UserError:
        return None
