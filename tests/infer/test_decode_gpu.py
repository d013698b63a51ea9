"""CUDA-only: the latent-cache decode path on GPU kernels (masked SDPA over shared latents), fp32 and bf16."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from seektrain.infer.decode import forward_cached
from seektrain.infer.generate import SamplingConfig, generate
from seektrain.infer.kv_cache import LatentCache
from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# `small` attention (16 heads, kv_lora_rank 256, no q low-rank), fewer layers/experts to stay quick;
# initializer_range 0.1 gives O(1) logits and peaked routing.
CFG = dataclasses.replace(ModelConfig.from_preset("small"), num_hidden_layers=3, n_routed_experts=16,
                          vocab_size=2048, initializer_range=0.1)  # fmt: skip


def build(dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(CFG).eval()
    model.to(dtype)
    for moe in model.moe_layers():
        moe.e_score_correction_bias.data = moe.e_score_correction_bias.data.float()
    return model


def cached_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    cache = LatentCache(CFG, tokens.shape[0], tokens.shape[1], "cuda", model.embed_tokens.weight.dtype)
    pieces = [
        forward_cached(model, tokens[:, a:b], cache, last_only=False)
        for a, b in [(0, 50), (50, 51), (51, 64)]
    ]
    return torch.cat(pieces, dim=1).float()


@torch.no_grad()
def test_cached_logits_equal_full_forward_fp32_and_bf16():
    tokens = torch.randint(
        0, CFG.vocab_size, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
    )
    ref = build(torch.float32)
    full32 = ref(tokens).logits.float()
    # fp32 (TF32 off, torch's default for matmul): only summation order differs, as on the CPU
    torch.testing.assert_close(cached_logits(ref, tokens), full32, atol=1e-4, rtol=0)
    # bf16: both paths round differently; the latent path must be no less accurate than the model's own
    # bf16 forward, measured against the fp32 forward of the same weights
    model = build(torch.bfloat16)
    err_full = (model(tokens).logits.float() - full32).abs().max().item()
    err_cached = (cached_logits(model, tokens) - full32).abs().max().item()
    assert err_cached <= 2 * err_full + 1e-2, (err_cached, err_full)


def test_greedy_generation_on_gpu_matches_the_full_forward():
    model = build(torch.float32)
    prompt = list(range(5, 37))
    greedy = SamplingConfig(max_new_tokens=32, temperature=0)
    cached = list(generate(model, prompt, greedy))
    full = list(generate(model, prompt, greedy, use_cache=False))
    with torch.no_grad():  # the argmax margins along the sequence dwarf fp32 noise, so equality is meaningful
        logits = model(torch.tensor([prompt + full], device="cuda")).logits[0, len(prompt) - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert cached == full
