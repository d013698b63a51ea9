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
    monkeypatch.setattr(ce_mod, "_slice_elements", lambda device, dtype: 32 * VOCAB)


def inputs(scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(2, 37, DIM, generator=g) * scale).requires_grad_()
    weight = torch.randn(VOCAB, DIM, generator=g).requires_grad_()
    targets = torch.randint(0, VOCAB, (2, 37), generator=g)
    targets[0, 5] = targets[1, :7] = IGNORE_INDEX
    return h, weight, targets


def loss_head(h, weight, targets):
    """One group through the module: (loss sum, count)."""
    sums, counts = LinearCrossEntropy()([h], weight, [targets])
    return sums[0], counts[0]


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
    loss, count = loss_head(h, weight, targets)
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
    got = value_and_grads(lambda *a: loss_head(*a)[0], h, weight, targets, scale, autocast=True)
    want = value_and_grads(reference, h, weight, targets, scale, autocast=True)
    assert got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)  # same bf16 logits, fp32 loss
    for a, b in zip(got[1:], want[1:], strict=True):
        assert (a - b).abs().max() <= 2**-7 * b.abs().max()


def test_extreme_logits_stay_finite(small_slices):
    """Logits spread over ±1e4: exp(z_t - max) underflows to 0 for most targets, so the target logit must
    be read before exponentiating, never recovered as log(exp(.))."""
    h, weight, targets = inputs(scale=300.0)
    loss, _ = loss_head(h, weight, targets)
    want = reference(h, weight, targets)
    assert torch.isfinite(loss) and loss.item() > 1e4
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)


def test_every_target_ignored_is_zero_with_zero_gradients():
    h, weight, targets = inputs()
    loss, count = loss_head(h, weight, torch.full_like(targets, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0 and not h.grad.any() and not weight.grad.any()


@pytest.mark.parametrize("bf16", [False, True])
def test_no_grad_gives_the_same_loss(small_slices, bf16):
    """Without a gradient each slice is multiplied on its own (3 slices, the last ragged), with one all
    rows at once: the same sums, bit for bit."""
    h, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with_grad, _ = loss_head(h, weight, targets)
        with torch.no_grad():
            without, _ = loss_head(h, weight, targets)
    assert torch.equal(with_grad.detach(), without) and not without.requires_grad


def test_compiled_matches_eager():
    """Under torch.compile the plain formulation is traced (aot_eager: same graph, no generated kernels)."""
    h, weight, targets = inputs()
    eager = value_and_grads(lambda *a: loss_head(*a)[0], h, weight, targets, 1.0, autocast=False)
    compiled_fn = torch.compile(LinearCrossEntropy(), backend="aot_eager", fullgraph=True)

    def compiled_head(h, weight, targets):
        return compiled_fn([h], weight, [targets])[0][0]

    compiled = value_and_grads(compiled_head, h, weight, targets, 1.0, autocast=False)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_groups_share_the_head_and_keep_their_own_sums(small_slices):
    """Main model and MTP rows in one call: per-group sums and counts, gradients as two separate losses
    weighted differently (0.5 and 0.2, like 1/N_main and lambda/N_mtp)."""
    h, weight, targets = inputs()
    h2 = torch.randn(1, 30, DIM, generator=torch.Generator().manual_seed(1)).requires_grad_()
    targets2 = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    (s1, s2), (c1, c2) = LinearCrossEntropy()([h, h2], weight, [targets, targets2])
    got = torch.autograd.grad(0.5 * s1 + 0.2 * s2, [h, h2, weight])
    r1, r2 = reference(h, weight, targets), reference(h2, weight, targets2)
    want = torch.autograd.grad(0.5 * r1 + 0.2 * r2, [h, h2, weight])
    assert (c1.item(), c2.item()) == (N_ROWS - 8, 30)
    torch.testing.assert_close(torch.stack([s1, s2]), torch.stack([r1, r2]), rtol=1e-5, atol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fp16_gradients_survive_the_loss_scale():
    """fp16 autocast with a GradScaler-like incoming gradient (2^16 / N). Entries in {-3, 0, 3} make every
    logit an exact integer (up to ±39) in fp16 and fp32 alike, so the only differences from fp32 come
    from rounding the gradient: scaled before that rounding, every row of dh and dW stays within 0.2% of
    its largest entry (observed); stored unscaled, probabilities below fp16's range flush to zero and
    whole rows of dW vanish."""
    g = torch.Generator().manual_seed(3)
    h = (torch.randint(-1, 2, (1, 64, DIM), generator=g) * 3).float().requires_grad_()
    weight = torch.randint(-1, 2, (VOCAB, DIM), generator=g).float().requires_grad_()
    targets = torch.randint(0, VOCAB, (1, 64), generator=g)
    scale = torch.tensor(2.0**16 / 64)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_head(h, weight, targets)[0]
    got = torch.autograd.grad(loss * scale, [h, weight])
    want = torch.autograd.grad(reference(h, weight, targets) * scale, [h, weight])
    for a, b in zip(got, want, strict=True):
        row_scale = b.abs().amax(-1, keepdim=True).clamp(min=1e-30)
        assert ((a - b).abs() / row_scale).max() <= 1e-2
