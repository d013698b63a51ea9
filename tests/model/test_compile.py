"""torch.compile (as the trainer applies it) computes the same losses and gradients as eager, in one graph
per block: a graph break would silently cost the fusions the GPU speed relies on.

Inductor's CPU code generation takes minutes on a cold cache, so only the value test generates kernels (for
a 1-layer model); the graph-break tests trace with `aot_eager`: dynamo and AOT autograd, the parts our code
can break."""

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import seektrain.model.moe as moe_mod
from seektrain.distributed.parallelize import apply_activation_checkpointing, apply_compile
from seektrain.model.config import ModelConfig
from seektrain.model.moe import MoE
from seektrain.model.transformer import Transformer

TINY = ModelConfig.from_preset("tiny")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters()]


def tiny_model_and_batch(layers: int = 2):
    cfg = dataclasses.replace(TINY, num_hidden_layers=layers, hidden_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    return model, tokens[:, :-1], tokens[:, 1:]


def test_compiled_model_matches_eager():
    eager, x, y = tiny_model_and_batch(layers=1)  # 1 dense layer + the MoE MTP block
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    want, got = eager(x, y), compiled(x, y)
    want.loss.backward()
    got.loss.backward()
    # fp32; inductor fuses and reorders reductions: rounding-level differences (~1e-6 relative).
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    assert torch.equal(got.expert_counts, want.expert_counts)
    for g, w in zip(grads(compiled), grads(eager), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_compiled_bf16_blocks_have_no_graph_break():
    """bf16 is the GPU training dtype; in fp32 on CPU the experts take the per-expert fallback (a host
    sync, hence a break), because the traced grouped GEMM accepts bf16 only."""
    if moe_mod._TORCH_VERSION < (2, 11):
        pytest.skip("compiled code takes the grouped GEMM on CPU from torch 2.11 (the fallback breaks)")
    model, x, y = tiny_model_and_batch()
    apply_compile(model, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    out.loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads(model))


def test_compiled_gpu_combine_matches_eager(monkeypatch):
    """The GPU formulation of the MoE (gathers through the inverse permutation) traces whole."""
    monkeypatch.setattr(moe_mod, "_index_add_is_deterministic", lambda device: False)
    torch.manual_seed(1)
    moe = MoE(dataclasses.replace(TINY, hidden_size=32))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 24, 32, requires_grad=True)
    grad = torch.randn(2, 24, 32)
    y, counts, _ = moe(x)
    want = torch.autograd.grad(y, [x, *moe.parameters()], grad)
    y_c, counts_c, _ = torch.compile(moe, fullgraph=True, backend="aot_eager")(x)
    got = torch.autograd.grad(y_c, [x, *moe.parameters()], grad)
    assert torch.equal(counts, counts_c)
    # fp32, fused and reordered sums; gradients of entries near 0 are sums of ~1e-1 terms that cancel,
    # so their error is absolute (a few 1e-6), not relative.
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def count_backward_ops(mode: str) -> tuple[int, int]:
    """(aten.mm calls, all aten calls) run by the backward pass: gradient GEMMs plus recomputed forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        matmuls = ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.matmuls += func is torch.ops.aten.mm.default
            CountOps.ops += 1
            return func(*args, **(kwargs or {}))

    model, x, y = tiny_model_and_batch()
    if mode != "none":
        apply_activation_checkpointing(model, mode)
    loss = model(x, y).loss
    with CountOps():
        loss.backward()
    return CountOps.matmuls, CountOps.ops


def test_selective_checkpointing_keeps_the_gemm_outputs():
    """full recomputes every block GEMM in the backward; selective recomputes the rest but no GEMM."""
    (plain_mm, plain_ops), (full_mm, full_ops), (sel_mm, sel_ops) = map(
        count_backward_ops, ("none", "full", "selective")
    )
    assert full_mm > plain_mm and sel_mm == plain_mm
    assert plain_ops < sel_ops < full_ops  # selective does recompute: the elementwise work


def test_selective_checkpointing_compiles_without_graph_breaks():
    """In bf16, as on GPU (in fp32 the CPU experts' fallback breaks the graph, see above)."""
    if moe_mod._TORCH_VERSION < (2, 11):
        pytest.skip("compiled code takes the grouped GEMM on CPU from torch 2.11 (the fallback breaks)")
    eager, x, y = tiny_model_and_batch()
    model = copy.deepcopy(eager)
    apply_activation_checkpointing(model, "selective")
    apply_compile(model, backend="aot_eager")
    losses = []
    for m in (eager, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, y)
        out.loss.backward()
        losses.append(out.loss.item())
    assert not counters["graph_break"], dict(counters["graph_break"])
    # aot_eager runs the same aten ops (a few through decompositions that round bf16 differently)
    assert abs(losses[1] - losses[0]) <= 1e-3 * losses[0]
    for (name, g), w in zip(model.named_parameters(), grads(eager), strict=True):
        assert ((g.grad - w).norm() / w.norm()).item() <= 1e-2, name
