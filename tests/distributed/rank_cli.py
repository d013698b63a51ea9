"""`seektrain ARGS` with `{rank}` in ARGS replaced by this process's RANK: under torchrun, a test gives one
rank a path the others do not see, as a node without the file would."""

import os
import sys

from seektrain.cli import main

if __name__ == "__main__":
    sys.exit(main([arg.replace("{rank}", os.environ["RANK"]) for arg in sys.argv[1:]]))
