"""DeepSeekMoE routing and the grouped expert computation, against direct references."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import seektrain.model.moe as moe_mod
from seektrain.model.config import ModelConfig
from seektrain.model.moe import MoE, route

TINY = ModelConfig.from_preset("tiny")  # 16 experts in 4 groups, 2 groups kept, top-4


def test_group_limit_is_respected():
    torch.manual_seed(0)
    cfg = TINY
    logits = torch.randn(512, cfg.n_routed_experts) * 3
    bias = torch.randn(cfg.n_routed_experts) * 0.1
    _, idx, _ = route(logits, bias, cfg)
    per_group = cfg.n_routed_experts // cfg.n_group
    choice = (logits.sigmoid() + bias).view(-1, cfg.n_group, per_group)
    group_scores = choice.topk(2, dim=-1).values.sum(-1)  # (N, G)
    best_groups = group_scores.topk(cfg.topk_group, dim=-1).indices  # (N, topk_group)
    for t in range(idx.shape[0]):
        groups = set((idx[t] // per_group).tolist())
        assert len(groups) <= cfg.topk_group
        assert groups <= set(best_groups[t].tolist())
        # within the kept groups, the chosen experts are the top-k of the biased scores
        allowed = [e for g in best_groups[t].tolist() for e in range(g * per_group, (g + 1) * per_group)]
        flat = choice.view(-1, cfg.n_routed_experts)[t]
        expected = sorted(allowed, key=lambda e: -flat[e].item())[: cfg.num_experts_per_tok]
        assert sorted(idx[t].tolist()) == sorted(expected)


def test_bias_changes_selection_but_not_combine_weights():
    torch.manual_seed(1)
    cfg = TINY
    logits = torch.randn(256, cfg.n_routed_experts)
    w0, idx0, scores = route(logits, torch.zeros(cfg.n_routed_experts), cfg)
    bias = torch.zeros(cfg.n_routed_experts)
    bias[5] = 10.0  # expert 5 (group 1) now always wins
    w1, idx1, scores1 = route(logits, bias, cfg)
    assert (idx1 == 5).any(-1).all()
    assert not torch.equal(idx0.sort(-1).values, idx1.sort(-1).values)
    torch.testing.assert_close(scores1, scores, rtol=0, atol=0)
    # weights are the UNBIASED affinities of the chosen experts, normalized, times the scaling factor
    chosen = scores.gather(1, idx1)
    torch.testing.assert_close(w1, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    assert torch.allclose(w1.sum(-1), torch.full((256,), cfg.routed_scaling_factor))


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: the same routing, then each expert as a plain SwiGLU over its tokens, one at a time."""
    B, T, D = x.shape
    flat = x.reshape(-1, D)
    logits = F.linear(flat.float(), moe.gate.weight.float())
    weights, idx, _ = route(logits, moe.e_score_correction_bias, moe.cfg)
    out = torch.zeros_like(flat)
    inter = moe.experts.down_proj.shape[-1]
    for e in range(moe.cfg.n_routed_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        w_gate, w_up = moe.experts.gate_up_proj[e, :inter], moe.experts.gate_up_proj[e, inter:]
        h = F.silu(flat[tok] @ w_gate.T) * (flat[tok] @ w_up.T)
        out = out.index_add(0, tok, (h @ moe.experts.down_proj[e].T) * weights[tok, slot, None])
    return out.view(B, T, D) + moe.shared_experts(x)


@pytest.mark.parametrize("kernel", [True, False], ids=["grouped_mm", "per_expert_fallback"])
def test_grouped_path_matches_naive_reference_in_output_and_gradients(kernel, monkeypatch):
    if kernel and not moe_mod._has_grouped_mm_kernel(torch.zeros(1), torch.zeros(1)):
        pytest.skip("this torch build has no CPU grouped_mm kernel")
    if not kernel:
        monkeypatch.setattr(moe_mod, "_has_grouped_mm_kernel", lambda x, w: False)
    torch.manual_seed(2)
    cfg = dataclasses.replace(TINY, hidden_size=32, moe_intermediate_size=24)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.e_score_correction_bias.normal_(std=0.05)
    x = torch.randn(3, 20, cfg.hidden_size, requires_grad=True)
    y, counts, _ = moe(x)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *moe.parameters()], grad)

    y_ref = naive_moe(moe, x)
    want = torch.autograd.grad(y_ref, [x, *moe.parameters()], grad)
    # fp32, different summation order (grouped GEMM vs per-expert matmul, sum over k vs index_add): ~1e-6.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    _, idx, _ = route(F.linear(x.reshape(-1, 32), moe.gate.weight), moe.e_score_correction_bias, cfg)
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts))
    assert counts.sum() == 3 * 20 * cfg.num_experts_per_tok


