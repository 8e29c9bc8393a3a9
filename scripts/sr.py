"""8x super-resolution CLI (same as ``moe-sr``); see ``moe_sr/cli/sr.py``."""

import sys

from moe_sr.cli.sr import main

sys.exit(main())
