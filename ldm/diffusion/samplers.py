"""The samplers by name, behind one call (what configs and command lines choose from).

| name | function | evaluations | randomness |
|---|---|---|---|
| ``ddim`` | :func:`~ldm.diffusion.ddim.ddim_sample` (LDM grid; ``eta``) | ``steps`` | ``x_T`` and, with ``eta > 0``, every step |
| ``dpmpp-2m`` | :func:`~ldm.diffusion.dpm_solver.dpmpp_2m_sample` | ``steps`` | ``x_T`` only |
| ``unipc`` | :func:`~ldm.diffusion.unipc.unipc_sample` (order 2, corrector) | ``steps`` | ``x_T`` only |

The default stays the release's DDIM with 200 steps and eta 1. ``spacing`` is DDIM's
``discretize`` (``uniform`` = LDM's grid, ``quad``) or a solver spacing
(:data:`~ldm.diffusion.spacing.SPACINGS`, default ``logsnr``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ldm.diffusion.ddim import ddim_sample
from ldm.diffusion.denoiser import Denoiser, StepCallback
from ldm.diffusion.dpm_solver import dpmpp_2m_sample
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.spacing import DEFAULT_SPACING, SPACINGS
from ldm.diffusion.unipc import unipc_sample

__all__ = ["SAMPLERS", "DDIM_SPACINGS", "check_sampler_options", "run_sampler"]

SAMPLERS = ("ddim", "dpmpp-2m", "unipc")
DDIM_SPACINGS = ("uniform", "quad")


def check_sampler_options(
    name: str, steps: int, eta: float | None = None, spacing: str | None = None
) -> None:
    """Raise ``ValueError`` (one line) for an unknown sampler or options it does not take."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if name == "ddim":
        if spacing is not None and spacing not in DDIM_SPACINGS:
            raise ValueError(f"ddim spacing must be one of {DDIM_SPACINGS}, got {spacing!r}")
        if eta is not None and not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        return
    if eta is not None and eta != 0:
        raise ValueError(f"eta is a DDIM setting; {name} is a deterministic ODE solver (got {eta})")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"{name} spacing must be one of {SPACINGS}, got {spacing!r}")


@torch.no_grad()
def run_sampler(
    name: str,
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    cond: Any,
    *,
    steps: int,
    eta: float | None = None,
    spacing: str | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    history_breaks: Sequence[int] = (),
) -> torch.Tensor:
    """Sample with the sampler called ``name`` (see the module docstring).

    ``eta`` applies to ``ddim`` only (default 1.0 there); ``history_breaks`` to the multistep
    solvers only (DDIM keeps no history).
    """
    check_sampler_options(name, steps, eta, spacing)
    common = {"steps": steps, "generator": generator, "callback": callback}
    if name == "ddim":
        return ddim_sample(
            denoiser, schedule, x_T, cond, eta=1.0 if eta is None else eta,
            discretize=spacing or "uniform", **common,
        )  # fmt: skip
    solver = dpmpp_2m_sample if name == "dpmpp-2m" else unipc_sample
    return solver(
        denoiser, schedule, x_T, cond, spacing=spacing or DEFAULT_SPACING,
        history_breaks=history_breaks, **common,
    )  # fmt: skip
