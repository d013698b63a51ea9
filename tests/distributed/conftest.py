"""Session fixtures for the multi-rank tests: a real prepared data dir and the toy overrides."""

from __future__ import annotations

import inspect
import pathlib

import pytest
from dist_helpers import TOY


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
    import argparse
    import difflib
    import json as json_module
    import shutil
    import tarfile
    import textwrap
    import typing

    from seektrain.data.prepare import PrepareConfig, prepare

    src = tmp_path_factory.mktemp("corpus")
    for m in (argparse, difflib, json_module.decoder, shutil, tarfile, textwrap, typing):
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
    return [*TOY, f"data.path={data_dir}"]
