"""Side-by-side comparison picture (see ``ldm/cli/compare.py``)."""

from ldm.cli.compare import main

raise SystemExit(main())
