"""``python -m moe_sr.demo`` (``make demo``): see :mod:`moe_sr.cli.demo`."""

import sys

from moe_sr.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
