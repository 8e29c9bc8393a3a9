"""Command-line entry points of the moe_sr package."""
