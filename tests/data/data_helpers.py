"""Helpers for the data tests: crafted pseudo-prose documents (no repetition) and toy prepare options."""

from __future__ import annotations

import random
from pathlib import Path

from seektrain.data.prepare import PrepareConfig

_SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "zen", "bar", "do", "fe", "gri", "hul", "jo"]


def make_doc(rng: random.Random, words: int = 120) -> str:
    """A document of random pseudo-words in short lines: no repeated lines or n-grams to speak of."""
    vocab = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(4 * words)]
    out, line = [], []
    for _ in range(words):
        line.append(rng.choice(vocab))
        if len(line) >= rng.randint(6, 14):
            out.append(" ".join(line) + ".")
            line = []
    out.append(" ".join(line) + ".")
    return "\n".join(out)


def make_docs(n: int, seed: int = 0, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [make_doc(rng, words) for _ in range(n)]


def write_corpus(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:04d}.txt").write_text(d)
    return folder


def small_config(inputs, out, **kw) -> PrepareConfig:
    """Toy sizes: a 384-token vocab, small shards (so windows cross shard boundaries), one process."""
    base = dict(
        inputs=[str(i) for i in inputs],
        out_dir=str(out),
        vocab_size=384,
        workers=1,
        shard_tokens=4096,
        progress=False,
        val_fraction=0.1,
    )
    base.update(kw)
    return PrepareConfig(**base)
