"""The latent-cache decode path against the model's own full forward, and the sampler's filters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from seektrain.errors import UserError
from seektrain.infer.decode import forward_cached
from seektrain.infer.generate import SamplingConfig, generate, sample_next
from seektrain.infer.kv_cache import LatentCache, latent_bytes_per_token, naive_bytes_per_token
from seektrain.infer.runs import load_run
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer

from .conftest import one_thread

# initializer_range 0.1 gives O(1) logits (|logit| up to ~8), so a bound of 1e-4 is strict: the absorbed
# form only reorders fp32 sums (q·(W c) -> (Wᵀq)·c), observed max |Δ| ~1e-5.
TINY = dataclasses.replace(ModelConfig.from_preset("tiny"), vocab_size=512, initializer_range=0.1)
CONFIGS = {
    "tiny": TINY,
    "no_q_lora_yarn_tied": dataclasses.replace(
        TINY,
        q_lora_rank=None,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    ),
}
TOL = 1e-4


def build(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-zero router biases so routing is exercised as trained
        for moe in model.moe_layers():
            moe.e_score_correction_bias.normal_(std=0.05)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_equal_full_forward_in_chunks(name):
    cfg = CONFIGS[name]
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), one_thread():
        full = model(tokens).logits  # (B, T, V)
        cache = LatentCache(cfg, batch=2, max_len=48)
        # a multi-token prefill, single tokens, then another chunk at an offset (causal mask with offset)
        pieces = [
            forward_cached(model, tokens[:, a:b], cache, last_only=False)
            for a, b in [(0, 17), (17, 18), (18, 19), (19, 40)]
        ]
    cached = torch.cat(pieces, dim=1)
    assert cache.length == 40
    assert full.abs().max() > 1.0  # the bound below is meaningful
    torch.testing.assert_close(cached, full, atol=TOL, rtol=0)


def test_cache_holds_the_normalized_latent_and_rotated_rope_key():
    """Cache contents equal what the full forward computes inside MLA (captured with hooks), and
    nothing per-head is stored: (kv_lora_rank + qk_rope_head_dim) values per token and layer."""
    cfg = TINY
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    latents, rope_in = [], []
    hooks = []
    for block in model.layers:
        attn = block.self_attn
        hooks.append(attn.kv_a_layernorm.register_forward_hook(lambda m, i, o: latents.append(o)))
        hooks.append(attn.kv_a_proj_with_mqa.register_forward_hook(lambda m, i, o: rope_in.append(o)))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    cache = LatentCache(cfg, batch=1, max_len=12)
    with torch.no_grad():
        forward_cached(model, tokens, cache)
    L, r, dr = cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    assert cache.c_kv.shape == (L, 1, 12, r) and cache.k_rope.shape == (L, 1, 12, dr)
    from seektrain.model.layers import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(cfg, 12, torch.device("cpu"))
    for layer in range(L):
        torch.testing.assert_close(cache.c_kv[layer], latents[layer], atol=1e-5, rtol=0)
        k_rope = apply_rope(rope_in[layer][..., r:].unsqueeze(1), cos, sin).squeeze(1)
        torch.testing.assert_close(cache.k_rope[layer], k_rope, atol=1e-5, rtol=0)
    assert cache.bytes_per_token() == L * (r + dr) * 4 == latent_bytes_per_token(cfg, torch.float32)
    naive = naive_bytes_per_token(cfg, torch.float32)
    assert naive == L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    assert cache.bytes_per_token() / naive == pytest.approx((r + dr) / (cfg.num_attention_heads * (48 + 32)))


def test_greedy_with_cache_equals_full_forward_each_step(trained_run):
    model = load_run(trained_run).model
    prompt = [
        int(t)
        for t in torch.randint(3, model.cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(3))
    ]
    sampling = SamplingConfig(max_new_tokens=64, temperature=0)
    with one_thread():
        cached = list(generate(model, prompt, sampling, use_cache=True))
        reference = list(generate(model, prompt, sampling, use_cache=False))
    assert len(cached) == 64
    assert cached == reference


def test_seeded_sampling_is_reproducible_and_matches_without_cache(trained_run):
    model = load_run(trained_run).model
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    with one_thread():
        a = list(generate(model, [5, 6, 7], sampling))
        b = list(generate(model, [5, 6, 7], sampling))
        c = list(generate(model, [5, 6, 7], sampling, use_cache=False))
        d = list(generate(model, [5, 6, 7], dataclasses.replace(sampling, seed=8)))
    assert a == b == c
    assert a != d  # 24 draws from a peaked but non-degenerate distribution: a collision is implausible


def test_sampler_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, generator=gen) * 3
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(50):
        picked = sample_next(logits, SamplingConfig(temperature=1.0, top_k=5), gen)
        assert all(picked[b] in top5[b] for b in range(4))
    probs = logits.softmax(-1)
    for _ in range(50):
        picked = sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), gen)
        for b in range(4):  # tokens whose strictly-more-likely mass already reaches 0.5 are never drawn
            more_likely = probs[b][probs[b] > probs[b, picked[b]]].sum()
            assert more_likely < 0.5
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=0), None), greedy)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=2.0, top_k=1), gen), greedy)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=2.0, top_p=1e-6), gen), greedy)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tiny_temperature_samples_the_greedy_token(temperature, dtype):
    """logits / 1e-40 overflowed to ±inf in fp32 and the softmax gave nan (multinomial raised); a
    temperature that small is in effect greedy, with or without the filters."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 100, generator=gen) * 3).to(dtype)
    greedy = logits.argmax(-1)
    for options in (dict(), dict(top_k=5), dict(top_p=0.5)):
        cfg = SamplingConfig(temperature=temperature, **options)
        assert torch.equal(sample_next(logits, cfg, gen), greedy), options


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(temperature=float("nan")),
        dict(top_k=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(max_new_tokens=-2),
        dict(seed=2**64),  # past what torch's generator takes: was a ValueError traceback mid-output
        dict(seed=-(2**63) - 1),
    ],
)
def test_bad_sampling_options_are_user_errors(kwargs):
    with pytest.raises(UserError):
        SamplingConfig(**kwargs)


def test_prompt_that_does_not_fit_the_context_is_refused_before_any_work():
    cfg = dataclasses.replace(TINY, max_position_embeddings=32, num_hidden_layers=1)
    model = build(cfg)
    with pytest.raises(UserError, match="context of 32 tokens"):
        list(generate(model, list(range(40)), SamplingConfig(max_new_tokens=1)))
    with pytest.raises(UserError, match="context of 32 tokens"):
        list(generate(model, list(range(30)), SamplingConfig(max_new_tokens=5)))
    with pytest.raises(UserError, match=r"^the prompt \(1 token\) plus --max-new-tokens 32 exceeds"):
        list(generate(model, [0], SamplingConfig(max_new_tokens=32)))
    assert len(list(generate(model, list(range(30)), SamplingConfig(max_new_tokens=2, temperature=0)))) == 2
