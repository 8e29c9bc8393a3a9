"""The local web page for 8x SR (same as ``moe-sr-app``); see ``moe_sr/cli/app.py``."""

import sys

from moe_sr.cli.app import main

sys.exit(main())
