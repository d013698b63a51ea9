"""LAMB and the one-pass AdamW (bf16 or fp32 moments, the clip folded in) against their formulas computed
by hand or torch's AdamW; weight decay only on matrices."""

import copy
import math

import pytest
import torch

from seektrain.config import OptimConfig
from seektrain.train.optim import Lamb, OnePassAdamW, build_optimizer, param_groups

BF16 = torch.bfloat16


def test_lamb_two_steps_match_hand_computation():
    p0 = [[1.0, -2.0], [0.5, 3.0]]
    grads = [[[0.1, -0.2], [0.3, 0.0]], [[-0.4, 0.1], [0.2, 0.5]]]
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-6, 0.01
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = Lamb([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)

    # reference in plain Python floats
    w = [x for row in p0 for x in row]
    m = [0.0] * 4
    v = [0.0] * 4
    for t, g in enumerate(grads, start=1):
        g = [x for row in g for x in row]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=False)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=False)]
        u = [
            (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) + wd * wi
            for mi, vi, wi in zip(m, v, w, strict=False)
        ]
        ratio = math.sqrt(sum(x * x for x in w)) / math.sqrt(sum(x * x for x in u))
        w = [wi - lr * ratio * ui for wi, ui in zip(w, u, strict=False)]

        p.grad = torch.tensor(g, dtype=torch.float64).view(2, 2)
        opt.step()
    # float64 on both sides: only rounding-order differences remain
    torch.testing.assert_close(
        p.detach().flatten(), torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )


def test_lamb_zero_weight_uses_ratio_one():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Lamb([p], lr=0.5, betas=(0.9, 0.999), eps=1e-30)
    p.grad = torch.tensor([1.0, -2.0, 0.0])
    opt.step()
    # step 1: m̂ = g, v̂ = g², u = sign(g) (0 where g = 0), ratio 1
    torch.testing.assert_close(p.detach(), torch.tensor([-0.5, 0.5, 0.0]))


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2} and {p.ndim for p in no_decay["params"]} == {1}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert isinstance(build_optimizer(model, OptimConfig(name="lamb")), Lamb)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def test_adamw_bf16_moments_match_hand_computation():
    """Three steps against the formula with the moments rounded to bf16 after each update, as the
    optimizer stores them; the update itself uses the unrounded fp32 moments of the step. The same fp32
    operations in the same order on both sides: equal to the last bit."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, generator=g)
    grads = [torch.randn(5, 3, generator=g) * 10 ** (-i) for i in range(3)]
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.95, 1e-8, 0.1
    p = torch.nn.Parameter(p0.clone())
    opt = OnePassAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, moment_dtype=BF16)

    w, m, v = p0.clone(), torch.zeros(5, 3), torch.zeros(5, 3)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731 — the optimizer's fp32 scalars
    for t, grad in enumerate(grads, start=1):
        m32 = m * f32(b1) + grad * (1 - f32(b1))
        v32 = v * f32(b2) + grad.square() * (1 - f32(b2))
        m, v = bf16(m32), bf16(v32)
        update = m32 / (v32.sqrt() / f32(1 - b2**t).sqrt() + f32(eps)) * (f32(lr) / f32(1 - b1**t))
        w = w * (1 - f32(lr) * f32(wd)) - update

        p.grad = grad.clone()
        opt.step()
    state = opt.state[p]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(state["exp_avg"].float(), m) and torch.equal(state["exp_avg_sq"].float(), v)
    assert torch.equal(p.detach(), w)


def test_adamw_bf16_moments_follow_fp32_adamw():
    """30 steps on a small regression against torch's AdamW with fp32 moments, same hyperparameters.
    Each step moves a weight by at most ~lr; bf16 moments perturb that step by ~2^-8 relative, and the
    perturbations compound through the trajectory: bound 30·lr·1e-2 = 3e-3 (measured 1.1e-3; without the
    bias corrections 2.9e-2, without weight decay 1.4e-2)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    lr = 1e-2
    cfg = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = OnePassAdamW(model.parameters(), **cfg, moment_dtype=BF16)
    ref = torch.optim.AdamW(twin.parameters(), **cfg, foreach=False)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for _ in range(30):
        for net, opt in ((model, ours), (twin, ref)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    pairs = list(zip(model.parameters(), twin.parameters(), initial, strict=True))
    apart = max((a - b).abs().max().item() for a, b, _ in pairs)
    travelled = max((b - w0).abs().max().item() for _, b, w0 in pairs)
    assert apart <= 30 * lr * 1e-2, apart
    assert travelled > 10 * lr  # and they did train, by far more than that bound


def test_adamw_bf16_moments_state_dict_round_trip_continues_exactly():
    """Saved and loaded (torch casts loaded moments to the parameter's fp32; the optimizer casts them back),
    the optimizer continues bit for bit like one never interrupted."""

    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))

    def run(steps, optimizer=None, model=None):
        torch.manual_seed(1)
        model = model or torch.nn.Linear(6, 4)
        optimizer = optimizer or OnePassAdamW(
            model.parameters(), lr=0.05, betas=(0.9, 0.95), moment_dtype=BF16
        )
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        return model, optimizer

    straight, _ = run(6)
    model, opt = run(3)
    saved = copy.deepcopy(opt.state_dict())
    fresh = OnePassAdamW(model.parameters(), lr=0.05, betas=(0.9, 0.95), moment_dtype=BF16)
    fresh.load_state_dict(saved)
    assert {s["exp_avg"].dtype for s in fresh.state.values()} == {torch.bfloat16}
    resumed, _ = run(3, fresh, model)
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("moment_dtype", [torch.float32, BF16])
def test_one_pass_adamw_compiled_equals_eager(moment_dtype):
    """The compiled path (what runs on a GPU) computes the same update, clip factor included; here on CPU
    through inductor's C++ kernels, which may contract a multiply-add: rel 1e-6. With bf16 moments such
    a rounding may flip a stored moment's bf16 rounding, which the later steps' updates inherit: bounded
    by Σ lr · 2^-6 (derived in tests/model/test_gpu.py, where it happened)."""
    torch.manual_seed(2)
    a = torch.nn.Linear(16, 8)
    b = copy.deepcopy(a)
    opt_a = OnePassAdamW(a.parameters(), lr=0.01, weight_decay=0.1, moment_dtype=moment_dtype)
    opt_b = OnePassAdamW(b.parameters(), lr=0.01, weight_decay=0.1, compiled=True, moment_dtype=moment_dtype)
    x = torch.randn(4, 16)
    # lr and the factor change every step: no recompile, as the scalars and the factor are tensors
    for lr, factor in ((0.01, 0.5), (0.005, None), (0.002, 0.25)):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.scale_gradients(None if factor is None else torch.tensor(factor))
            opt.step()
    atol = 1e-7 if moment_dtype == torch.float32 else (0.01 + 0.005 + 0.002) * 2**-6
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=atol)


