"""Ancestral DDPM sampling (Ho et al. 2020) with optional timestep respacing.

With all ``T`` steps this is latent-diffusion's ``DDPM.p_sample_loop`` for eps-prediction:
``x_0 = sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps``, posterior mean
``coef1 x_0 + coef2 x_t`` and noise ``exp(0.5 log_var_clipped)`` except at the last step, all with
the float32 coefficients LDM stores. With a subset of the timesteps (respacing, as in
guided-diffusion's ``respace.py``) the betas are recomputed from ``alphas_cumprod`` over the
subset; the denoiser still receives the ORIGINAL timesteps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ldm.diffusion.ddim import NoiseFn, draw_noise, state_dtype
from ldm.diffusion.denoiser import Denoiser, StepCallback
from ldm.diffusion.schedule import NoiseSchedule

__all__ = ["ddpm_timesteps", "ddpm_coefficients", "ddpm_sample"]


def ddpm_timesteps(num_timesteps: int, steps: int | None = None) -> torch.Tensor:
    """Increasing int64 timesteps for ancestral sampling.

    ``None``: all ``0 .. T-1``. An int ``n``: ``n`` evenly spaced timesteps from 0 to ``T-1``
    (rounded; both ends included; ``n = 1`` gives ``[T-1]``).
    """
    if steps is None:
        return torch.arange(num_timesteps, dtype=torch.long)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an int in [1, {num_timesteps}] or None, got {steps!r}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1], dtype=torch.long)
    grid = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64)
    return grid.round().to(torch.long)


def _check_timesteps(timesteps: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    ts = torch.as_tensor(timesteps).to("cpu")
    if ts.dtype.is_floating_point or ts.ndim != 1 or ts.numel() < 1:
        raise ValueError("timesteps must be a non-empty 1-D sequence of ints")
    ts = ts.to(torch.long)
    if ts.min() < 0 or ts.max() >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps}), got {ts.tolist()[:8]}...")
    if ts.numel() > 1 and not (ts[1:] > ts[:-1]).all():
        raise ValueError("timesteps must be strictly increasing")
    return ts


def ddpm_coefficients(schedule: NoiseSchedule, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 per-step coefficients for the (possibly respaced) chain over ``timesteps``.

    Entry ``i`` is the step from ``timesteps[i]`` to ``timesteps[i-1]`` (to ``x_0`` for
    ``i = 0``). Keys: ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``,
    ``posterior_mean_coef1``, ``posterior_mean_coef2``, ``posterior_log_variance_clipped``.
    Where consecutive original timesteps are used the values equal LDM's buffers exactly.
    """
    ts = _check_timesteps(timesteps, schedule.num_timesteps)
    ac = schedule.alphas_cumprod[ts]
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    betas = 1.0 - ac / ac_prev
    alphas = ac / ac_prev
    # consecutive original timesteps (and t = 0 first): use the schedule's own values so that the
    # full chain reproduces LDM's buffers bit for bit
    prev_t = torch.cat([torch.full((1,), -1, dtype=torch.long), ts[:-1]])
    same = prev_t == ts - 1
    betas = torch.where(same, schedule.betas[ts], betas)
    alphas = torch.where(same, schedule.alphas[ts], alphas)
    ac_prev = torch.where(same, schedule.alphas_cumprod_prev[ts], ac_prev)
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
    }


@torch.no_grad()
def ddpm_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    cond: Any,
    *,
    steps: int | None = None,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    noise_fn: NoiseFn | None = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Ancestral sampling from ``x_T`` down to ``x_0``.

    Args:
        denoiser: ``denoiser(x_t, t, cond) -> eps`` (``t`` in original timesteps).
        schedule: the training noise schedule.
        x_T: starting noise; the state is kept in at least float32.
        cond: passed unchanged to the denoiser.
        steps: ``None`` for all ``T`` steps, or a number of evenly respaced steps.
        timesteps: explicit increasing timesteps instead of ``steps``.
        generator: source of the per-step noise; ``noise_fn(i, shape)`` overrides it.
        callback: ``callback(i, t, x, pred_x0)`` after every step (``i = 0`` first).
        clip_x0: clamp the predicted ``x_0`` to ``[-clip_x0, clip_x0]`` (LDM's
            ``clip_denoised`` with 1.0 for pixel-space models; ``None`` for latents).
    """
    if timesteps is not None and steps is not None:
        raise ValueError("give either steps or timesteps, not both")
    ts = (
        ddpm_timesteps(schedule.num_timesteps, steps)
        if timesteps is None
        else _check_timesteps(torch.as_tensor(timesteps), schedule.num_timesteps)
    )
    coef = ddpm_coefficients(schedule, ts)
    x = x_T.to(state_dtype(x_T))
    batch = x.shape[0]
    num = int(ts.numel())
    for i in range(num):
        index = num - 1 - i
        t_int = int(ts[index])

        c = {
            name: v[index].to(x.dtype).reshape([1] * x.ndim).to(x.device)
            for name, v in coef.items()
        }
        t = torch.full((batch,), t_int, dtype=torch.long)  # on the host (see ddim_sample)
        eps = denoiser(x, t, cond)
        if eps.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps.shape)} for x_t {tuple(x.shape)}")
        eps = eps.to(x.dtype)
        pred_x0 = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps
        if clip_x0 is not None:
            pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
        mean = c["posterior_mean_coef1"] * pred_x0 + c["posterior_mean_coef2"] * x
        if index > 0:
            shape = tuple(x.shape)
            noise = noise_fn(i, shape) if noise_fn is not None else draw_noise(shape, x, generator)
            std = (0.5 * c["posterior_log_variance_clipped"]).exp()
            x = mean + std * noise.to(device=x.device, dtype=x.dtype)
        else:
            x = mean
        if callback is not None:
            callback(i, t_int, x, pred_x0)
    return x
