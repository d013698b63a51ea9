"""`seektrain ARGS` on a host that reports HOST_MEMORY_BYTES available (MemAvailable of /proc/meminfo), so a
test can show how the ranks of one node count against it without owning a machine that small."""

import os
import sys

from seektrain.cli import main
from seektrain.train import host_memory

if __name__ == "__main__":
    host_memory.available_host_memory = lambda: int(os.environ["HOST_MEMORY_BYTES"])
    sys.exit(main(sys.argv[1:]))
