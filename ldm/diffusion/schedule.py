"""The DDPM noise schedule and the conversions between ``x_0``, ``eps`` and ``v``.

``NoiseSchedule`` owns ``betas`` / ``alphas_cumprod``; networks never hold it (DESIGN seam 2).
Everything is kept in float64. Gathering a coefficient for a tensor casts the float64 value to
the tensor's dtype, which for float32 is exactly the value latent-diffusion stores in its float32
buffers (``DDPM.register_schedule`` computes in float64 numpy and stores ``torch.float32``).
So ``q_sample`` and the conversions match the official code bit for bit in float32 and are more
precise in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.config import ConfigError, to_plain

__all__ = ["NoiseSchedule", "LDM_BUFFER_NAMES", "build_schedule", "schedule_from_spec"]

#: The 12 schedule buffers of latent-diffusion's ``DDPM`` in state_dict order.
LDM_BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


class NoiseSchedule:
    """A discrete variance-preserving schedule over timesteps ``t = 0 .. T-1``.

    Args:
        betas: 1-D sequence of ``T`` betas in (0, 1) (any float dtype; kept as float64 on CPU).

    Attributes (float64, CPU): ``betas``, ``alphas``, ``alphas_cumprod``, ``alphas_cumprod_prev``
    (``[1] + alphas_cumprod[:-1]``), ``num_timesteps``.
    """

    def __init__(self, betas: torch.Tensor | Sequence[float]):
        betas = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64).clone()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(
                f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}"
            )
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError(
                "betas must be finite and strictly between 0 and 1 "
                f"(got min {betas.min().item():.3g}, max {betas.max().item():.3g})"
            )
        self.betas = betas
        self.num_timesteps = int(betas.numel())
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]]
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(
        cls,
        num_timesteps: int = 1000,
        linear_start: float = 0.0015,
        linear_end: float = 0.0155,
    ) -> NoiseSchedule:
        """LDM's "linear" schedule: linear in sqrt(beta) (``make_beta_schedule("linear")``).

        ``betas = linspace(sqrt(linear_start), sqrt(linear_end), T, float64) ** 2``. The defaults
        are those of latent-diffusion's SR models and of the released SS-MoE stage experts.
        """
        _check_num_timesteps(num_timesteps)
        if not 0 < linear_start < 1 or not 0 < linear_end < 1:
            raise ValueError(
                f"linear_start and linear_end must lie in (0, 1), got {linear_start}, {linear_end}"
            )
        betas = (
            torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64)
            ** 2
        )
        return cls(betas)

    @classmethod
    def cosine(
        cls, num_timesteps: int = 1000, s: float = 8e-3, max_beta: float = 0.999
    ) -> NoiseSchedule:
        """The cosine schedule of Nichol & Dhariwal (2021), as LDM's ``make_beta_schedule("cosine")``.

        ``f(t) = cos((t/T + s)/(1 + s) * pi/2)^2``, ``beta_t = 1 - f(t+1)/f(t)`` clipped to
        ``[0, max_beta]`` (beta 0 at ``t = 0`` is raised to the smallest positive float64 so the
        schedule stays valid; LDM's clipping gives a strictly positive value there in practice).
        """
        _check_num_timesteps(num_timesteps)
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps + s
        f = torch.cos(steps / (1 + s) * math.pi / 2) ** 2
        f = f / f[0]
        betas = (1 - f[1:] / f[:-1]).clamp(min=torch.finfo(torch.float64).tiny, max=max_beta)
        return cls(betas)

    # ------------------------------------------------------------------ LDM buffers
    def ldm_buffers(self) -> dict[str, torch.Tensor]:
        """The 12 buffers latent-diffusion's ``DDPM.register_schedule`` stores (float32, by name).

        Equal to the ``schedule`` reference fixture and to the schedule entries of the released
        checkpoints (``v_posterior = 0``).
        """
        ac = self.alphas_cumprod
        ac_prev = self.alphas_cumprod_prev
        betas = self.betas
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        values = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * self.alphas.sqrt() / (1.0 - ac),
        }
        return {name: values[name].to(torch.float32) for name in LDM_BUFFER_NAMES}

    def ldm_lvlb_weights(self) -> torch.Tensor:
        """LDM's non-persistent ``lvlb_weights`` for eps-prediction (float32, as computed there)."""
        buf = self.ldm_buffers()
        w = buf["betas"] ** 2 / (
            2
            * buf["posterior_variance"]
            * self.alphas.to(torch.float32)
            * (1 - buf["alphas_cumprod"])
        )
        w[0] = w[1]
        return w

    # ------------------------------------------------------------------ gathering
    def _check_t(self, t: torch.Tensor | int, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim != 1 or t.numel() != batch:
            raise ValueError(f"t must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps}), "
                f"got min {int(t.min())}, max {int(t.max())}"
            )
        return t

    def gather(
        self, values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor
    ) -> torch.Tensor:
        """``values[t]`` cast to ``like``'s dtype/device, shaped ``[B, 1, ..., 1]`` to broadcast."""
        t = self._check_t(t, like.shape[0]).to("cpu", torch.long)
        out = values[t].to(dtype=like.dtype).to(like.device)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    # ------------------------------------------------------------------ forward process
    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor
    ) -> torch.Tensor:
        """Sample ``q(x_t | x_0)``: ``sqrt(a_t) x_0 + sqrt(1 - a_t) noise`` (LDM ``q_sample``)."""
        return (
            self.gather(self.alphas_cumprod.sqrt(), t, x0) * x0
            + self.gather((1.0 - self.alphas_cumprod).sqrt(), t, x0) * noise
        )

    def pred_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor
    ) -> torch.Tensor:
        """``x_0 = sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps`` (LDM ``predict_start_from_noise``)."""
        ac = self.alphas_cumprod
        return (
            self.gather((1.0 / ac).sqrt(), t, x_t) * x_t
            - self.gather((1.0 / ac - 1).sqrt(), t, x_t) * eps
        )

    def eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor
    ) -> torch.Tensor:
        """``eps = (x_t - sqrt(a_t) x_0) / sqrt(1 - a_t)``; the inverse of :meth:`pred_x0_from_eps`."""
        ac = self.alphas_cumprod
        return (x_t - self.gather(ac.sqrt(), t, x_t) * x0) / self.gather((1.0 - ac).sqrt(), t, x_t)

    # v-prediction (Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1 - a) x_0
    def v_from_eps(
        self, x0: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor
    ) -> torch.Tensor:
        """The v-prediction target ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0``."""
        ac = self.alphas_cumprod
        return self.gather(ac.sqrt(), t, x0) * eps - self.gather((1.0 - ac).sqrt(), t, x0) * x0

    def pred_x0_from_v(
        self, x_t: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor
    ) -> torch.Tensor:
        """``x_0 = sqrt(a_t) x_t - sqrt(1 - a_t) v``."""
        ac = self.alphas_cumprod
        return self.gather(ac.sqrt(), t, x_t) * x_t - self.gather((1.0 - ac).sqrt(), t, x_t) * v

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor) -> torch.Tensor:
        """``eps = sqrt(1 - a_t) x_t + sqrt(a_t) v``."""
        ac = self.alphas_cumprod
        return self.gather((1.0 - ac).sqrt(), t, x_t) * x_t + self.gather(ac.sqrt(), t, x_t) * v

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.num_timesteps}, beta_0={self.betas[0].item():.4g}, "
            f"beta_T={self.betas[-1].item():.4g})"
        )


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")


def schedule_from_spec(spec: Mapping[str, Any] | None) -> NoiseSchedule:
    """``{kind: linear|cosine, num_timesteps, ...}`` (a config section) -> :class:`NoiseSchedule`.

    ``None`` or ``{}`` gives LDM's linear SR schedule (T=1000, 0.0015 -> 0.0155).
    """
    spec = dict(spec or {})
    kind = spec.pop("kind", "linear")
    if kind == "linear":
        return NoiseSchedule.linear(**spec)
    if kind == "cosine":
        return NoiseSchedule.cosine(**spec)
    raise ValueError(f"schedule kind must be 'linear' or 'cosine', got {kind!r}")


def build_schedule(spec: Mapping[str, Any] | None) -> NoiseSchedule:
    """A config's ``schedule`` section -> :class:`NoiseSchedule`; bad values raise ``ConfigError``.

    The one builder used by training (``diffusion_sr``) and the pipeline (``moe_sr.build``);
    see :func:`schedule_from_spec` for the keys (``None`` gives LDM's linear SR schedule).
    """
    try:
        return schedule_from_spec(to_plain(spec))
    except ValueError as err:
        raise ConfigError(str(err)) from None
