"""The Transformer forward: shapes, exact loss sums/counts, MTP shifting, causality, init, gradients."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from seektrain.model.config import ModelConfig
from seektrain.model.layers import RMSNorm, rope_cos_sin
from seektrain.model.transformer import Transformer

CFG = dataclasses.replace(ModelConfig.from_preset("tiny"), vocab_size=512)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG)


def batch(B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
    targets = seq[:, 1:].clone()
    targets[0, 3] = targets[1, -1] = -100  # some ignored positions
    return seq[:, :-1], targets


def test_shapes_and_expert_counts(model):
    tokens, _ = batch()
    out = model(tokens)
    assert out.logits.shape == (2, 24, CFG.vocab_size) and out.loss is None
    assert out.expert_counts.shape == (CFG.num_moe_layers, CFG.n_routed_experts)
    assert out.expert_counts.dtype == torch.int64
    assert (out.expert_counts.sum(1) == 2 * 24 * CFG.num_experts_per_tok).all()
    # returned per call, never accumulated
    assert torch.equal(model(tokens).expert_counts, out.expert_counts)
    assert out.mtp_expert_counts is None  # MTP runs only with targets


def test_mtp_expert_counts_cover_every_position(model):
    tokens, targets = batch()
    counts = model(tokens, targets).mtp_expert_counts
    assert counts.shape == (len(model.mtp_moe_layers()), CFG.n_routed_experts) == (CFG.num_mtp_layers, 16)
    assert (counts.sum(1) == 2 * 24 * CFG.num_experts_per_tok).all()


def test_loss_sums_and_counts_are_exact(model):
    tokens, targets = batch()
    out = model(tokens, targets)
    assert out.logits is None  # the loss head never materializes them
    logits = model(tokens).logits.flatten(0, 1).float()
    want = F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="sum")
    # fp32, the head's GEMM and the log-sum-exp in slices vs whole: rounding-level differences.
    torch.testing.assert_close(out.main_loss_sum, want, rtol=1e-6, atol=0)
    assert out.main_count.dtype == torch.int64 and out.main_count.item() == 2 * 24 - 2
    assert out.mtp_count.item() == (targets[:, 1:] != -100).sum().item()
    assert torch.isfinite(out.mtp_loss_sum) and out.mtp_loss_sum.item() != out.main_loss_sum.item()
    expected = (
        out.main_loss_sum / out.main_count
        + CFG.mtp_loss_weight * out.mtp_loss_sum / out.mtp_count
        + out.balance_loss
    )
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
    assert out.balance_loss.item() == 0.0  # α = 0 in the preset


def test_main_loss_alone_without_mtp(model, monkeypatch):
    """`mtp=False` (evaluation) scores the main model only: its loss sum as with MTP, the MTP modules never
    called, their terms zero."""
    tokens, targets = batch()
    full = model(tokens, targets)
    monkeypatch.setattr(type(model.mtp[0]), "forward", lambda *a, **kw: pytest.fail("MTP ran"))
    out = model(tokens, targets, mtp=False)
    # fp32; the main rows are sliced alone instead of beside the MTP rows: rounding-level differences.
    torch.testing.assert_close(out.main_loss_sum, full.main_loss_sum, rtol=1e-6, atol=0)
    assert torch.equal(out.main_count, full.main_count) and out.logits is None
    assert out.mtp_loss_sum.item() == 0 and out.mtp_count.item() == 0
    assert out.mtp_expert_counts.shape == (0, CFG.n_routed_experts)
    torch.testing.assert_close(out.loss, out.main_loss_sum / out.main_count, rtol=0, atol=0)


@pytest.mark.parametrize("mtp_input", ["normed", "unnormed"])
def test_mtp_predicts_the_tokens_ahead_from_the_previous_stage(mtp_input):
    """Recompute two depths by hand: depth k gets Emb(t_{i+k}) and the previous stage's hidden state after
    that stage's final norm (the main model's `norm`, then depth 1's), or before it with
    `mtp_input="unnormed"` (seektrain's convention before 2026-11-27), and is scored on t_{i+k+1}."""
    cfg = dataclasses.replace(CFG, num_mtp_layers=2, mtp_input=mtp_input)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for module in model.modules():  # gains away from 1, so that a norm left out or added shows
        if isinstance(module, RMSNorm):
            module.weight.data.uniform_(0.5, 1.5)
    tokens, targets = batch()
    out = model(tokens, targets)
    T = tokens.shape[1]
    cos, sin = rope_cos_sin(cfg, T, tokens.device)
    h = model.embed_tokens(tokens)
    for block in model.layers:
        h = block(h, cos, sin)[0]
    hidden, normed, want = h, model.norm(h), torch.zeros(())
    for k, module in enumerate(model.mtp, start=1):
        ahead = torch.cat([tokens[:, k:], tokens[:, :k]], dim=1)  # the last k columns: any token
        hidden = module(normed if mtp_input == "normed" else hidden, model.embed_tokens(ahead), cos, sin)[0]
        normed = module.norm(hidden)
        logits = model.lm_head(normed)[:, : T - k]  # the last k positions have no target k+1 ahead
        want = want + F.cross_entropy(
            logits.flatten(0, 1), targets[:, k:].flatten(), ignore_index=-100, reduction="sum"
        )
    torch.testing.assert_close(out.mtp_loss_sum, want, rtol=1e-5, atol=1e-5)


def test_causal(model):
    tokens, _ = batch()
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % CFG.vocab_size
    a, b = model(tokens).logits, model(changed).logits
    # Not bitwise: which rows share an expert's GEMM changes, so its blocking (summation order) can too.
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-5)
    assert (a[:, 10:] - b[:, 10:]).abs().amax() > 1e-2


