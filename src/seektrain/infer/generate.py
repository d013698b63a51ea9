"""Sampling loop: prefill the prompt once, then one token per step through the latent cache.

`temperature == 0` is greedy (argmax). Otherwise the logits are divided by the temperature, filtered to
the `top_k` most likely tokens and then to the smallest set whose probability reaches `top_p`
(nucleus), and sampled from a generator seeded with `seed`, so a seed reproduces a completion.
`use_cache=False` re-runs the full forward over the whole sequence each step: the reference the
cached path is tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from seektrain.errors import UserError
from seektrain.infer.decode import forward_cached
from seektrain.infer.kv_cache import LatentCache
from seektrain.model.transformer import Transformer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None  # None: nondeterministic

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):  # also rejects nan; inf would flatten the logits
            raise UserError(f"--temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch's generator takes
            raise UserError(f"--seed must be in [-2**63, 2**64), got {self.seed}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,) int64. NaN logits (a diverged checkpoint) are a UserError:
    no token follows from them, greedy or sampled."""
    if logits.isnan().any():
        raise UserError("the model's logits are NaN (its weights have diverged): no token to generate")
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = _scale(logits, cfg.temperature)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= cfg.top_p  # the most likely token always stays
        logits = logits.masked_fill(
            torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf")
        )
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature without inf - inf = nan for a tiny temperature: shifted so that the largest is
    0 (0 / t stays 0, the rest tend to -inf, so a near-0 temperature picks the greedy token), in fp64,
    where every positive Python float stays positive (in fp32, 1e-46 would round to 0 and give 0 / 0)."""
    logits = logits.double()
    return (logits - logits.amax(dim=-1, keepdim=True)) / temperature


def generate(
    model: Transformer,
    prompt: list[int],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to `cfg.max_new_tokens` new token ids after `prompt`, stopping after `eos_id`.
    The prompt plus the new tokens must fit `max_position_embeddings`: checked here, before the first
    token is asked for, so a caller can rely on a clean error before printing anything."""
    context = model.cfg.max_position_embeddings
    if not prompt:
        raise UserError("the prompt is empty: give at least one token of text")
    if len(prompt) + cfg.max_new_tokens > context:
        raise UserError(
            f"the prompt ({len(prompt)} token{'s' if len(prompt) != 1 else ''}) plus --max-new-tokens "
            f"{cfg.max_new_tokens} exceeds "
            f"the model's context of {context} tokens; shorten the prompt or generate fewer tokens"
        )
    return _decode(model, prompt, cfg, eos_id, use_cache)


@torch.no_grad()
def _decode(
    model: Transformer, prompt: list[int], cfg: SamplingConfig, eos_id: int | None, use_cache: bool
) -> Iterator[int]:
    if cfg.max_new_tokens == 0:
        return
    device = model.embed_tokens.weight.device
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    cache = None
    if use_cache:
        dtype = model.embed_tokens.weight.dtype
        cache = LatentCache(model.cfg, 1, len(prompt) + cfg.max_new_tokens, device, dtype)
        logits = forward_cached(model, ids, cache)[:, -1]  # prefill: (1, V)
    else:
        logits = model(ids).logits[:, -1]
    for i in range(cfg.max_new_tokens):
        token = sample_next(logits, cfg, generator)  # (1,)
        value = int(token)  # one read from the device per token
        yield value
        if value == eos_id or i == cfg.max_new_tokens - 1:
            return
        if cache is not None:
            logits = forward_cached(model, token.view(1, 1), cache)[:, -1]
        else:
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            logits = model(ids).logits[:, -1]


def stream_text(tokenizer, prompt: list[int], tokens: Iterable[int], context: int = 8) -> Iterator[str]:
    """The text of `tokens` generated after `prompt`, piece by piece as they come. Each piece is decoded
    after the prompt's last `context` tokens, so that a decoder that strips the start of a text
    (SentencePiece-style "▁Paris" after "The capital is") keeps the space; a partly decoded multi-byte
    character is held back until it is complete (or the tokens end)."""
    before = prompt[-context:]
    offset = len(tokenizer.decode(before, skip_special_tokens=True))
    new: list[int] = []
    printed = ""
    text = ""
    for token in tokens:
        new.append(token)
        text = tokenizer.decode(before + new, skip_special_tokens=True)[offset:]
        if not text.endswith("\ufffd"):
            yield text[len(printed) :]
            printed = text
    if text[len(printed) :]:
        yield text[len(printed) :]
