"""What the multistep ODE solvers share: the grid's coefficients and one data-prediction call.

Notation of DPM-Solver (Lu et al. 2022, arXiv 2206.00927) for a variance-preserving schedule:
``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t = sqrt(alpha_bar_t)``,
``sigma_t = sqrt(1 - alpha_bar_t)`` and the half log-SNR ``lambda_t = log(alpha_t / sigma_t)``.
Data-prediction solvers (DPM-Solver++, UniPC with ``predict_x0``) integrate the probability-flow
ODE in ``lambda`` using ``x0(x_t, t) = (x_t - sigma_t eps) / alpha_t``.

**Multistep history and breaks.** A multistep update combines the newest ``x0`` with the ones of
earlier grid points. ``history_breaks`` (timesteps ``b``) splits the grid into segments
``[b, ...)``: an update never combines evaluations from two segments; it falls back to a lower
order after a break. With the SS-MoE stage boundaries as breaks, no update mixes two stage experts'
predictions; without breaks (the default) the history runs across them, like one network.
Either way every evaluation goes to the denoiser at its own timestep, so a router sends it to
the stage expert that owns that timestep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.spacing import DEFAULT_SPACING, solver_timesteps

__all__ = ["SolverGrid", "solver_grid"]


@dataclass(frozen=True)
class SolverGrid:
    """Grid points ``i = 0 .. steps`` (0 = noisiest) with float64 host coefficients."""

    timesteps: torch.Tensor  # int64 [steps + 1], decreasing, last = 0
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]
    segment: tuple[int, ...]  # history segment of each point (see the module docstring)

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel()) - 1

    def h(self, s: int, t: int) -> float:
        """``lambda_t - lambda_s`` between grid points ``s`` and ``t``."""
        return self.lam[t] - self.lam[s]

    def data_prediction(
        self, denoiser: Denoiser, x: torch.Tensor, i: int, cond: Any
    ) -> tuple[torch.Tensor, int]:
        """``(x0, t)``: the denoiser's ``eps`` at grid point ``i`` turned into ``x0``.

        ``t`` goes to the denoiser as an int64 CPU tensor ``[B]``: the solver knows its
        timesteps on the host, so a router can pick the stage expert without a device-to-host copy
        (a denoiser moves ``t`` to its device itself, as the UNet does).
        """
        t_int = int(self.timesteps[i])
        t = torch.full((x.shape[0],), t_int, dtype=torch.long)
        eps = denoiser(x, t, cond)
        if eps.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps.shape)} for x_t {tuple(x.shape)}")
        return (x - self.sigma[i] * eps.to(x.dtype)) / self.alpha[i], t_int


def _segments(timesteps: torch.Tensor, breaks: Sequence[int]) -> tuple[int, ...]:
    edges = sorted({int(b) for b in breaks})
    return tuple(sum(1 for b in edges if int(t) >= b) for t in timesteps)


def solver_grid(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = DEFAULT_SPACING,
    history_breaks: Sequence[int] = (),
) -> SolverGrid:
    """The grid of :func:`~ldm.diffusion.spacing.solver_timesteps` with its coefficients."""
    ts = solver_timesteps(schedule, steps, spacing)
    ac = schedule.alphas_cumprod[ts]
    alpha = ac.sqrt().tolist()
    sigma = (1.0 - ac).sqrt().tolist()
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    return SolverGrid(ts, tuple(alpha), tuple(sigma), tuple(lam), _segments(ts, history_breaks))
