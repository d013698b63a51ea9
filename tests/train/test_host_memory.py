"""keep_freed_host_memory: a loop that allocates and frees tensors of a few sizes, as a training step
does, stops faulting their pages in again once it has run a few rounds."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from seektrain.train.host_memory import keep_freed_host_memory
took = keep_freed_host_memory() if sys.argv[1] == "keep" else None

def round_of_allocations():  # 64, 12 and 32 MiB, freed out of order
    a = torch.ones(16 << 20); b = torch.ones(3 << 20); del a; c = torch.ones(8 << 20); del b, c

for _ in range(10):
    round_of_allocations()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_of_allocations()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def steady_state_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    took, faults = out.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    took, kept = steady_state_faults("keep")
    _, default = steady_state_faults("default")
    assert took == "True"
    # By default each round faults its 108 MiB in again: ~27,600 pages of 4 KiB (~54 if huge pages).
    assert default >= 50 and kept < default / 10, (kept, default)
