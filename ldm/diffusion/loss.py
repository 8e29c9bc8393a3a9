"""The diffusion training loss, a plain function over the denoiser seam.

``diffusion_loss(denoiser, schedule, x0, cond, t)`` is latent-diffusion's "simple" eps loss
(Ho et al. 2020): noise ``x0`` to ``x_t = q_sample(x0, t, noise)`` with the
:class:`~ldm.diffusion.schedule.NoiseSchedule` and take the MSE between the denoiser's ``eps``
and the true noise. As EDM's loss takes the network, this one takes any
:class:`~ldm.diffusion.denoiser.Denoiser`; the LightningModule (``ldm.training``) draws ``t``
from its timestep sampler and calls it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedule import NoiseSchedule

__all__ = ["ForwardProcess", "diffusion_loss"]


class ForwardProcess(Protocol):
    """What the loss needs of a schedule: ``q_sample(x0, t, noise) -> x_t``.
    :class:`~ldm.diffusion.schedule.NoiseSchedule` is one (it gathers on the host, checking
    ``t``); a training module may pass its device buffers instead (no host sync per step)."""

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...


def diffusion_loss(
    denoiser: Denoiser,
    schedule: NoiseSchedule | ForwardProcess,
    x0: torch.Tensor,
    cond: Any,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mse(denoiser(q_sample(x0, t, noise), t, cond), noise)`` in float32.

    ``t``: int64 ``[B]`` in ``[0, T)``; ``noise``: default ``randn_like(x0)`` (drawn after ``t``,
    so a seeded run draws in the same order as before). The coefficients are the schedule's
    float64 values cast to ``x0``'s dtype, which in float32 equal latent-diffusion's buffers.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    eps = denoiser(schedule.q_sample(x0, t, noise), t, cond)
    return F.mse_loss(eps.float(), noise.float())
