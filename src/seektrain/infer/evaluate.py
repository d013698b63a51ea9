"""Validation loss, perplexity and bits per byte of a run on a data directory's split.

The split is cut into windows exactly as training cuts it (every token a target once), scored in fp32
sums: loss = Σ CE / #targets (nats), perplexity = exp(loss), and bits per byte = Σ CE / ln 2 / Σ bytes of
the target tokens' text. Bits per byte compares models with different tokenizers; special tokens
(the EOS between documents) count zero bytes but their loss is included.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seektrain.errors import UserError
from seektrain.model.transformer import Transformer


@dataclass
class EvalConfig:
    data: str | None = None  # None: the run's data.path
    split: str = "val"
    seq_len: int | None = None  # None: the run's data.seq_len
    batch_size: int = 8
    max_batches: int = 0  # 0 = the whole split
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_batches < 0:
            raise UserError(f"--max-batches must be >= 0, got {self.max_batches}")
        if self.seq_len is not None and self.seq_len < 1:
            raise UserError(f"--seq-len must be >= 1, got {self.seq_len}")


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(V,) UTF-8 bytes of each token's text; 0 for special tokens. Exact for byte-level BPE (each
    character of a token stands for one byte). Other tokenizers decode each token after an anchor token
    and count what it adds: decoded alone, a SentencePiece-style token ("▁if") loses its leading space to
    the decoder's strip of the text's start. A byte-fallback token (`<0xE2>`) is one byte, which decoded
    alone, or after an anchor, is an invalid UTF-8 sequence shown as U+FFFD (three bytes)."""
    from tokenizers import decoders, pre_tokenizers

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    byte_chars = set(pre_tokenizers.ByteLevel.alphabet())
    # without a decoder, decode() joins tokens with spaces that are not the text's: each token alone
    anchor = _anchor_token(tokenizer, vocab, specials) if tokenizer.decoder is not None else None
    anchor_bytes = len(tokenizer.decode([anchor]).encode()) if anchor is not None else 0
    for token, i in vocab.items():
        if token in specials:
            continue
        if byte_level and set(token) <= byte_chars:
            lengths[i] = len(token)
        elif _BYTE_FALLBACK.fullmatch(token) and tokenizer.decode([i]) != token:
            lengths[i] = 1
        elif anchor is not None:
            lengths[i] = len(tokenizer.decode([anchor, i]).encode()) - anchor_bytes
        else:
            lengths[i] = len(tokenizer.decode([i], skip_special_tokens=True).encode())
    return lengths


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _anchor_token(tokenizer, vocab: dict[str, int], specials: set[str]) -> int | None:
    """A token that decodes to one plain letter, to stand before each token being measured."""
    for text in ("a", "e", "x", "▁a", "Ġa"):
        i = vocab.get(text)
        if i is not None and text not in specials and tokenizer.decode([i]).strip().isalpha():
            return i
    return None


_LOG_FLOAT_MAX = math.log(sys.float_info.max)  # a diverged model's perplexity overflows a float


@torch.no_grad()
def evaluate_model(
    model: Transformer, data_dir: str | os.PathLike, seq_len: int, byte_lengths: np.ndarray, cfg: EvalConfig
) -> dict:
    """Score `model` on the split's windows; returns tokens, bytes, loss, perplexity, bits_per_byte."""
    from seektrain.data.loader import TokenLoader

    loader = TokenLoader(
        data_dir,
        split=cfg.split,
        seq_len=seq_len,
        micro_batch_size=cfg.batch_size,
        shuffle=False,
        verify=True,
    )
    if loader.vocab_size > model.cfg.vocab_size:
        raise UserError(
            f"{data_dir} has a vocabulary of {loader.vocab_size}, larger than the model's "
            f"{model.cfg.vocab_size}: it was prepared with another tokenizer"
        )
    device = model.embed_tokens.weight.device
    nats, tokens, nbytes = 0.0, 0, 0
    for i, (x, y) in enumerate(loader.epoch()):
        if cfg.max_batches and i >= cfg.max_batches:
            break
        # The loss head scores slices of rows: the (B, T, V) logits are never materialized.
        out = model(x.to(device), y.to(device), mtp=False)
        nats += float(out.main_loss_sum.double())
        tokens += y.numel()
        nbytes += int(byte_lengths[y.numpy()].sum())
    loss = nats / tokens
    return {
        "tokens": tokens,
        "bytes": nbytes,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < _LOG_FLOAT_MAX else math.inf,  # null in the JSON
        "bits_per_byte": nats / math.log(2) / nbytes if nbytes else None,
    }


def evaluate_run(
    run_dir: str | os.PathLike, cfg: EvalConfig, checkpoint: str | os.PathLike | None = None
) -> dict:
    """`seektrain eval`: load the run, check the data shares its tokenizer, score; a JSON-ready dict."""
    from seektrain.data.shards import tokenizer_file
    from seektrain.data.tokenizer import load_tokenizer
    from seektrain.infer.runs import data_dir_of, find_tokenizer, load_run

    run = load_run(run_dir, device=cfg.device, checkpoint=checkpoint)
    data = Path(cfg.data) if cfg.data else data_dir_of(run)
    if data is None:
        imported = run_dir if checkpoint is None else f"checkpoint {run.checkpoint}"
        raise UserError(f"{imported} was imported without data: pass --data DIR")
    data_tokenizer = load_tokenizer(str(tokenizer_file(data)))
    run_tok = find_tokenizer(run)  # None for a run imported without one: the data's then stands alone
    if run_tok is not None and load_tokenizer(str(run_tok)).get_vocab() != data_tokenizer.get_vocab():
        raise UserError(
            f"{data} was prepared with another tokenizer than the run's ({run_tok}); prepare it "
            f"with `seektrain prepare --tokenizer {run_tok} …`"
        )
    seq_len = cfg.seq_len or run.config.data.seq_len
    context = run.model.cfg.max_position_embeddings
    if seq_len > context:
        given = (
            f"--seq-len {seq_len}" if cfg.seq_len else f"the run's data.seq_len {seq_len} (pass --seq-len)"
        )
        raise UserError(f"{given} is longer than the model's context of {context} tokens")
    result = evaluate_model(run.model, data, seq_len, token_byte_lengths(data_tokenizer), cfg)
    return {
        "run": str(run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "data": str(data),
        "split": cfg.split,
        "seq_len": seq_len,
        "tokens": result["tokens"],
        "bytes": result["bytes"],
        f"{cfg.split}_loss": result["loss"],
        "perplexity": result["perplexity"],
        "bits_per_byte": result["bits_per_byte"],
    }