@pytest.mark.parametrize("hidden, inter", [(33, 24), (32, 22)], ids=["hidden-33", "expert-22"])
def test_sizes_the_grouped_kernel_cannot_take_run_per_expert(hidden, inter):
    """The grouped kernels need strides in multiples of 16 bytes: a hidden or expert size that is not a
    multiple of 4 (fp32) or 8 (bf16) takes the per-expert GEMMs (it was a RuntimeError from the kernel
    after the model was built). The same values as the reference, fp32 and bf16."""
    torch.manual_seed(4)
    moe = MoE(dataclasses.replace(TINY, hidden_size=hidden, moe_intermediate_size=inter))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 40, hidden, requires_grad=True)
    y, _, _ = moe(x)
    y.sum().backward()
    torch.testing.assert_close(y, naive_moe(moe, x), rtol=1e-5, atol=1e-5)  # fp32 summation order
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _, _ = moe(x)
    y16.float().sum().backward()
    torch.testing.assert_close(y16.float(), y, rtol=0.05, atol=0.05)  # bf16 GEMM inputs: ~1e-2 here


def test_moe_is_bitwise_deterministic():
    torch.manual_seed(3)
    moe = MoE(dataclasses.replace(TINY, hidden_size=32))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 16, 32)

    def run():
        moe.zero_grad()
        y, _, _ = moe(x)
        (y**2).sum().backward()
        return y, [p.grad.clone() for p in moe.parameters()]

    (y1, g1), (y2, g2) = run(), run()
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_sequence_balance_loss():
    cfg = dataclasses.replace(TINY, hidden_size=32, seq_aux_loss_alpha=0.01)
    moe = MoE(cfg)
    torch.nn.init.zeros_(moe.gate.weight)  # equal affinities: P_i = 1/E, and sum_i f_i = E, so L = α exactly
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 8, 32)
    _, _, balance = moe(x)
    assert balance.item() == pytest.approx(0.01, rel=1e-6)

    torch.nn.init.normal_(moe.gate.weight, std=1.0)  # uneven affinities: the loss must push on the router
    _, _, balance = moe(x)
    assert balance.item() > 0.0
    (grad,) = torch.autograd.grad(balance, [moe.gate.weight])
    assert grad.abs().sum() > 0

    off = MoE(dataclasses.replace(cfg, seq_aux_loss_alpha=0.0))
    assert off(x)[2].item() == 0.0


def test_router_runs_in_fp32_under_autocast(monkeypatch):
    torch.manual_seed(4)
    moe = MoE(dataclasses.replace(TINY, hidden_size=32))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 16, 32)
    seen = {}

    def spy(logits, bias, cfg):
        seen["logits"] = logits
        return route(logits, bias, cfg)

    monkeypatch.setattr(moe_mod, "route", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
    assert seen["logits"].dtype == torch.float32
    torch.testing.assert_close(seen["logits"], x.reshape(-1, 32) @ moe.gate.weight.T, rtol=1e-6, atol=1e-6)


def test_per_expert_fallback_compiles_as_one_graph(monkeypatch):
    """The per-expert fallback (no grouped kernel: fp32 under torch.compile on CPU) is a custom op, so the
    MoE compiles as one graph instead of breaking it at the host read of the counts (plain torch.compile,
    as `train.compile` calls it; fullgraph=True would trace the read instead), and gives eager's values
    and gradients (fp32, same GEMMs: rounding-level)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(moe_mod, "_has_grouped_mm_kernel", lambda x, w: False)
    torch.manual_seed(5)
    moe = MoE(dataclasses.replace(TINY, hidden_size=32))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 16, 32, requires_grad=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(moe, backend="aot_eager")

    def run(module):
        y, counts, _ = module(x)
        return y, counts, torch.autograd.grad(y.square().sum(), [x, *moe.parameters()])

    y, counts, grads = run(moe)
    y_c, counts_c, grads_c = run(compiled)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    assert torch.equal(counts, counts_c)
    torch.testing.assert_close(y_c, y, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_per_expert_fallback_with_an_expert_without_rows():
    """An expert that got no tokens contributes no rows and a zero weight gradient (its output buffers
    are written in place, so nothing may be left unwritten)."""
    torch.manual_seed(6)
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 8, 5, requires_grad=True)
    counts = torch.tensor([4, 0, 6])
    y = moe_mod.per_expert_mm(x, w, counts)
    want = torch.cat([x[:4] @ w[0], x[4:] @ w[2]])
    torch.testing.assert_close(y, want, rtol=0, atol=0)  # the same GEMMs
    grad = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, [x, w], grad)
    dx_ref, dw_ref = torch.autograd.grad(want, [x, w], grad)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(dw[1], torch.zeros(8, 5))
