"""LAMB against its formula computed by hand; weight decay only on matrices."""

import math

import torch

from seektrain.config import OptimConfig
from seektrain.train.optim import Lamb, build_optimizer


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
