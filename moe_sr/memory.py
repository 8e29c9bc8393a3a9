"""Memory needed by one SR call, estimated before any work, against what the device has free.

A 4000x4000 LR image has a 32000x32000 output: 12 GB as a float32 tensor before anything is
computed. The pipeline therefore estimates the buffers that grow with the image and the working
set of one network call (a tile when tiled) and refuses an input that cannot fit, with one line
saying what takes the memory, instead of failing (or swapping) minutes later.

The estimate is deliberately coarse (tens of percent): image-sized buffers are counted exactly,
network activations per pixel from the networks' widths. It guards against hopeless inputs; it
does not promise that an input below the limit fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MemoryEstimate", "available_bytes", "gib", "proc_field_bytes"]

F32 = 4
#: live float tensors per pixel and base channel in a decoder / UNet forward (measured peak of
#: the full-size FA-VAE at 512 px: ~16.5 KB per output pixel at 128 base channels, fp32)
VAE_TENSORS_PER_CHANNEL = 32
UNET_TENSORS_PER_CHANNEL = 24
#: latent-sized float32 tensors alive while sampling (x_T, x, eps, x0 and its history,
#: the condition, the tiled blend's sum and weights, temporaries)
LATENT_TENSORS = 10


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by part: ``latents``, ``unet`` (one call), ``vae`` (one tile or the image),
    ``output`` (decoded image, blend weights, colour-fixed copy)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items())

    @classmethod
    def for_call(
        cls,
        *,
        batch: int,
        latent_hw: tuple[int, int],
        scale: int,
        latent_channels: int,
        unet_channels: int,
        vae_channels: int,
        unet_tile: int | None,
        tile_batch: int,
        vae_tile: int | None,
        dtype_bytes: int = F32,
        vae_dtype_bytes: int = F32,
    ) -> MemoryEstimate:
        """``unet_tile`` / ``vae_tile``: tile sizes (latent px) when tiled, else ``None``."""
        h, w = latent_hw
        latent_px = h * w
        out_px = latent_px * scale * scale
        unet_px = latent_px * batch if unet_tile is None else unet_tile**2 * tile_batch
        vae_px = out_px * batch if vae_tile is None else (vae_tile * scale) ** 2
        return cls(
            {
                "latents": LATENT_TENSORS * batch * max(latent_channels, 3) * latent_px * F32,
                "unet": UNET_TENSORS_PER_CHANNEL * unet_channels * unet_px * dtype_bytes,
                "vae": VAE_TENSORS_PER_CHANNEL * vae_channels * vae_px * vae_dtype_bytes,
                "output": batch * (3 * 3 + 1) * out_px * F32,
            }
        )


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CUDA: free + cached by torch; CPU: ``MemAvailable``), or
    ``None`` where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return proc_field_bytes("/proc/meminfo", "MemAvailable")
    return None


def proc_field_bytes(path: str, field: str) -> int | None:
    """The ``field:`` line of a Linux ``/proc`` file (a size in kB) in bytes, or ``None`` where
    the file or the line is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
