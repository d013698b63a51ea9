"""MLA's two attention paths on CPU: the plain formulation (short sequences) and SDPA's flash kernel."""

import pytest
import torch

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
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_plain_attention_matches_sdpa_flash(autocast, T, monkeypatch):
    """The plain formulation (whole, or its first half of the queries on its own) against SDPA's flash
    kernel, output and every gradient."""
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    mla = MLA(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, T, cfg.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(cfg, T, x.device)
    assert attention_mod.CPU_PLAIN_ATTENTION_MAX_LEN >= T
    assert (T >= 2 * attention_mod.CAUSAL_SPLIT_MIN_ROWS) == (T == 81)
    plain = run(mla, x, cos, sin, autocast)
    monkeypatch.setattr(attention_mod, "CPU_PLAIN_ATTENTION_MAX_LEN", 0)
    flash = run(mla, x, cos, sin, autocast)
    # fp32: the same sums in another order. bf16: both round scores/probabilities to bf16 at different
    # points (flash keeps its running softmax in fp32): observed up to 1.1e-2 of the largest entry.
    tol = 1e-5 if not autocast else 2e-2
    for a, b in zip((plain[0], *plain[1]), (flash[0], *flash[1]), strict=True):
        assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max() / b.abs().max()
