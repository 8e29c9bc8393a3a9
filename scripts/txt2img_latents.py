"""Stable Diffusion 1.5 latents for a file of prompts (see ``fa_vae/cli/txt2img_latents.py``)."""

from fa_vae.cli.txt2img_latents import main

raise SystemExit(main())
