"""Model tests run toy-size matmuls: one intra-op thread is much faster than two fighting over busy
cores (measured 0.3 s vs 20 s for 32 greedy steps on the 2-core CI box under load)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
