"""The sliced head + cross-entropy against F.linear then F.cross_entropy, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

import seektrain.model.cross_entropy as ce_mod
from seektrain.model.cross_entropy import IGNORE_INDEX, LinearCrossEntropy

N_ROWS, DIM, VOCAB = 2 * 37, 24, 300


@pytest.fixture
def small_slices(monkeypatch):
    """32 rows per slice: the 74 rows run as 3 slices, the last one ragged."""
    monkeypatch.setitem(ce_mod._SLICE_ELEMENTS, "cpu", 32 * VOCAB)


def inputs(scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(2, 37, DIM, generator=g) * scale).requires_grad_()
    weight = torch.randn(VOCAB, DIM, generator=g).requires_grad_()
    targets = torch.randint(0, VOCAB, (2, 37), generator=g)
    targets[0, 5] = targets[1, :7] = IGNORE_INDEX
    return h, weight, targets


def reference(h, weight, targets):
    logits = F.linear(h, weight).flatten(0, 1)
    return F.cross_entropy(logits.float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def value_and_grads(fn, h, weight, targets, grad_scale, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, weight, targets)
    return (loss, *torch.autograd.grad(loss * grad_scale, [h, weight]))


def test_matches_reference_in_fp32(small_slices):
    h, weight, targets = inputs()
    scale = torch.tensor(0.37)  # the backward's incoming gradient, e.g. 1 / token count
    loss, count = LinearCrossEntropy()(h, weight, targets)
    got = (loss, *torch.autograd.grad(loss * scale, [h, weight]))
    want = value_and_grads(reference, h, weight, targets, scale, autocast=False)
    assert count.item() == N_ROWS - 8 and loss.dtype == torch.float32
    # Same fp32 arithmetic, other order (per-slice sums, logsumexp - z_t): rounding-level differences.
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not got[1][0, 5].any() and not got[1][1, :7].any()  # ignored rows get no gradient


def test_matches_reference_under_bf16_autocast(small_slices):
    """Both round the logits and their gradient to bf16 once; the reference rounds them whole, this one
    slice by slice, so they agree to about one bf16 step of the largest entries (2^-8 relative)."""
    h, weight, targets = inputs()
    scale = torch.tensor(0.37)
    got = value_and_grads(lambda *a: LinearCrossEntropy()(*a)[0], h, weight, targets, scale, autocast=True)
    want = value_and_grads(reference, h, weight, targets, scale, autocast=True)
    assert got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)  # same bf16 logits, fp32 loss
    for a, b in zip(got[1:], want[1:], strict=True):
        assert (a - b).abs().max() <= 2**-7 * b.abs().max()


def test_extreme_logits_stay_finite(small_slices):
    """Logits spread over ±1e4: exp(z_t - max) underflows to 0 for most targets, so the target logit must
    be read before exponentiating, never recovered as log(exp(.))."""
    h, weight, targets = inputs(scale=300.0)
    loss, _ = LinearCrossEntropy()(h, weight, targets)
    want = reference(h, weight, targets)
    assert torch.isfinite(loss) and loss.item() > 1e4
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)


def test_every_target_ignored_is_zero_with_zero_gradients():
    h, weight, targets = inputs()
    loss, count = LinearCrossEntropy()(h, weight, torch.full_like(targets, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0 and not h.grad.any() and not weight.grad.any()


def test_no_grad_gives_the_same_loss():
    h, weight, targets = inputs()
    with_grad, _ = LinearCrossEntropy()(h, weight, targets)
    with torch.no_grad():
        without, _ = LinearCrossEntropy()(h, weight, targets)
    assert torch.equal(with_grad.detach(), without) and not without.requires_grad


def test_compiled_matches_eager():
    """Under torch.compile the plain formulation is traced (aot_eager: same graph, no generated kernels)."""
    h, weight, targets = inputs()
    loss_fn = LinearCrossEntropy()
    eager = value_and_grads(lambda *a: loss_fn(*a)[0], h, weight, targets, 1.0, autocast=False)
    compiled_fn = torch.compile(LinearCrossEntropy(), backend="aot_eager", fullgraph=True)
    compiled = value_and_grads(lambda *a: compiled_fn(*a)[0], h, weight, targets, 1.0, autocast=False)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
