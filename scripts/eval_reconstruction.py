"""Autoencoder reconstruction metrics on COCO (see ``ldm/cli/eval_reconstruction.py``)."""

from ldm.cli.eval_reconstruction import main

raise SystemExit(main())
