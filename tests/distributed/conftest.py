"""The multi-rank tests' toy overrides on the session's shared data dir (tests/conftest.py)."""

from __future__ import annotations

import pytest
from dist_helpers import TOY


@pytest.fixture(scope="session")
def toy(data_dir) -> list[str]:
    return [*TOY, f"data.path={data_dir}"]
