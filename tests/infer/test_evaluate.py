"""`seektrain eval`: loss, perplexity and bits per byte, checked against the trainer and the tokenizer."""

from __future__ import annotations

import json
import math

import numpy as np
from tokenizers import Tokenizer

from seektrain.data.loader import TokenLoader
from seektrain.infer.evaluate import token_byte_lengths

from .conftest import final_val_loss, sentencepiece_style_tokenizer


def test_eval_reproduces_the_trainers_val_loss(trained_run, seektrain):
    """The trainer's final evaluation scored the first 2 micro-batches of 8 windows (train.eval_batches=2)
    with the model's `main_loss_sum`; the same windows through `eval` must give the same mean. Both are sums
    of fp32 token CE that may come from different CE kernels, so they agree to rounding (~1e-7 relative);
    1e-5 still catches any real difference (other windows, weights or targets move it by > 1e-3)."""
    code, out, err = seektrain("eval", "--run", trained_run, "--batch-size", "8", "--max-batches", "2")
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == 2 * 8 * 64 and result["step"] == 60
    assert math.isclose(result["val_loss"], final_val_loss(trained_run), rel_tol=1e-5)


def test_whole_split_metrics_are_consistent(trained_run, data_dir, seektrain):
    code, out, err = seektrain("eval", "--run", trained_run, "--data", data_dir, "--seq-len", "128")
    assert code == 0, err
    r = json.loads(out)
    loader = TokenLoader(data_dir, split="val", seq_len=128, micro_batch_size=8, shuffle=False)
    assert r["tokens"] == loader.num_sequences * 128  # every window scored once
    assert math.isclose(r["perplexity"], math.exp(r["val_loss"]), rel_tol=1e-9)
    assert math.isclose(
        r["bits_per_byte"], r["val_loss"] * r["tokens"] / math.log(2) / r["bytes"], rel_tol=1e-9
    )
    # bytes = the UTF-8 length of the scored targets' text, decoded by the tokenizer itself
    targets = np.concatenate([y.numpy().ravel() for _, y in loader.epoch()])
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    assert r["bytes"] == len(tok.decode(targets.tolist(), skip_special_tokens=True).encode())
    assert 0 < r["bits_per_byte"] < 8


def test_byte_lengths_of_special_and_multibyte_tokens(data_dir):
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    lengths = token_byte_lengths(tok)
    assert lengths[tok.token_to_id("<|eos|>")] == 0
    for text in ["é", "→", "日本"]:  # multi-byte characters split into byte-level tokens
        ids = tok.encode(text).ids
        assert lengths[ids].sum() == len(text.encode())


def test_eval_refuses_data_with_another_tokenizer(trained_run, other_data_dir, seektrain):
    code, out, err = seektrain("eval", "--run", trained_run, "--data", other_data_dir)
    assert code == 2 and "another tokenizer" in err and out == ""


def test_eval_refuses_a_sequence_longer_than_the_models_context(trained_run, seektrain):
    code, out, err = seektrain("eval", "--run", trained_run, "--seq-len", "4096")
    assert code == 2 and out == "" and "longer than the model's context of 2048 tokens" in err


def test_a_diverged_models_perplexity_is_infinite_and_its_json_strict(data_dir):
    """A loss above ln(float max) ≈ 709.8 nats (weights blown up by a diverged run) used to raise
    OverflowError in math.exp; perplexity is then inf, written as null so the output stays strict JSON."""
    import torch

    from seektrain.config import load_config
    from seektrain.infer.evaluate import EvalConfig, evaluate_model
    from seektrain.model.transformer import Transformer
    from seektrain.train.metrics import strict_dumps
    from toy_model import TOY_MODEL

    cfg = load_config(overrides=[*TOY_MODEL, "model.vocab_size=512"]).model_config()
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    eval_cfg = EvalConfig(seq_len=32, max_batches=1)
    result = evaluate_model(model, data_dir, 32, token_byte_lengths(tok), eval_cfg)
    assert result["loss"] > 710 and result["perplexity"] == math.inf

    printed = strict_dumps(result)  # as `seektrain eval` prints it
    assert json.loads(printed)["perplexity"] is None


def test_byte_lengths_of_sentencepiece_style_tokens_add_up_to_the_decoded_text():
    """The scored targets (every token after the first) count the bytes their text adds to the decoded
    sequence: "▁▁▁▁" is four spaces (decoded alone, three: the decoder strips the text's first space),
    and a byte-fallback token is one byte (alone it decodes to U+FFFD, three)."""
    tok = sentencepiece_style_tokenizer()
    lengths = token_byte_lengths(tok)
    assert lengths[tok.token_to_id("▁▁▁▁")] == 4 and lengths[tok.token_to_id("<0xC3>")] == 1
    for text in ["if x:\n    return é", "x = f(a)    if é→x\n\n  re"]:
        ids = tok.encode(text).ids
        assert tok.token_to_id("▁▁▁▁") in ids and tok.token_to_id("<0xC3>") in ids
        added = len(tok.decode(ids).encode()) - len(tok.decode(ids[:1]).encode())
        assert lengths[ids[1:]].sum() == added


def test_byte_lengths_without_a_decoder_count_each_token_alone():
    """decode() of a tokenizer without a decoder joins tokens with spaces that are not the text's: each
    token's bytes are its own text's, as decoded alone (the anchor would add one space per token)."""
    from tokenizers import models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "é": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tok.decoder is None
    lengths = token_byte_lengths(tok)
    assert list(lengths) == [5, 5, 2, 5]
