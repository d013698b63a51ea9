"""Session fixtures: a real prepared data dir (stdlib sources, trained BPE) and a briefly trained run."""

from __future__ import annotations

import contextlib
import email
import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from seektrain import cli
from seektrain.config import load_config

TRAIN_STEPS = 60


@contextlib.contextmanager
def one_thread():
    """Two intra-op threads on a loaded 2-core machine run ~7x slower than one; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    from seektrain.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("infer_data")
    corpus = root / "corpus"
    corpus.mkdir()
    for package in (json, email):  # ~0.45 MB of real Python source
        for f in Path(package.__file__).parent.glob("*.py"):
            shutil.copyfile(f, corpus / f"{package.__name__}_{f.name}")
    out = root / "data"
    prepare(
        PrepareConfig(
            inputs=[str(corpus)],
            out_dir=str(out),
            vocab_size=512,
            val_fraction=0.1,
            workers=1,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def other_data_dir(tmp_path_factory) -> Path:
    """A data dir with a different (smaller) tokenizer than `data_dir`'s."""
    import difflib
    import textwrap

    from seektrain.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("other_data")
    corpus = root / "corpus"
    corpus.mkdir()
    for module in (difflib, textwrap):
        shutil.copyfile(module.__file__, corpus / Path(module.__file__).name)
    out = root / "data"
    prepare(PrepareConfig(inputs=[str(corpus)], out_dir=str(out), vocab_size=300, val_fraction=0.0, workers=1,
                          progress=False))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """The `tiny` preset (vocab from the data's 512-token BPE) trained 60 steps: enough for a peaked,
    non-uniform next-token distribution, ~15 s on one core."""
    from seektrain.train.trainer import Trainer

    run = tmp_path_factory.mktemp("infer_runs") / "tiny"
    overrides = [
        f'data.path="{data_dir}"',
        "data.seq_len=64",
        f"train.steps={TRAIN_STEPS}",
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
        "train.device=cpu",  # the same trained weights on every machine (a GPU run ends elsewhere)
        "train.precision=fp32",  # … and every CPU (the preset's auto is bf16 where the CPU has bf16 units)
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.log_every=20",
        "optim.lr=5e-3",
        "optim.warmup_steps=5",
        "checkpoint.every=1000",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    with one_thread():
        assert Trainer(load_config(preset="tiny", overrides=overrides), run, resume="never").fit() == 0
    return run


def final_val_loss(run: Path) -> float:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [rec for rec in lines if "val_loss" in rec][-1]["val_loss"]


@pytest.fixture
def seektrain(capsys):
    """Run `seektrain VERB …` in-process through the real CLI; returns (exit code, stdout, stderr)."""

    def call(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with one_thread():
            code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def sentencepiece_style_tokenizer() -> Tokenizer:
    """A Llama-style BPE (as `prepare --tokenizer` and `import` accept): spaces as "▁", a "▁" prepended
    to the text, byte fallback for characters outside the vocabulary, and a decoder that strips the
    decoded text's first space."""
    from tokenizers import decoders, models, normalizers

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz():=", "▁▁", "▁▁▁▁", "▁i", "▁if", "▁r", "▁re", "▁x"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "▁"), ("▁▁", "▁▁"), ("▁", "i"), ("▁i", "f"), ("▁", "r"), ("▁r", "e"), ("▁", "x")]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok
