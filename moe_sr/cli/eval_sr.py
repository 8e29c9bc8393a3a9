"""The former module path of ``moe-sr-eval``, kept so that console scripts installed before the
rename (and ``python -m moe_sr.cli.eval_sr``) keep working; the command is
:mod:`moe_sr.cli.eval_pipeline`."""

import sys

from moe_sr.cli.eval_pipeline import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
