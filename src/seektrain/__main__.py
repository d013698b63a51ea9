import sys

from seektrain.cli import main

sys.exit(main())
