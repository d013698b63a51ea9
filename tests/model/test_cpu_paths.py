"""The CPU-only MoE combine (gather + index_add_) vs the general one."""

import dataclasses

import torch

import seektrain.model.moe as moe_mod
from seektrain.model.config import ModelConfig
from seektrain.model.moe import MoE


def test_moe_cpu_combine_matches_the_gpu_formulation(monkeypatch):
    """gather + index_add_ (CPU) and gathers through the inverse permutation (GPU) compute the same MoE."""
    torch.manual_seed(4)
    moe = MoE(dataclasses.replace(ModelConfig.from_preset("tiny"), hidden_size=32))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 24, 32, requires_grad=True)
    grad = torch.randn(2, 24, 32)

    def run():
        y, counts, _ = moe(x)
        return y, counts, torch.autograd.grad(y, [x, *moe.parameters()], grad)

    y_cpu, counts_cpu, g_cpu = run()
    monkeypatch.setattr(moe_mod, "_index_add_is_deterministic", lambda device: False)
    y_gpu, counts_gpu, g_gpu = run()
    assert torch.equal(counts_cpu, counts_gpu)
    # fp32; only the order of the k-term sums differs: ~1e-7.
    torch.testing.assert_close(y_cpu, y_gpu, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_cpu, g_gpu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
