"""DPM-Solver++(2M): the second-order multistep solver with data prediction.

Lu, Zhou, Bao, Chen, Li, Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv 2211.01095, Algorithm 2. With ``h_i = lambda_{t_i} -
lambda_{t_{i-1}}`` and ``x0_i`` the data prediction at ``t_{i-1}``:

* first order (the first step, and after a history break): DDIM with eta 0,
  ``x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) x0_i``;
* second order: the same with ``D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}`` in place of
  ``x0_i``, ``r_i = h_{i-1} / h_i``.

One denoiser evaluation per step. Deterministic (an ODE solver): ``x_T`` is the only randomness;
``generator`` is accepted for the common sampler signature and unused. The grid and the history
breaks are those of :mod:`ldm.diffusion.multistep`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ldm.diffusion.ddim import state_dtype
from ldm.diffusion.denoiser import Denoiser, StepCallback
from ldm.diffusion.multistep import solver_grid
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.spacing import DEFAULT_SPACING

__all__ = ["dpmpp_2m_sample"]


@torch.no_grad()
def dpmpp_2m_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    cond: Any,
    *,
    steps: int = 20,
    spacing: str = DEFAULT_SPACING,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    lower_order_final: bool = True,
    history_breaks: Sequence[int] = (),
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x_T`` at ``t = T-1`` down to ``t = 0``.

    Args:
        denoiser: ``denoiser(x_t, t, cond) -> eps`` (``t`` int64 ``[B]`` on the CPU).
        schedule: the training noise schedule.
        x_T: the starting noise ``[B, ...]``; the state is kept in at least float32.
        cond: passed unchanged to the denoiser.
        steps: denoiser evaluations (= steps).
        spacing: the timestep grid (:data:`~ldm.diffusion.spacing.SPACINGS`).
        generator: unused (deterministic solver).
        callback: ``callback(i, t, x, pred_x0)`` after every step.
        lower_order_final: a first-order last step. The step to ``t = 0`` spans the largest
            ``lambda`` interval of the grid (LDM's schedule ends at ``alpha_bar_0 = 0.9985``,
            not at 1); on Gaussian data (closed-form solution) the first-order final step is
            the more accurate one at 10-25 steps for every spacing (diffusers lowers it only
            below 15 steps, for grids that end at sigma = 0).
        history_breaks: timesteps the multistep history does not cross.
    """
    del generator
    grid = solver_grid(schedule, steps, spacing, history_breaks)
    x = x_T.to(state_dtype(x_T))
    x0_prev: torch.Tensor | None = None
    for i in range(steps):
        x0, t_int = grid.data_prediction(denoiser, x, i, cond)
        s, t = i, i + 1
        h = grid.h(s, t)
        final_low = lower_order_final and i == steps - 1
        if x0_prev is None or grid.segment[i - 1] != grid.segment[i] or final_low:
            d = x0
        else:
            r = grid.h(i - 1, s) / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (grid.sigma[t] / grid.sigma[s]) * x - (grid.alpha[t] * math.expm1(-h)) * d
        x0_prev = x0
        if callback is not None:
            callback(i, t_int, x, x0)
    return x
