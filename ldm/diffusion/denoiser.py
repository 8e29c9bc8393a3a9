"""The denoiser seam between networks and samplers (DESIGN seam 1).

A *denoiser* is any callable ``denoiser(x_t, t, cond) -> eps``:

- ``x_t``: the noisy latent ``[B, C, H, W]``;
- ``t``: int64 ``[B]``, always in the ORIGINAL training timesteps ``[0, T)`` (also when a sampler
  uses a respaced subset of them);
- ``cond``: the conditioning (a tensor, a mapping of tensors, or ``None``);
- returns the predicted noise ``eps``, shaped like ``x_t``.

Samplers take a denoiser and a :class:`~ldm.diffusion.schedule.NoiseSchedule` and read nothing
else from the model; the stage router of ``moe_sr`` is just another denoiser.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Denoiser", "ConcatDenoiser"]


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x_t, t, cond) -> eps`` (see the module docstring)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...


class ConcatDenoiser(nn.Module):
    """Concat-conditioning adapter: ``eps = unet(cat([x_t, cond], dim=1), t)``.

    This is latent-diffusion's ``conditioning_key="concat"`` (``DiffusionWrapper``) as used by its
    super-resolution models and by the SS-MoE experts: the LR condition (bicubic-upsampled to the
    latent size) is stacked on the channels of ``x_t``.

    The condition is cast to ``x_t``'s dtype and device, so a pipeline may keep it in one place.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
    ) -> torch.Tensor:
        if cond is None:
            raise ValueError("ConcatDenoiser needs a conditioning tensor (got cond=None)")
        if not isinstance(cond, torch.Tensor):
            raise TypeError(
                f"ConcatDenoiser expects cond to be a tensor, got {type(cond).__name__}"
            )
        if cond.shape[0] != x_t.shape[0] or cond.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"cond {tuple(cond.shape)} must match x_t {tuple(x_t.shape)} in batch and spatial "
                "size (upsample the condition to the latent size first)"
            )
        cond = cond.to(device=x_t.device, dtype=x_t.dtype)
        return self.unet(torch.cat([x_t, cond], dim=1), t)
