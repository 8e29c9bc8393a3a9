"""``python -m moe_sr``: the 8x super-resolution command (same as ``moe-sr``)."""

import sys

from moe_sr.cli.sr import main

sys.exit(main())
