"""LightningModule that trains one latent denoiser for super-resolution (LDM ``LatentDiffusion``).

Per step: encode the HR crop with the frozen first stage (or read a cached latent), draw ``t`` from
the configured timestep sampler and call :func:`ldm.diffusion.loss.diffusion_loss`: noise the
latent with the ``NoiseSchedule``, predict ``eps`` from ``unet(cat([x_t, lr_up2]), t)`` (the
``ConcatDenoiser``), minimise the MSE to the true noise (Ho et al. 2020, "simple" loss). After each optimizer step the optional expert weight averaging (EWA) and then the EMA run.

The state dict keeps latent-diffusion's layout, so our Lightning checkpoints read like the
released stage checkpoints: the 12 schedule buffers (kept for the layout; the loss and the
sampler read the ``NoiseSchedule``, which holds the same values), ``model.diffusion_model.*`` (the UNet),
``model_ema.*`` (EMA, dots removed, ``decay``, ``num_updates``) and ``first_stage_model.*``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import ConfigError, instantiate, to_plain
from ldm.diffusion.ddim import ddim_sample
from ldm.diffusion.denoiser import ConcatDenoiser
from ldm.diffusion.loss import diffusion_loss
from ldm.diffusion.schedule import build_schedule
from ldm.registry import register
from ldm.training.ema import EMA
from ldm.training.ewa import ExpertWeightAveraging
from ldm.training.first_stage import build_first_stage, decode_latent, encode_to_latent
from ldm.training.init_weights import init_from_checkpoint

logger = logging.getLogger(__name__)


@register("diffusion_sr")
class DiffusionSRModule(L.LightningModule):
    """Train one concat-conditioned latent denoiser (a full SR UNet or one stage expert).

    Args:
        unet: ``{target, params}`` of the denoising UNet (e.g. ``${preset:unet/sr8x_expert}``).
        first_stage: ``{target, params}`` of the autoencoder or a moe-sr safetensors file; may be
            ``None`` when every batch carries a cached latent under ``latent_key``.
        first_stage_ckpt: weights for ``first_stage`` (``first_stage_ckpt_prefix`` selects them
            inside a bigger checkpoint, e.g. ``first_stage_model.``).
        scale_factor: latent scale; default: the first stage's ``scale_factor`` attribute.
        schedule: noise schedule (see :func:`ldm.diffusion.schedule.build_schedule`); LDM SR
            defaults.
        timestep_sampler: ``{target, params}`` of the training timestep sampler; default uniform
            over ``[0, T)``. Stage experts use ``moe_sr``'s ``stage_timesteps``.
        base_learning_rate: LDM ``base_learning_rate``; the run scales it by
            ``accumulate * devices * nodes * batch`` when ``scale_lr`` is on (see run.py).
        weight_decay, adam_betas: AdamW settings (torch defaults as LDM).
        lr_warmup_steps: linear learning-rate warm-up (0: none).
        use_ema, ema_decay: LDM EMA (``model_ema``).
        ewa: ``{beta_max, ramp_steps}`` to average the FFN-MoE experts after each step, or None.
        init_from: ``{path, weights: raw|ema, key_map: {target, params} | None}`` to start from
            another checkpoint (see :func:`ldm.training.init_weights.init_from_checkpoint`).
        hr_key, cond_key, latent_key: batch keys of the HR image, the condition, a cached latent.
        sample_steps, sample_eta: DDIM settings of the image logs.
    """

    def __init__(
        self,
        unet: Mapping[str, Any],
        first_stage: Mapping[str, Any] | str | None = None,
        first_stage_ckpt: str | None = None,
        first_stage_ckpt_prefix: str = "",
        scale_factor: float | None = None,
        schedule: Mapping[str, Any] | None = None,
        timestep_sampler: Mapping[str, Any] | None = None,
        base_learning_rate: float = 1.0e-6,
        weight_decay: float = 0.01,
        adam_betas: Sequence[float] = (0.9, 0.999),
        lr_warmup_steps: int = 0,
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        ewa: Mapping[str, Any] | None = None,
        init_from: Mapping[str, Any] | None = None,
        hr_key: str = "hr",
        cond_key: str = "lr_up2",
        latent_key: str = "latent",
        sample_steps: int = 20,
        sample_eta: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        sched = build_schedule(schedule)
        self.schedule = sched
        self.num_timesteps = sched.num_timesteps
        # LDM's 12 buffers first (same state_dict order as the released checkpoints).
        for name, value in sched.ldm_buffers().items():
            self.register_buffer(name, value)

        self.model = ConcatDenoiser(instantiate(unet))
        if init_from is not None:
            init_from_checkpoint(self.model.diffusion_model, **dict(to_plain(init_from)))
        self.use_ema = bool(use_ema)
        if self.use_ema:
            self.model_ema = EMA(self.model, decay=ema_decay)

        self.first_stage_model = None
        if first_stage is not None:
            self.first_stage_model = build_first_stage(
                first_stage, ckpt=first_stage_ckpt, ckpt_prefix=first_stage_ckpt_prefix
            )
        elif first_stage_ckpt is not None:
            raise ConfigError("first_stage_ckpt is given but first_stage is not")
        if scale_factor is None:
            if self.first_stage_model is None:
                raise ConfigError(
                    "without a first_stage, give scale_factor (the latent cache holds unscaled "
                    "latents; the module multiplies them by scale_factor)"
                )
            scale_factor = float(self.first_stage_model.scale_factor)
        self.scale_factor = float(scale_factor)

        sampler_cfg = timestep_sampler or {
            "target": "uniform_timesteps",
            "params": {"num_timesteps": self.num_timesteps},
        }
        self.timestep_sampler = instantiate(sampler_cfg)
        if (
            getattr(self.timestep_sampler, "num_timesteps", self.num_timesteps)
            != self.num_timesteps
        ):
            raise ConfigError(
                f"timestep sampler is built for T={self.timestep_sampler.num_timesteps} but the "
                f"schedule has T={self.num_timesteps}"
            )
        self.ewa = ExpertWeightAveraging(**dict(to_plain(ewa))) if ewa else None
        self.learning_rate = float(base_learning_rate)
        self.last_ewa_beta = 0.0

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        super().train(mode)
        if self.first_stage_model is not None:
            self.first_stage_model.eval()  # frozen: BatchNorm/Dropout stay in inference mode
        return self

    # ------------------------------------------------------------------ inputs
    def get_latent(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``scale_factor * z_0`` of the HR images (cached latent when the batch has one)."""
        if self.hparams.latent_key in batch:
            return self.scale_factor * batch[self.hparams.latent_key].float()
        if self.first_stage_model is None:
            raise KeyError(
                f"batch has no cached latent {self.hparams.latent_key!r} and the module has no "
                f"first_stage to encode {self.hparams.hr_key!r}; keys: {sorted(batch)}"
            )
        return encode_to_latent(
            self.first_stage_model, batch[self.hparams.hr_key].float(), self.scale_factor
        )

    def get_cond(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.hparams.cond_key not in batch:
            raise KeyError(
                f"batch has no condition {self.hparams.cond_key!r}; keys: {sorted(batch)}"
            )
        return batch[self.hparams.cond_key].float()

    # ------------------------------------------------------------------ loss
    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        z0 = self.get_latent(batch)
        cond = self.get_cond(batch)
        t = self.timestep_sampler(z0.shape[0], device=z0.device)
        return diffusion_loss(self.model, _BufferForwardProcess(self), z0, cond, t)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        bs = batch[self.hparams.cond_key].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        self.log(
            "global_step", float(self.global_step), prog_bar=False, on_step=True, batch_size=bs
        )
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        bs = batch[self.hparams.cond_key].shape[0]
        self.log("val/loss", self.loss(batch), on_epoch=True, sync_dist=True, batch_size=bs)
        if self.use_ema:
            with self.model_ema.average_parameters(self.model):
                loss_ema = self.loss(batch)
            self.log("val/loss_ema", loss_ema, on_epoch=True, sync_dist=True, batch_size=bs)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params,
            lr=self.learning_rate,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.adam_betas),
        )
        warmup = int(self.hparams.lr_warmup_steps)
        if warmup <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.after_optimizer_step(self.global_step)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """EWA (official order: right after the step), then the EMA update."""
        if self.ewa is not None:
            self.last_ewa_beta = self.ewa(self.model.diffusion_model, step)
            self.log("train/ewa_beta", self.last_ewa_beta, on_step=True)
        if self.use_ema:
            self.model_ema.update(self.model)

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def log_images(
        self,
        batch: Mapping[str, torch.Tensor],
        n: int = 4,
        steps: int | None = None,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """``lr`` (upsampled to HR size), ``sample`` (DDIM with the EMA weights), ``hr``; in [-1, 1]."""
        cond = self.get_cond(batch)[:n]
        z0 = self.get_latent({k: v[:n] for k, v in batch.items() if torch.is_tensor(v)})
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x_T = torch.randn(z0.shape, generator=gen).to(self.device)
        was_training = self.training
        self.eval()
        weights = (
            self.model_ema.average_parameters(self.model)
            if self.use_ema
            else contextlib.nullcontext()
        )
        try:
            with weights:
                z = ddim_sample(
                    self.model, self.schedule, x_T, cond,
                    steps=steps or self.hparams.sample_steps,
                    eta=self.hparams.sample_eta, generator=gen,
                )  # fmt: skip
        finally:
            self.train(was_training)
        out: dict[str, torch.Tensor] = {}
        if self.first_stage_model is None:
            out["sample_latent"] = z
            return out
        out["sample"] = decode_latent(self.first_stage_model, z, self.scale_factor).clamp(-1, 1)
        size = out["sample"].shape[-2:]
        lr = batch.get("lr_up8", batch.get("lr", cond))[:n].float()
        out["lr"] = F.interpolate(lr, size=size, mode="nearest") if lr.shape[-2:] != size else lr
        if self.hparams.hr_key in batch:
            out["hr"] = batch[self.hparams.hr_key][:n].float()
        return {k: out[k] for k in ("lr", "sample", "hr") if k in out}


class _BufferForwardProcess:
    """``q_sample`` from the module's registered LDM buffers (float32, on the module's device):
    gathered where ``t`` lives, so a GPU training step needs no device-to-host copy. The values
    are the schedule's (``NoiseSchedule.ldm_buffers``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (x0.ndim - 1)))
        a = self.module.sqrt_alphas_cumprod[t].to(x0.dtype).reshape(shape)
        b = self.module.sqrt_one_minus_alphas_cumprod[t].to(x0.dtype).reshape(shape)
        return a * x0 + b * noise
