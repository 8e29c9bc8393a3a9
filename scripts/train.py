"""Train from YAML configs (see ``ldm/cli/train.py``)."""

from ldm.cli.train import main

raise SystemExit(main())
