"""The CPU-only fast paths (fused cross-entropy sum, gather + index_add_ MoE combine) vs the general ones."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import seektrain.model.moe as moe_mod
from seektrain.model.config import ModelConfig
from seektrain.model.moe import MoE
from seektrain.model.transformer import IGNORE_INDEX, TokenCrossEntropy


def logits_and_targets(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 40, 300, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (3, 40), generator=g)
    targets[0, 5] = targets[2, :7] = IGNORE_INDEX
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_entropy_sum_matches_torch_in_value_and_gradient(dtype):
    logits, targets = logits_and_targets(dtype)
    scale = torch.tensor(0.37)  # the backward's incoming gradient, e.g. 1 / token count
    loss, count = TokenCrossEntropy()(logits, targets)
    (got,) = torch.autograd.grad(loss * scale, logits)
    want_loss = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    (want,) = torch.autograd.grad(want_loss * scale, logits)
    assert count.item() == 3 * 40 - 8 and loss.dtype == torch.float32 and got.dtype == dtype
    # Same fp32 arithmetic in another order (logsumexp - x_t vs -(log-softmax at t)): rounding-level.
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    # fp32 gradients differ by rounding only; bf16 ones by at most one bf16 step (rel. 2^-8) after the cast.
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    assert (got[0, 5] == 0).all() and (got[2, :7] == 0).all()


def test_cross_entropy_sum_with_every_target_ignored_is_zero():
    logits, targets = logits_and_targets(torch.float32)
    loss, count = TokenCrossEntropy()(logits, torch.full_like(targets, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0 and not logits.grad.any()


def test_cross_entropy_sum_refuses_a_second_backward():
    """The backward reuses its saved buffer for the gradient; a retained graph must fail, not mislead."""
    logits, targets = logits_and_targets(torch.float32)
    loss, _ = TokenCrossEntropy()(logits, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


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
