"""DDIM sampling (Song et al. 2021) with latent-diffusion's exact parameters.

Reproduces ``ldm/models/diffusion/ddim.py`` of latent-diffusion and the SS-MoE release's
``ddim_moe.py:DDIMMoeSampler`` (``make_schedule`` + ``p_sample_ddim``), including their numeric
quirks, so that the ``schedule`` reference fixture is matched:

- timesteps are LDM's "uniform" spacing ``range(0, T, T // steps) + 1`` (1, 6, ..., 996 for
  T=1000, 200 steps);
- ``alphas_prev[0] = alphas_cumprod[0]`` (not 1.0): the last step lands on ``alpha_bar_0``;
- ``alphas`` are float32, ``alphas_prev`` float64 holding float32 values, ``sigmas`` are
  computed in float64 (from ``1 - alphas`` taken in float32) and used as float32 in the step.

The sampler only takes a denoiser (``denoiser(x_t, t, cond) -> eps``) and a schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldm.diffusion.denoiser import Denoiser, StepCallback
from ldm.diffusion.schedule import NoiseSchedule

logger = logging.getLogger(__name__)

__all__ = [
    "DDIMParameters",
    "ddim_timesteps",
    "ddim_parameters",
    "ddim_step",
    "ddim_sample",
    "draw_noise",
]

#: ``noise_fn(i, shape) -> noise`` for step ``i`` (replaces the sampler's own draws).
NoiseFn = Callable[[int, tuple[int, ...]], torch.Tensor]


def ddim_timesteps(num_timesteps: int, steps: int, discretize: str = "uniform") -> torch.Tensor:
    """The DDIM timesteps in increasing order, int64 (LDM ``make_ddim_timesteps``).

    ``"uniform"``: LDM's ``range(0, T, T // steps) + 1`` (1, 6, ..., 996 for 200 of 1000).
    Where that grid does not have exactly ``steps`` entries inside ``[0, T)`` (``steps`` not
    dividing ``T``: LDM then samples more steps than asked, or indexes ``T`` and crashes), this
    uses ``floor(k T / steps) + 1``, ``k = 0 .. steps-1`` instead (the same grid whenever
    ``steps`` divides ``T``) and logs a warning.
    ``"quad"``: ``int(linspace(0, sqrt(0.8 T), steps) ** 2) + 1``.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if steps >= num_timesteps:
        raise ValueError(
            f"{steps} DDIM steps do not fit T={num_timesteps} (LDM's grid starts at t=1); "
            f"use at most {num_timesteps - 1}"
        )
    if discretize == "uniform":
        ts = np.asarray(list(range(0, num_timesteps, num_timesteps // steps))) + 1
        if len(ts) != steps or ts[-1] >= num_timesteps:
            fixed = np.arange(steps) * num_timesteps // steps + 1
            logger.warning(
                "DDIM 'uniform' spacing: LDM's grid for %d steps of T=%d has %d timesteps "
                "ending at %d; using floor(k*T/steps)+1 = %s ... %s instead (choose a divisor "
                "of T for LDM's exact grid)",
                steps,
                num_timesteps,
                len(ts),
                ts[-1],
                fixed[:3].tolist(),
                fixed[-1],
            )
            ts = fixed
    elif discretize == "quad":
        ts = ((np.linspace(0, np.sqrt(num_timesteps * 0.8), steps)) ** 2).astype(int) + 1
    else:
        raise ValueError(f"unknown DDIM discretization {discretize!r}; use 'uniform' or 'quad'")
    if ts[-1] >= num_timesteps or len(np.unique(ts)) != len(ts):
        raise ValueError(
            f"{discretize!r} spacing of {steps} steps over T={num_timesteps} gives invalid "
            f"timesteps {ts.tolist()}; use fewer steps"
        )
    return torch.from_numpy(ts.astype(np.int64))


@dataclass(frozen=True)
class DDIMParameters:
    """Per-step DDIM coefficients, indexed by the DDIM index (0 = least noisy step).

    Dtypes are those of the official sampler: ``alphas`` float32, ``alphas_prev`` float64
    (float32 values), ``sigmas`` float64, ``sqrt_one_minus_alphas`` float32; ``timesteps`` int64.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor
    eta: float

    def __len__(self) -> int:
        return int(self.timesteps.numel())


def ddim_parameters(
    schedule: NoiseSchedule,
    steps: int = 200,
    eta: float = 1.0,
    discretize: str = "uniform",
) -> DDIMParameters:
    """LDM's ``make_ddim_sampling_parameters`` for ``schedule`` (see the module docstring)."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    timesteps = ddim_timesteps(schedule.num_timesteps, steps, discretize)
    alphas_cumprod = schedule.alphas_cumprod.to(torch.float32)  # LDM's float32 buffer
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas[:-1]]).to(torch.float64)
    # Official: numpy float64 ``(1 - alphas_prev) / (1 - alphas)`` with a float32 torch tensor
    # on the right, which torch evaluates as ``reciprocal(1 - alphas)`` in float32 times the
    # float64 array; the square root is numpy's (torch's float64 sqrt can differ by one ulp).
    ratio = torch.reciprocal(1.0 - alphas).to(torch.float64) * (1.0 - alphas_prev)
    variance_ratio = ratio * (1.0 - alphas.to(torch.float64) / alphas_prev)
    sigmas = eta * torch.from_numpy(np.sqrt(variance_ratio.numpy()))
    return DDIMParameters(
        timesteps=timesteps,
        alphas=alphas,
        alphas_prev=alphas_prev,
        sigmas=sigmas,
        # the release: ``np.sqrt(1. - ddim_alphas)`` (numpy's float32 sqrt of the float32 torch
        # difference); torch's vectorised sqrt is one ulp off at some steps on some CPUs
        sqrt_one_minus_alphas=torch.from_numpy(np.sqrt((1.0 - alphas).numpy())),
        eta=float(eta),
    )


def ddim_step(
    params: DDIMParameters,
    index: int,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update at DDIM index ``index``; returns ``(x_prev, pred_x0)``.

    ``pred_x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``,
    ``x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise``
    with the scalars in ``x_t``'s dtype (float32 as in ``p_sample_ddim``). ``noise`` may be
    ``None`` only when ``sigma == 0`` (eta = 0).
    """
    dtype, device = x_t.dtype, x_t.device

    def scalar(v: torch.Tensor) -> torch.Tensor:
        # shaped [1, ..., 1] like the official ``torch.full((b, 1, 1, 1), ...)``: a 0-d tensor
        # takes a different CPU kernel path and can differ by one ulp
        return v[index].to(dtype).reshape([1] * x_t.ndim).to(device)

    a_t = scalar(params.alphas)
    a_prev = scalar(params.alphas_prev)
    sigma = scalar(params.sigmas)
    sqrt_one_minus_a_t = scalar(params.sqrt_one_minus_alphas)
    eps = eps.to(dtype)
    pred_x0 = (x_t - sqrt_one_minus_a_t * eps) / a_t.sqrt()
    dir_x_t = (1.0 - a_prev - sigma**2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_x_t
    if params.sigmas[index] != 0:
        if noise is None:
            raise ValueError(f"DDIM step {index} has sigma > 0 (eta={params.eta}) but no noise")
        x_prev = x_prev + sigma * noise.to(device=device, dtype=dtype)
    return x_prev, pred_x0


def draw_noise(
    shape: tuple[int, ...],
    like: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Standard normal noise shaped ``shape`` on ``like``'s device and dtype.

    With a generator the draw happens on the generator's device and is then moved, so a CPU
    generator gives the same numbers whatever device samples (a CUDA generator draws on CUDA).
    A sequence of generators, one per sample (``len == shape[0]``), draws sample ``b``'s noise
    from generator ``b``: a sample's noise then does not depend on the batch it is in (one
    generator per image equals the single-generator draw of that image alone).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return _randn(shape, like, generator)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {shape[0]}: give one per sample")
    return torch.cat([_randn((1, *shape[1:]), like, g) for g in gens])


def _randn(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return noise.to(like.device)


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a sampler keeps its state in: at least float32 (half inputs are upcast)."""
    if not x.is_floating_point():
        raise TypeError(f"x_T must be a floating-point tensor, got {x.dtype}")
    return torch.promote_types(x.dtype, torch.float32)


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    cond: Any,
    *,
    steps: int = 200,
    eta: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    noise_fn: NoiseFn | None = None,
    discretize: str = "uniform",
) -> torch.Tensor:
    """Sample ``x_0`` from ``x_T`` with DDIM (LDM semantics; defaults as the SS-MoE release).

    Args:
        denoiser: ``denoiser(x_t, t, cond) -> eps`` with ``t`` int64 ``[B]`` in ``[0, T)``
            (on the CPU; the denoiser moves it to its device).
        schedule: the training noise schedule.
        x_T: the starting noise ``[B, ...]``; the sampler state is kept in at least float32.
        cond: passed unchanged to the denoiser.
        steps: number of DDIM steps (LDM "uniform" spacing, see :func:`ddim_timesteps`).
        eta: 0 = deterministic DDIM, 1 = DDPM-like (the release's setting).
        generator: source of the per-step noise (see :func:`draw_noise`; one generator per
            sample makes each sample's noise independent of the batch).
        callback: ``callback(i, t, x, pred_x0)`` after every step.
        noise_fn: ``noise_fn(i, shape) -> noise`` overrides the noise of step ``i`` (tests feed
            recorded noise with it); not called when ``eta == 0``.
        discretize: ``"uniform"`` (LDM default) or ``"quad"``.

    Returns:
        The final sample (LDM: ``sqrt(a_0) pred_x0 + ...``, i.e. at ``alpha_bar_0``, not 1).
    """
    params = ddim_parameters(schedule, steps, eta, discretize)
    x = x_T.to(state_dtype(x_T))
    batch = x.shape[0]
    num = len(params)
    for i in range(num):
        index = num - 1 - i
        t_int = int(params.timesteps[index])
        # t on the host: the sampler knows it there, so a router picks its stage expert without a
        # device-to-host copy; denoisers move t to their device (the UNet does)
        t = torch.full((batch,), t_int, dtype=torch.long)
        eps = denoiser(x, t, cond)
        if eps.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps.shape)} for x_t {tuple(x.shape)}")
        noise = None
        if params.sigmas[index] != 0:
            shape = tuple(x.shape)
            noise = noise_fn(i, shape) if noise_fn is not None else draw_noise(shape, x, generator)
        x, pred_x0 = ddim_step(params, index, x, eps, noise)
        if callback is not None:
            callback(i, t_int, x, pred_x0)
    return x
