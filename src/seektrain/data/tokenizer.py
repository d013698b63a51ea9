"""Byte-level BPE tokenizer (HF `tokenizers`): train one, or load an existing `tokenizer.json`.

The special tokens are standard strings recorded in the manifest with their ids, so the file also
loads with `transformers.PreTrainedTokenizerFast(tokenizer_file=…, bos_token="<|bos|>", …)`.
Documents are encoded without special tokens, and special-token text inside them ("<|eos|>" in a chat log)
is encoded as ordinary text (workers.py); the shard writer appends EOS after each document, so special
ids appear only where the pipeline puts them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from seektrain.errors import UserError, first_line

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Names tried in order when an existing tokenizer lacks the one asked for (--special-tokens): ours, then
# other tokenizers'.
_EOS_FALLBACKS = (EOS, "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")
_BOS_FALLBACKS = (BOS, "<s>", "<bos>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>")
_PAD_FALLBACKS = (PAD, "<pad>", "<|padding|>")


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE of `vocab_size` (with bos/eos/pad), or load `path` when given."""

    vocab_size: int = 8192
    path: str | None = None
    bos_token: str = BOS
    eos_token: str = EOS
    pad_token: str = PAD
    min_frequency: int = 2

    def __post_init__(self) -> None:
        if self.path is None and not 260 <= self.vocab_size <= 1 << 24:
            raise UserError(f"vocab size must be at least 260 (256 bytes + specials), got {self.vocab_size}")
        if self.path is None:
            for token in (self.bos_token, self.eos_token, self.pad_token):
                if len(_pre_tokenizer().pre_tokenize_str(token)) < 2:
                    raise UserError(
                        f"special token {token!r} is a piece ordinary text can form (BPE may learn it from "
                        f"the corpus, and its id would then appear inside documents): use a bracketed form "
                        f"such as <|{token.strip('<|>') or 'eos'}|>"
                    )


def _pre_tokenizer():
    """How a trained BPE cuts text before merging: special tokens must span several of its pieces."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def train_bpe(batches: Iterable[list[str]], cfg: TokenizerConfig):
    """A byte-level BPE trained on batches of texts; special tokens get ids 0, 1, 2 (bos, eos, pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.bos_token, cfg.eos_token, cfg.pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(batches, trainer)
    return tok


def load_tokenizer(path: str):
    """An existing tokenizer.json; UserError when it is missing or does not parse."""
    from tokenizers import Tokenizer

    if not Path(path).is_file():  # tokenizers reports these as a parse error
        what = "is a directory" if Path(path).is_dir() else "not found"
        raise UserError(f"tokenizer file {what}: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        raise UserError(
            f"tokenizer file does not parse as a HF tokenizers JSON: {path} ({first_line(e)})"
        ) from e


def special_tokens(tok, cfg: TokenizerConfig) -> dict[str, dict]:
    """{"bos"|"eos"|"pad": {"token", "id"}} in the vocabulary; EOS is required (it ends documents)."""
    found = {}
    for role, name, fallbacks in (
        ("bos", cfg.bos_token, _BOS_FALLBACKS),
        ("eos", cfg.eos_token, _EOS_FALLBACKS),
        ("pad", cfg.pad_token, _PAD_FALLBACKS),
    ):
        for candidate in dict.fromkeys((name, *fallbacks)):
            i = tok.token_to_id(candidate)
            if i is not None:
                found[role] = {"token": candidate, "id": int(i)}
                break
    if "eos" not in found:
        names = ", ".join(dict.fromkeys((cfg.eos_token, *_EOS_FALLBACKS)))
        raise UserError(
            f"tokenizer has no end-of-document token (one of {names}); use one that has, or let prepare "
            "train one"
        )
    return found
