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


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_plain_attention_matches_sdpa_flash(autocast, monkeypatch):
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    mla = MLA(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 40, cfg.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(cfg, 40, x.device)
    assert attention_mod.CPU_PLAIN_ATTENTION_MAX_LEN >= 40
    plain = run(mla, x, cos, sin, autocast)
    monkeypatch.setattr(attention_mod, "CPU_PLAIN_ATTENTION_MAX_LEN", 0)
    flash = run(mla, x, cos, sin, autocast)
    # fp32: the same sums in another order. bf16: both round scores/probabilities to bf16 at different
    # points (flash keeps its running softmax in fp32): observed up to 1.1e-2 of the largest entry.
    tol = 1e-5 if not autocast else 2e-2
    for a, b in zip((plain[0], *plain[1]), (flash[0], *flash[1]), strict=True):
        assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max() / b.abs().max()
