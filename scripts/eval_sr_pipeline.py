"""SR pipeline on an LR folder, then metrics against HR (see ``moe_sr/cli/eval_pipeline.py``)."""

from moe_sr.cli.eval_pipeline import main

raise SystemExit(main())
