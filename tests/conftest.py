"""Shared by tests/train, tests/integration and tests/distributed: a real prepared data dir (a dozen
stdlib sources, 512-token BPE), made once per session, and the toy model overrides the trainer tests use
(2 layers, hidden 64: steps take milliseconds). tests/distributed overrides `toy` with its own batch
layout; tests/infer and tests/data make their own corpora."""

import inspect
import pathlib

import pytest

from toy_model import TOY_MODEL

TOY = [
    *TOY_MODEL,
    "data.seq_len=32",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "optim.warmup_steps=2",
    "log.progress=false",
    "log.tensorboard=false",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
    import argparse
    import collections
    import difflib
    import json
    import shutil
    import string
    import tarfile
    import textwrap
    import typing
    import zipfile

    import tomllib

    from seektrain.data.prepare import PrepareConfig, prepare

    src = tmp_path_factory.mktemp("corpus")
    for m in (
        argparse,
        collections,
        difflib,
        json.decoder,
        json.encoder,
        shutil,
        string,
        tarfile,
        textwrap,
        tomllib._parser,
        typing,
        zipfile,
    ):
        (src / f"{m.__name__}.py").write_text(pathlib.Path(inspect.getsourcefile(m)).read_text())
    out = tmp_path_factory.mktemp("data") / "toy"
    prepare(
        PrepareConfig(
            inputs=[str(src)], out_dir=str(out), vocab_size=512, val_fraction=0.25, workers=1, progress=False
        )
    )
    return out


@pytest.fixture(scope="session")
def toy(data_dir) -> list[str]:
    """`--set` overrides for a toy run on the session's data dir."""
    return [*TOY, f"data.path={data_dir}"]
