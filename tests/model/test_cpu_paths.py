"""The CPU-only MoE combine (gather + index_add_) vs the general one."""

import dataclasses

import torch

import seektrain.model.moe as moe_mod
from seektrain.model.config import ModelConfig
from seektrain.model.moe import MoE


def random_moe(seed: int, tokens: int) -> tuple[MoE, torch.Tensor, torch.Tensor]:
    """A small MoE with large random weights, an input (2, tokens, 32) and an output gradient."""
    torch.manual_seed(seed)
    moe = MoE(dataclasses.replace(ModelConfig.from_preset("tiny"), hidden_size=32))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe, torch.randn(2, tokens, 32, requires_grad=True), torch.randn(2, tokens, 32)


def run_moe(moe: MoE, x: torch.Tensor, grad: torch.Tensor):
    """Output, expert counts and the gradients of x and every parameter."""
    y, counts, _ = moe(x)
    return y, counts, torch.autograd.grad(y, [x, *moe.parameters()], grad)


def test_moe_cpu_combine_matches_the_gpu_formulation(monkeypatch):
    """gather + index_add_ (CPU) and gathers through the inverse permutation (GPU) compute the same MoE."""
    moe, x, grad = random_moe(4, tokens=24)
    y_cpu, counts_cpu, g_cpu = run_moe(moe, x, grad)
    monkeypatch.setattr(moe_mod, "_index_add_is_deterministic", lambda device: False)
    y_gpu, counts_gpu, g_gpu = run_moe(moe, x, grad)
    assert torch.equal(counts_cpu, counts_gpu)
    # fp32; only the order of the k-term sums differs: ~1e-7.
    torch.testing.assert_close(y_cpu, y_gpu, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_cpu, g_gpu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_pad_groups_places_every_pair_in_its_experts_padded_group():
    counts = torch.tensor([3, 0, 5, 1])
    expert = torch.repeat_interleave(torch.arange(4), counts)
    token = torch.tensor([7, 2, 4, 9, 1, 3, 8, 0, 6])
    scale = torch.arange(1.0, 10.0)[:, None]
    padded = moe_mod.pad_groups(token, scale, expert, counts, multiple=4, pad_token=10)
    padded_token, padded_scale, padded, position = padded
    # groups [4, 0, 8, x]; 9 + 4*3 = 21 rows -> 24, so the last group takes 24 - 12 = 12 rows
    assert padded.tolist() == [4, 0, 8, 12]
    assert padded_token.shape == (24,) and padded_scale.shape == (24, 1)
    starts = [0, 4, 4, 12]
    for e, (start, n) in enumerate(zip(starts, counts.tolist(), strict=True)):
        rows = slice(start, start + n)
        assert padded_token[rows].tolist() == token[expert == e].tolist()
        assert padded_scale[rows, 0].tolist() == scale[expert == e, 0].tolist()
    want_position = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts.tolist(), strict=True)])
    assert torch.equal(position, want_position)
    real = torch.zeros(24, dtype=torch.bool).index_fill_(0, position, True)
    assert (padded_scale[~real] == 0).all() and (padded_token[~real] == 10).all()


def test_groups_are_padded_only_for_low_precision_and_enough_rows():
    x, w = torch.zeros(1), torch.zeros(1)
    enough = moe_mod.PAD_MIN_GROUPS_PER_EXPERT * 16 * moe_mod.CPU_GROUP_ROWS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtype = moe_mod.gemm_dtype(x, w)
        assert moe_mod._pads_groups(dtype, enough, 16)
        assert not moe_mod._pads_groups(dtype, enough - 1, 16)
        assert not moe_mod._pads_groups(dtype, 6, 16)  # decoding one token: padding would multiply the work
    assert moe_mod._pads_groups(moe_mod.gemm_dtype(x, w.half()), enough, 16)
    # fp32 GEMMs (MKL) build no kernels
    assert not moe_mod._pads_groups(moe_mod.gemm_dtype(x, w), enough, 16)


def test_padded_expert_groups_compute_the_same_moe(monkeypatch):
    """The padded groups (CPU, low-precision experts) give the unpadded MoE's output and gradients: the
    padding rows add zeros. Run in fp32 with padding forced, so the comparison is at rounding level."""
    moe, x, grad = random_moe(6, tokens=40)
    seen = []
    experts_forward = moe.experts.forward

    def spy(x, counts, scale=None):
        seen.append(counts)
        return experts_forward(x, counts, scale=scale)

    monkeypatch.setattr(moe.experts, "forward", spy)
    y, counts, grads = run_moe(moe, x, grad)
    assert torch.equal(seen[-1], counts)  # fp32: the experts see the real groups
    monkeypatch.setattr(moe_mod, "_pads_groups", lambda dtype, pairs, n_experts: True)
    y_pad, counts_pad, grads_pad = run_moe(moe, x, grad)
    assert (seen[-1] % moe_mod.CPU_GROUP_ROWS == 0).all() and (seen[-1] >= counts).all()
    assert torch.equal(counts_pad, counts)  # the real counts still go to the balance update
    # fp32, same GEMMs on longer groups: ~1e-7
    torch.testing.assert_close(y_pad, y, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_pad, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_padding_rows_stay_zero_when_an_unused_expert_overflows_in_fp16(monkeypatch):
    """Padding rows get a zero input, so even an expert that overflows fp16 on real tokens (here one no
    token is routed to, with huge weights) adds nothing to them: token 0's output and every gradient
    stay finite, as without padding."""
    moe, x, grad = random_moe(7, tokens=40)
    with torch.no_grad():
        moe.e_score_correction_bias[-1] = -100.0  # nothing routes to the last expert
        moe.experts.gate_up_proj[-1] *= 2000.0  # its product with any real row overflows fp16
    monkeypatch.setattr(moe_mod, "_pads_groups", lambda dtype, pairs, n_experts: True)
    with torch.autocast("cpu", dtype=torch.float16):
        y, counts, grads = run_moe(moe, x, grad)
    assert counts[-1] == 0
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)


