"""RMSNorm's written-out backward against autograd through the plain formulation."""

import pytest
import torch
from torch.func import functional_call

from seektrain.model.layers import RMSNorm, rms_norm


def test_backward_matches_autograd_in_float64():
    """gradcheck: x and the gain against finite differences, on rows of very different scales; and the
    forward is the plain formulation's, op for op."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 30.0], dtype=torch.float64)[:, None, None]
    x = (torch.randn(3, 5, 16, generator=g, dtype=torch.float64) * scales).requires_grad_()
    weight = torch.randn(16, generator=g, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(16, eps=1e-6).double()

    def normed(x, weight):
        return functional_call(norm, {"weight": weight}, (x,))

    assert torch.equal(normed(x, weight), rms_norm(x, weight, 1e-6))
    assert torch.autograd.gradcheck(normed, (x, weight))
    assert torch.autograd.gradcheck(normed, (x[0, 0].detach().requires_grad_(), weight))  # one row, (D,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_precision_matches_autograd(dtype):
    """fp32 rows (the residual stream) and bf16 rows (the latent norms under autocast): the same output
    bit for bit; gradients to fp32 rounding (fp32), and for bf16 rows within one bf16 rounding of dx."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 64, generator=g).to(dtype)
    grad = torch.randn(4, 32, 64, generator=g)
    norm = RMSNorm(64)
    norm.weight.data.normal_(1.0, 0.1, generator=g)
    results = []
    for fn in (norm, lambda x: rms_norm(x, norm.weight, norm.eps)):
        xi = x.clone().requires_grad_()
        norm.weight.grad = None
        y = fn(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, norm.weight.grad.clone()))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = results
    assert y.dtype == y_ref.dtype == torch.float32 and torch.equal(y, y_ref)
    assert dx.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(dx.float(), dx_ref.float(), **tol)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
