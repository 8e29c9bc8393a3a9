"""Modules whose import registers config targets (entry point ``moe_sr.registry``).

One import per line; add yours when you register a new target.
"""

# ruff: noqa: F401
import ldm.autoencoders.autoencoder
import ldm.autoencoders.init
import ldm.autoencoders.official
import ldm.data.datasets
import ldm.data.degradations
import ldm.training.timestep_sampler
import ldm.unet
