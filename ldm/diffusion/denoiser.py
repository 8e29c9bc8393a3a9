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

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Denoiser", "ConcatDenoiser", "StepCallback"]


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x_t, t, cond) -> eps`` (see the module docstring)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...


#: ``callback(i, t, x, pred_x0)``: after sampling step ``i`` (0 = first, noisiest), which
#: denoised timestep ``t`` into ``x`` (the new, less noisy sample) with prediction ``pred_x0``.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class ConcatDenoiser(nn.Module):
    """Concat-conditioning adapter: ``eps = unet(cat([x_t, cond], dim=1), t)``.

    This is latent-diffusion's ``conditioning_key="concat"`` ``DiffusionWrapper`` as used by its
    super-resolution models and by the SS-MoE stage experts: the LR condition (bicubic-upsampled
    to the latent size) is stacked on the channels of ``x_t``. The one adapter for training (the
    LightningModule's ``model``), the pipeline (one per stage expert) and user code.

    The UNet is held as ``diffusion_model`` (also readable as ``unet``): that name gives
    latent-diffusion's ``model.diffusion_model.*`` checkpoint keys.

    The condition is cast to ``x_t``'s dtype and device, so a pipeline may keep it in one place.
    ``dtype``: the UNet's precision when it differs from the sampler's (e.g. a float16 UNet under
    a float32 sampler state): the UNet input is cast to it and ``eps`` comes back in ``x_t``'s
    dtype. ``None`` (default): the input stays in ``x_t``'s dtype and ``eps`` is returned as the
    UNet gives it.
    """

    def __init__(self, unet: nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        self.diffusion_model = unet
        self.compute_dtype = dtype

    @property
    def unet(self) -> nn.Module:
        return self.diffusion_model

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
                "size (upsample the condition to the latent size first: for vq-f4 and 8x SR the "
                "condition is the LR image upsampled x2, 'lr_up2')"
            )
        cond = cond.to(device=x_t.device, dtype=x_t.dtype)
        x = torch.cat([x_t, cond], dim=1)
        if self.compute_dtype is None:
            return self.diffusion_model(x, t)
        return self.diffusion_model(x.to(self.compute_dtype), t).to(x_t.dtype)
