"""Modules whose import registers config targets (entry point ``moe_sr.registry``).

One import per line; add yours when you register a new target.
"""

# ruff: noqa: F401
import fa_vae.init
import fa_vae.model
import fa_vae.official
