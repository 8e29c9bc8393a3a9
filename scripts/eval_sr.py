"""SR results vs HR references (see ``ldm/cli/eval_sr.py``)."""

from ldm.cli.eval_sr import main

raise SystemExit(main())
