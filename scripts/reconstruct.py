"""Encode -> decode images with an autoencoder preset (see ``ldm/cli/reconstruct.py``)."""

from ldm.cli.reconstruct import main

raise SystemExit(main())