def test_padded_groups_in_bf16_match_unpadded(monkeypatch):
    """A real bf16 run, padded and not: the same products per row, from GEMMs of other lengths. bf16
    outputs and gradients may differ by a rounding (2^-8 relative) where oneDNN blocks them otherwise."""
    moe, x, grad = random_moe(8, tokens=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(moe_mod, "_pads_groups", lambda dtype, pairs, n_experts: False)
        y, counts, grads = run_moe(moe, x, grad)
        monkeypatch.setattr(moe_mod, "_pads_groups", lambda dtype, pairs, n_experts: True)
        y_pad, counts_pad, grads_pad = run_moe(moe, x, grad)
    assert torch.equal(counts, counts_pad)
    torch.testing.assert_close(y_pad, y, rtol=1e-2, atol=1e-2)
    for a, b in zip(grads_pad, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_spread_and_collect_rows_are_each_others_adjoint():
    """The padded CPU path moves rows with SpreadRows (gather; backward sums each token's k rows) and
    CollectRows (those sums; backward gathers): gradcheck in float64 checks each backward against finite
    differences, on a layout with padding rows (which read the zero row and get no gradient)."""
    N, k, D = 5, 3, 4
    order = torch.randperm(N * k, generator=torch.Generator().manual_seed(0))  # sorted row -> pair
    position = torch.tensor([0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17])  # 15 pairs in 18 rows
    token = torch.full((18,), N).index_copy_(0, position, order // k)
    pos = torch.empty_like(position).scatter_(0, order, position).view(N, k)
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(18, D, dtype=torch.float64, requires_grad=True)
    spread = moe_mod.SpreadRows.apply(x, token, pos, torch.float64)
    assert torch.equal(spread[position], x[order // k]) and (spread[[2, 7, 15]] == 0).all()
    assert torch.autograd.gradcheck(lambda x: moe_mod.SpreadRows.apply(x, token, pos, torch.float64), (x,))
    assert torch.autograd.gradcheck(lambda y: moe_mod.CollectRows.apply(y, token, pos), (y,))
    collected = moe_mod.CollectRows.apply(y, token, pos)
    torch.testing.assert_close(collected, y[pos].sum(1), rtol=0, atol=1e-12)


def test_spread_and_collect_rows_in_mixed_precision():
    """As the padded bf16 path runs them: fp32 token rows spread as bf16 rows, bf16 expert rows collected
    into fp32. The rows are x's, rounded once; every sum over a token's k rows (the combine, and the
    spread's backward) is taken in fp32 from the bf16 values: to fp32 rounding of the exact sums."""
    N, k, D = 5, 3, 8
    order = torch.randperm(N * k, generator=torch.Generator().manual_seed(1))
    position = torch.tensor([0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17])
    token = torch.full((18,), N).index_copy_(0, position, order // k)
    pos = torch.empty_like(position).scatter_(0, order, position).view(N, k)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    rows = moe_mod.SpreadRows.apply(x, token, pos, torch.bfloat16)
    assert rows.dtype == torch.bfloat16
    assert torch.equal(rows[position], x.detach()[order // k].bfloat16())
    grad_rows = torch.randn(18, D, generator=g).bfloat16()
    rows.backward(grad_rows)
    assert x.grad.dtype == torch.float32
    exact = grad_rows.double()[pos].sum(1)  # (N, D): each token's k gradient rows
    torch.testing.assert_close(x.grad.double(), exact, rtol=2**-22, atol=0)

    y = torch.randn(18, D, generator=g).bfloat16().requires_grad_()
    combined = moe_mod.CollectRows.apply(y, token, pos)
    assert combined.dtype == torch.float32
    torch.testing.assert_close(combined.double(), y.detach().double()[pos].sum(1), rtol=2**-22, atol=0)
    grad_combined = torch.randn(N, D, generator=g)
    combined.backward(grad_combined)
    assert y.grad.dtype == torch.bfloat16
    want = torch.cat([grad_combined, torch.zeros(1, D)]).bfloat16()[token]  # padding rows: 0
    assert torch.equal(y.grad, want)
