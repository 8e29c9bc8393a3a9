"""Modules whose import registers config targets (entry point ``moe_sr.registry``).

One import per line; add yours when you register a new target.
"""

# ruff: noqa: F401
import moe_sr.stages
import moe_sr.training
