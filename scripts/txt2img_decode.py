"""Decode txt2img latents with the KL-f8 FA-VAE (see ``fa_vae/cli/txt2img_decode.py``)."""

from fa_vae.cli.txt2img_decode import main

raise SystemExit(main())
