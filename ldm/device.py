"""Choosing the compute device when the user did not name one."""

from __future__ import annotations

import torch


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` as a device, or else the available accelerator, or else the CPU."""
    if requested is not None:
        return torch.device(requested)
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")
