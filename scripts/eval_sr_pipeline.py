"""SR pipeline on an LR folder, then metrics against HR (see ``moe_sr/cli/eval_sr.py``)."""

from moe_sr.cli.eval_sr import main

raise SystemExit(main())
