"""Training-only config targets (they import Lightning, an optional extra).

``ldm.training.run`` imports this module before building anything, so that ``diffusion_sr``,
``fa_vae_trainer`` and friends resolve; ``ldm/targets.py`` stays free of Lightning.
"""

# ruff: noqa: F401
import ldm.training.autoencoder_module
import ldm.training.callbacks
import ldm.training.data
import ldm.training.diffusion_module
import ldm.training.timestep_sampler