def test_meta_build_then_init_equals_direct_build():
    torch.manual_seed(7)
    direct = Transformer(CFG)
    with torch.device("meta"):
        lazy = Transformer(CFG)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    torch.manual_seed(7)
    lazy.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    tokens, targets = batch()
    assert torch.equal(direct(tokens, targets).loss, lazy(tokens, targets).loss)


def test_every_parameter_gets_a_gradient_and_the_bias_is_a_buffer(model):
    model.zero_grad()
    tokens, targets = batch()
    model(tokens, targets).loss.backward()
    names = {n for n, _ in model.named_parameters()}
    assert not any("e_score_correction_bias" in n for n in names)
    assert all(moe.e_score_correction_bias.dtype == torch.float32 for moe in model.moe_layers())
    assert "layers.1.mlp.e_score_correction_bias" in model.state_dict()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()


def test_balance_loss_enters_the_loss():
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(CFG, seq_aux_loss_alpha=0.001))
    tokens, targets = batch()
    out = m(tokens, targets)
    assert out.balance_loss.item() > 0
    # one term per MoE layer (main + MTP), each ≈ α when routing is near-uniform at init
    n_terms = CFG.num_moe_layers + CFG.num_mtp_layers
    assert out.balance_loss.item() == pytest.approx(0.001 * n_terms, rel=0.5)


def test_variants_without_mtp_or_with_tied_embeddings():
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, num_mtp_layers=0, tie_word_embeddings=True, q_lora_rank=None)
    plain = Transformer(cfg)
    assert plain.lm_head.weight is plain.embed_tokens.weight and len(plain.mtp) == 0
    tokens, targets = batch()
    out = plain(tokens, targets)
    assert out.mtp_loss_sum.item() == 0.0 and out.mtp_count.item() == 0
    torch.testing.assert_close(out.loss, out.main_loss_sum / out.main_count, rtol=0, atol=0)
    assert sum(p.numel() for p in plain.parameters()) == plain.cfg.num_params()
    dense = Transformer(dataclasses.replace(CFG, first_k_dense_replace=CFG.num_hidden_layers))
    assert dense(tokens).expert_counts.shape == (0, CFG.n_routed_experts)


def test_bad_token_shapes_raise(model):
    with pytest.raises(ValueError, match=r"\(B, T\) integer ids"):
        model(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(B, T\) integer ids"):
        model(torch.zeros(1, 8))