def test_one_pass_adamw_with_fp32_moments_steps_like_torch_adamw():
    """Four steps with changing lr, two parameter groups (decay and none), against torch's AdamW loop.
    Same formula, operations grouped differently (torch lerps m and adds the step with addcdiv): a few fp32
    roundings per step, rtol 1e-6."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    hyper = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    ours = OnePassAdamW(param_groups(model, 0.1), **hyper)
    ref = torch.optim.AdamW(param_groups(twin, 0.1), **hyper, foreach=False)
    x = torch.randn(32, 8)
    for lr in (0.01, 0.02, 0.005, 0.01):
        for net, opt in ((model, ours), (twin, ref)):
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    assert ours.state[next(model.parameters())]["exp_avg"].dtype == torch.float32
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_scale_gradients_scales_one_step_and_leaves_the_gradients_alone():
    """A factor given to `scale_gradients` acts like gradients multiplied by it beforehand (the same fp32
    product: bit for bit), is used by the next step only (the step after it is unscaled), and is dropped
    by zero_grad (a step the trainer discarded after clipping). The stored gradients are never written."""
    torch.manual_seed(0)
    grads = [torch.randn(6, 4) for _ in range(3)]
    factor = torch.tensor(0.3)

    def run(scaled_by_hand: bool):
        p = torch.nn.Parameter(torch.ones(6, 4))
        opt = OnePassAdamW([p], lr=0.1, weight_decay=0.1)
        for i, g in enumerate(grads):
            if i == 2:  # a discarded step: its factor must not reach the next one
                opt.scale_gradients(torch.tensor(0.0))
                opt.zero_grad()
            p.grad = g * factor if scaled_by_hand and i == 0 else g.clone()
            if not scaled_by_hand and i == 0:
                opt.scale_gradients(factor)
            opt.step()
            if not scaled_by_hand:
                assert torch.equal(p.grad, g)
        return p.detach()

    assert torch.equal(run(scaled_by_hand=False), run(scaled_by_hand=True))


def test_state_dtype_bf16_builds_the_one_pass_optimizer_for_adamw_only():
    model = torch.nn.Linear(4, 4)
    bf16 = build_optimizer(model, OptimConfig(state_dtype="bf16"))
    assert isinstance(bf16, OnePassAdamW) and bf16.moment_dtype == BF16
    assert type(build_optimizer(model, OptimConfig())) is torch.optim.AdamW


def test_adamw_on_cpu_is_torch_fused_kernel_and_steps_like_the_loop():
    """The trainer's AdamW on CPU is torch's fused kernel; three steps agree with the per-tensor loop to
    fp32 rounding (rtol 1e-5: the kernel may contract a*b+c into one FMA)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    cfg = OptimConfig(weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(
        param_groups(reference, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=False,
    )
    x = torch.randn(5, 8)
    for _ in range(3):
        for net, o in ((model, opt), (reference, ref_opt)):
            net(x).square().sum().backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
