"""MLA's two attention paths on CPU: the plain formulation (short sequences in bf16/fp16) and SDPA's flash
kernel."""

import pytest
import torch
import torch.nn.functional as F

import seektrain.model.attention as attention_mod
from seektrain.model.attention import MLA
from seektrain.model.config import ModelConfig
from seektrain.model.layers import rope_cos_sin


def run(mla: MLA, x: torch.Tensor, cos, sin, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = mla(x, cos, sin)
    grads = torch.autograd.grad(y.float().square().sum(), [x, *mla.parameters()])
    return y.float(), grads


@pytest.mark.parametrize("T", [40, 81], ids=["one block", "halves, odd length"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plain_causal_attention_matches_sdpa(dtype, T):
    """The plain formulation (whole, or its first half of the queries on its own) against SDPA, output
    and the three gradients. fp32: the same sums in another order (1e-5). bf16: the plain form rounds the
    probabilities to bf16 before their GEMM (2e-2 of the largest entry)."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, T, 24, generator=g).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(2, 3, T, 16, generator=g).to(dtype).requires_grad_()
    assert (T >= 2 * attention_mod.CAUSAL_SPLIT_MIN_ROWS) == (T == 81)
    results = []
    for fn in (attention_mod.causal_attention, None):
        if fn is None:
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=0.2)
        else:
            y = fn(q, k, v, 0.2)
        results.append([y.float(), *torch.autograd.grad(y.float().square().sum(), [q, k, v])])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(*results, strict=True):
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_written_out_backward_gives_autograds_bits(dtype):
    """With a gradient to come, the split runs as one autograd Function with its backward written out;
    it computes what autograd does on the two blocks, op for op: output and gradients bit for bit."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 81, 24, generator=g).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(2, 3, 81, 16, generator=g).to(dtype).requires_grad_()
    results = []
    for y in (
        attention_mod.causal_attention(q, k, v, 0.2),
        torch.cat([attention_mod._causal_block(*half, 0.2) for half in attention_mod._halves(q, k, v)], -2),
    ):
        results.append([y, *torch.autograd.grad(y.float().square().sum(), [q, k, v])])
    assert results[0][0].grad_fn.name() == "_SplitCausalAttentionBackward"
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_mla_on_cpu_in_bf16_plain_matches_flash(monkeypatch):
    """Through the layer under bf16 autocast (where the CPU takes the plain form up to
    CPU_PLAIN_ATTENTION_MAX_LEN tokens) against SDPA's flash kernel: output and every gradient. Both round
    scores/probabilities to bf16 at different points (flash keeps its running softmax in fp32): observed
    up to 1.1e-2 of the largest entry."""
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    mla = MLA(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 81, cfg.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(cfg, 81, x.device)
    assert attention_mod.CPU_PLAIN_ATTENTION_MAX_LEN >= 81
    calls = []
    real = attention_mod.causal_attention
    monkeypatch.setattr(attention_mod, "causal_attention", lambda *a: calls.append(1) or real(*a))
    plain = run(mla, x, cos, sin, autocast=True)
    assert calls, "the plain form did not run"
    monkeypatch.setattr(attention_mod, "CPU_PLAIN_ATTENTION_MAX_LEN", 0)
    flash = run(mla, x, cos, sin, autocast=True)
    assert len(calls) == 1
    for a, b in zip((plain[0], *plain[1]), (flash[0], *flash[1]), strict=True):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max(), (a - b).abs().max() / b.abs().max()


def test_mla_on_cpu_in_fp32_takes_sdpa(monkeypatch):
    """fp32 always goes through SDPA on CPU (as fast or faster than the plain form at every length)."""

    def refuse(*args):
        raise AssertionError("plain attention ran in fp32")

    monkeypatch.setattr(attention_mod, "causal_attention", refuse)
    cfg = ModelConfig.from_preset("tiny")
    mla = MLA(cfg)
    x = torch.randn(2, 40, cfg.hidden_size)
    cos, sin = rope_cos_sin(cfg, 40, x.device)
    assert mla(x, cos, sin).shape == x.shape
