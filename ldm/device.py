"""Choosing the compute device when the user did not name one."""

from __future__ import annotations

import torch


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` as a device, or else the available accelerator, or else the CPU.

    A requested device that this machine does not have (``cuda`` without a GPU, ``cuda:3``
    with two) is a ``ValueError`` saying so, before any work."""
    if requested is not None:
        try:
            device = torch.device(requested)
        except RuntimeError as err:
            raise ValueError(f"--device {requested}: {str(err).splitlines()[0]}") from None
        return check_available(device)
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def check_available(device: torch.device) -> torch.device:
    """``device`` if this machine has it, else a one-line ``ValueError`` that says what to do."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"--device {device}: no CUDA GPU is available here; use --device cpu (or leave "
                "--device out to use the GPU only when there is one)"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 .. cuda:{count - 1}")  # fmt: skip
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: Apple MPS is not available here; use --device cpu")
    return device
