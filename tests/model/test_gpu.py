"""CUDA-only checks: the native grouped GEMM path and the padded-v flash attention path."""

import dataclasses

import pytest
import torch

import seektrain.model.moe as moe_mod
from seektrain.model.config import ModelConfig
from seektrain.model.moe import MoE
from seektrain.model.transformer import Transformer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_grouped_mm_kernel_matches_per_expert_fallback_in_bf16(monkeypatch):
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.from_preset("small"), hidden_size=256, moe_intermediate_size=128)
    moe = MoE(cfg).cuda()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4, 256, 256, device="cuda", requires_grad=True)
    assert moe_mod._has_grouped_mm_kernel(x.bfloat16(), moe.experts.gate_up_proj.bfloat16())

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, counts, _ = moe(x)
        weights = [x, moe.experts.gate_up_proj, moe.experts.down_proj]
        grads = torch.autograd.grad(y.float().square().sum(), weights)
        return y.float(), grads

    y_kernel, g_kernel = run()
    monkeypatch.setattr(moe_mod, "_has_grouped_mm_kernel", lambda x, w: False)
    y_loop, g_loop = run()
    # both bf16 GEMMs with fp32 accumulation; only the kernels' blocking differs
    torch.testing.assert_close(y_kernel, y_loop, rtol=2e-2, atol=2e-3)
    for a, b in zip(g_kernel, g_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_cuda_fp32_forward_matches_cpu():
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.from_preset("tiny"), vocab_size=1024)
    cpu = Transformer(cfg)
    gpu = Transformer(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    tokens = torch.randint(0, 1024, (2, 64))
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        a = cpu(tokens).logits
        b = gpu(tokens.cuda()).logits.cpu()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelConfig.from_preset("tiny"))
    tokens = torch.randint(0, 8192, (2, 129), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
