"""Stepper.clip: gradients are scaled to the clip norm when above it, and left untouched (no pass over
them) when below; with the one-pass AdamW the factor goes into its update instead."""

import dataclasses

import torch

from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer
from seektrain.train.optim import OnePassAdamW, param_groups
from seektrain.train.step import Stepper, fused_norm, global_norm

CFG = dataclasses.replace(
    ModelConfig.from_preset("tiny"), num_hidden_layers=2, hidden_size=64, vocab_size=512, num_mtp_layers=0
)


def gradients_after_clip(grad_clip: float) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """The norm clip() returns, the gradients before it and after it."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    stepper = Stepper(model, optimizer, "fp32", torch.device("cpu"), grad_clip=grad_clip)
    tokens = torch.randint(0, CFG.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    norm = stepper.forward_backward([(tokens[:, :-1], tokens[:, 1:])], 0.0, 0).grad_norm
    before = [p.grad.clone() for p in model.parameters()]
    stepper.clip()
    return norm, before, [p.grad for p in model.parameters()]


def test_gradients_above_the_clip_are_scaled_to_it():
    norm, before, after = gradients_after_clip(0.05)
    assert norm > 0.05
    assert abs(global_norm(after).item() - 0.05) < 1e-6  # fp32 rounding of the scaled gradients
    scale = 0.05 / (norm + 1e-6)
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b * scale, rtol=1e-6, atol=0)


def test_gradients_below_the_clip_are_untouched(monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("clip_grads_with_norm_ ran although the factor is 1")

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", no_pass)
    norm, before, after = gradients_after_clip(1e6)
    assert norm < 1e6 and norm == global_norm(before).item()
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_clip_folds_into_the_one_pass_adamw():
    """With OnePassAdamW the clip is no pass of its own: the gradients stay as they are (two steps, both
    clipped) and the update scales them. The first step equals torch's AdamW after clip_grads_with_norm_
    to fp32 rounding (rtol 1e-6: the same formula, grouped differently), weights and first moments (the
    moments carry the gradient's scale, which a first Adam step all but cancels); later steps are not
    compared, as their gradients inherit those roundings and m/√v magnifies them where v is tiny."""
    tokens = torch.randint(0, CFG.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    first_step = {}
    for folded in (True, False):
        torch.manual_seed(0)
        model = Transformer(CFG)
        optimizer_class = OnePassAdamW if folded else torch.optim.AdamW
        optimizer = optimizer_class(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95))
        stepper = Stepper(model, optimizer, "fp32", torch.device("cpu"), grad_clip=0.05)
        for step in range(2):
            assert stepper.forward_backward(batch, 0.0, 0).grad_norm > 0.05
            before = [p.grad.clone() for p in model.parameters()]
            stepper.clip()
            unchanged = all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before, strict=True))
            assert unchanged is folded
            stepper.apply(1e-2)
            if step == 0:
                moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
                first_step[folded] = [p.detach().clone() for p in model.parameters()] + moments
    for a, b in zip(first_step[True], first_step[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cuda_graph_bookkeeping_keeps_accumulation_exact():
    """With cuda_graphs the step copies the blocks' first-micro-batch gradients out before the next one
    (on a GPU the replay would overwrite them; on the CPU nothing is recorded, the copies run the same).
    Accumulation over two micro-batches is unchanged, and only the blocks' gradients were replaced."""
    tokens = torch.randint(0, CFG.vocab_size, (4, 33), generator=torch.Generator().manual_seed(2))
    micro = [(tokens[:2, :-1], tokens[:2, 1:]), (tokens[2:, :-1], tokens[2:, 1:])]
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = Transformer(CFG)
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
        stepper = Stepper(model, optimizer, "fp32", torch.device("cpu"), grad_clip=0.0, cuda_graphs=graphs)
        first = {}  # name -> the .grad tensor autograd installed at the first micro-batch

        def remember(q, name, first=first):
            if name not in first:
                first[name] = q.grad

        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda q, name=name, remember=remember: remember(q, name))
        norm = stepper.forward_backward(micro, 0.0, 0).grad_norm
        replaced = {name for name, p in model.named_parameters() if p.grad is not first[name]}
        results.append((norm, [p.grad.clone() for p in model.parameters()], replaced))
    (norm_plain, grads_plain, replaced_plain), (norm_graphs, grads_graphs, replaced_graphs) = results
    assert norm_graphs == norm_plain
    assert all(torch.equal(a, b) for a, b in zip(grads_graphs, grads_plain, strict=True))
    assert not replaced_plain  # plain: the first .grad tensor accumulates the second micro-batch in place
    assert replaced_graphs and all(name.startswith("layers.") for name in replaced_graphs)
    assert "embed_tokens.weight" not in replaced_graphs


def test_fused_norm_equals_the_fp64_sum_of_squares():
    """The CUDA path's multi-tensor kernels accumulate in fp64 like the per-tensor path: same fp32 norm.
    (Checked here on CPU, where `_foreach_norm` runs the same arithmetic per tensor.)"""
    g = torch.Generator().manual_seed(0)
    sizes_and_scales = [(300_000, 1e-3), (5_000, 2.0), (70_000, 0.1), (7, 5.0)]
    grads = [torch.randn(n, generator=g) * scale for n, scale in sizes_and_scales]
    assert fused_norm(grads).item() == global_norm(grads).item()
