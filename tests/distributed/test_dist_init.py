"""FSDP2 initialization after sharding (trainer `_build`) against one process's whole model, on real gloo
ranks: exact equality of every parameter (init_check.py)."""

from __future__ import annotations

import pytest
from dist_helpers import HERE, launch


@pytest.mark.parametrize("nproc, extra", [(3, []), (4, ["--hsdp"])], ids=["fsdp, 3 ranks", "hsdp, 2x2"])
def test_sharded_init_equals_the_whole_model(nproc, extra):
    launch([str(HERE / "init_check.py"), *extra], nproc=nproc)
