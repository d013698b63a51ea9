"""Session fixtures: a crafted corpus of unique pseudo-prose documents and a small prepared data dir."""

from __future__ import annotations

import pytest
from data_helpers import make_docs, small_config, write_corpus

from seektrain.data.prepare import prepare


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return make_docs(120, seed=1)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_docs):
    """(data_dir, report) for the 120-document corpus."""
    root = tmp_path_factory.mktemp("prepared")
    src = write_corpus(root / "src", corpus_docs)
    report = prepare(small_config([src], root / "data"))
    return root / "data", report
