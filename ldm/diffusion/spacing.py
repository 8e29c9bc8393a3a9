"""Timestep grids of the few-step ODE solvers (DPM-Solver++, UniPC).

A grid is a strictly decreasing int64 tensor of ``steps + 1`` ORIGINAL training timesteps from
``T - 1`` (the noisiest timestep, where ``x_T ~ N(0, I)`` is placed) down to ``0``. A solver
evaluates the denoiser at the first ``steps`` points and lands on the last one, ``t = 0``, i.e.
at ``alpha_bar_0`` like latent-diffusion's DDIM (whose last step also ends there, not at 1).
Discrete timesteps keep the denoiser seam (``t`` int64 in ``[0, T)``): the solvers only read
``alpha_bar`` at grid points, so no interpolation of the schedule is needed.

Spacings (each maps ``k = steps .. 0`` to a timestep, rounded to the nearest integer):

``"uniform"``
    linear in ``t`` (DPM-Solver's "time_uniform", recommended there for latent models).
``"quadratic"``
    ``t = (T - 1) (k / steps)^2``: denser near ``t = 0`` (DPM-Solver's "time_quadratic",
    LDM's DDIM "quad" in spirit).
``"karras"``
    the EDM spacing of Karras et al. 2022 (eq. 5, rho = 7) in the schedule's
    ``sigma = sqrt((1 - a) / a)``, mapped to the nearest timestep in ``log sigma``.
``"logsnr"``
    uniform in the half log-SNR ``lambda = log(alpha / sigma)`` (DPM-Solver's "logSNR").

Rounding can merge neighbouring points of a dense grid; they are then pushed apart by one
timestep (near ``t = 0``), so every grid has exactly ``steps + 1`` distinct points.
"""

from __future__ import annotations

import torch

from ldm.diffusion.schedule import NoiseSchedule

__all__ = ["SPACINGS", "DEFAULT_SPACING", "solver_timesteps", "half_log_snr"]

SPACINGS = ("uniform", "quadratic", "karras", "logsnr")
#: the solvers' default: steps of equal size in lambda, the variable they integrate in
DEFAULT_SPACING = "logsnr"
KARRAS_RHO = 7.0


def half_log_snr(schedule: NoiseSchedule) -> torch.Tensor:
    """``lambda_t = log(alpha_t / sigma_t)`` for every timestep (float64, decreasing in t)."""
    ac = schedule.alphas_cumprod
    return 0.5 * (torch.log(ac) - torch.log1p(-ac))


def _nearest_timesteps(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each value the timestep whose (decreasing-in-t) ``table`` entry is nearest."""
    return (values[:, None] - table[None, :]).abs().argmin(dim=1)


def _make_distinct(ts: torch.Tensor) -> torch.Tensor:
    """Strictly decreasing from ``T - 1`` to 0 with the same number of points: merged points are
    pushed apart by one timestep (first down from the top, then up from ``t = 0``)."""
    pts = ts.tolist()
    for i in range(1, len(pts)):  # descending pass: at most the previous point - 1
        pts[i] = min(pts[i], pts[i - 1] - 1)
    pts[-1] = 0
    for i in range(len(pts) - 2, -1, -1):  # ascending pass: at least the next point + 1
        pts[i] = max(pts[i], pts[i + 1] + 1)
    return torch.tensor(pts, dtype=torch.long)


def solver_timesteps(
    schedule: NoiseSchedule, steps: int, spacing: str = DEFAULT_SPACING
) -> torch.Tensor:
    """The ``steps + 1`` grid points ``T-1 = t_0 > t_1 > ... > t_steps = 0`` (int64)."""
    T = schedule.num_timesteps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if steps > T - 1:
        raise ValueError(f"{steps} solver steps do not fit T={T}; use at most {T - 1}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {SPACINGS}")
    k = torch.arange(steps, -1, -1, dtype=torch.float64) / steps  # 1 ... 0
    if spacing == "uniform":
        ts = (k * (T - 1)).round().long()
    elif spacing == "quadratic":
        ts = (k**2 * (T - 1)).round().long()
    elif spacing == "karras":
        ac = schedule.alphas_cumprod
        log_sigma = 0.5 * (torch.log1p(-ac) - torch.log(ac))  # increasing in t
        s_min, s_max = log_sigma[0].exp(), log_sigma[-1].exp()
        inv = 1.0 / KARRAS_RHO
        sigmas = (s_min**inv + k * (s_max**inv - s_min**inv)) ** KARRAS_RHO
        ts = _nearest_timesteps(sigmas.log(), log_sigma)
    else:  # logsnr
        lam = half_log_snr(schedule)
        values = lam[-1] + (1.0 - k) * (lam[0] - lam[-1])
        ts = _nearest_timesteps(values, lam)
    ts[0], ts[-1] = T - 1, 0
    return _make_distinct(ts)
