"""The 8x super-resolution pipeline: SS-MoE latent diffusion + FA-VAE decoding.

Images go through these steps (``MoESRPipeline.run_batch``; one image: ``__call__``; official
``sr_8x_inf/sr_val_ddim_moe.py:main``):

1. validate each LR image and pad it (reflect) so that every network gets a size it can take;
   estimate the memory of the call and refuse what cannot fit (before any work);
2. condition: MATLAB-bicubic x2 (the UNet's concat condition, at latent size); the x8 FA-VAE
   encoder input is made in step 4, whole for an untiled decode, tile by tile otherwise;
3. sample the latent through the :class:`~moe_sr.router.TimestepRouter` (released defaults:
   DDIM, 200 steps, eta 1.0, seeded; or a few-step solver, ``ldm.diffusion.samplers``),
   optionally on blended latent tiles;
4. decode the pre-quantisation latent with the FA-VAE (quantized first, as the release's
   ``VQModelResiUnet.decode``), fusing the encoder features of the x8 LR image, optionally tiled;
5. crop back to exactly 8x the input and correct the colours towards the LR image
   (``adain`` as released, ``wavelet`` or ``none``); return the image in [0, 1].

**Batches.** Images of the same padded size sample together; each image has its own seed, its
own generators (``x_T``, per-step noise, FFN-MoE routing), so its output is identical alone and
in any batch. Images that need tiling run one at a time (their tiles already form the batch of
the UNet calls). :func:`moe_sr.batching.batches` groups a list of images by padded size.

Departures from the release (see ``shared/DESIGN.md`` section 5): the FA-VAE runs in eval mode;
padding makes any size work; FFN-MoE routing can be ``average`` (deterministic); stage experts can
be offloaded one at a time; half precision is an explicit choice instead of autocast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.data.sr_inputs import condition_x2, lr_to_uint8_hwc
from ldm.device import resolve_device
from ldm.diffusion.denoiser import ConcatDenoiser, StepCallback
from ldm.diffusion.samplers import check_sampler_options, run_sampler
from ldm.diffusion.schedule import NoiseSchedule
from moe_sr.color_fix import COLOR_FIX_MODES
from moe_sr.color_fix import color_fix as apply_color_fix
from moe_sr.memory import MemoryEstimate, available_bytes, gib
from moe_sr.residency import ExpertResidency
from moe_sr.router import TimestepRouter
from moe_sr.stages import StageSchedule
from moe_sr.tiling import TiledDenoiser, TilingConfig, fa_vae_decode

logger = logging.getLogger(__name__)

SCALE = 8  # output / input size
LATENT_PER_LR = 2  # latent / LR size (vq-f4 latent of an 8x output)
ROUTING_MODES = ("random", "average")

#: ``decode_callback(done, total)`` after each FA-VAE tile (once for an untiled decode)
DecodeCallback = Callable[[int, int], None]


@dataclass
class SRResult:
    """``image`` [3, 8h, 8w] in [0, 1] (float32, CPU); ``latent`` [C, 2h, 2w] the sampled
    pre-quantisation latent (cropped like the image); ``timings`` in seconds (of the whole
    batch the image was in)."""

    image: torch.Tensor
    latent: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def _vae_channels(vae: nn.Module) -> int:
    """The FA-VAE decoder's base width (for the memory estimate; 128 if unknown)."""
    dec = getattr(vae, "decoder", None)
    return int(getattr(dec, "ch", 128))


def unet_multiple(unet: nn.Module) -> int:
    """The latent size divisor a UNet needs (``2**(levels-1)``)."""
    f = getattr(unet, "downsample_factor", None)
    if f is None:
        raise TypeError(f"{type(unet).__name__} has no downsample_factor; cannot pad for it")
    return int(f)


def _pad_hwc(img: np.ndarray, multiple: int, minimum: int = 1) -> np.ndarray:
    """Pad bottom/right to a multiple of ``multiple`` and at least ``minimum`` (reflect; edge
    replicate where the image is too small to reflect)."""
    h, w = img.shape[:2]
    ph = max(-(-h // multiple) * multiple, -(-minimum // multiple) * multiple) - h
    pw = max(-(-w // multiple) * multiple, -(-minimum // multiple) * multiple) - w
    if not (ph or pw):
        return img
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode=mode)


class MoESRPipeline:
    """8x SR with a sampling-space mixture of stage expert UNets and the FA-VAE (see module doc).

    Args:
        unets: one stage expert UNet per stage, in stage order (``UNetModel`` instances).
        stages: the stage boundaries the stage experts were trained with.
        schedule: the diffusion noise schedule (release: linear 0.0015..0.0155, T=1000).
        vae: the FA-VAE (``fa_vae_vq_f4``): ``encode(x, return_features=True)``,
            ``decode(z, skips=..., quantize=True)``.
        device: compute device (default: CUDA if available, else CPU).
        dtype: UNet precision (``torch.float16``/``bfloat16`` on GPU; bfloat16 also works on CPU).
        vae_dtype: FA-VAE precision (default: ``dtype``; pass ``torch.float32`` to keep the VAE
            in full precision under a half-precision UNet).
        offload: keep only the active stage expert on ``device`` (the others on the CPU).
        prefetch: with ``offload``, copy the next stage's expert ahead on a side stream
            (default: on for CUDA; see :class:`~moe_sr.residency.ExpertResidency`).
        ffn_moe_routing: ``"random"`` (released; seeded per image) or ``"average"``.
        sampler: ``"ddim"`` (released), ``"dpmpp-2m"`` or ``"unipc"``
            (:mod:`ldm.diffusion.samplers`); ``spacing``: its timestep grid (default: DDIM's
            LDM grid, the solvers' ``logsnr``).
        restart_at_stages: the multistep solvers start their history afresh at every stage
            boundary (no update mixes two stage experts' predictions); default off.
        steps, eta, seed, color_fix: sampler and post-processing defaults (released values;
            ``eta`` is DDIM's only).
        tiling: a :class:`~moe_sr.tiling.TilingConfig` (default: automatic above 128 latent px).
        check_memory: refuse an input whose estimated memory exceeds the device's free memory.

    The stage experts are cast to ``dtype`` and their FFN-MoE expert weights packed
    (``pack_ffn_moe_experts``: the batched layer uses them without a copy) in place; then an
    :class:`~moe_sr.residency.ExpertResidency` owns their storage.
    """

    def __init__(
        self,
        unets: Sequence[nn.Module],
        stages: StageSchedule,
        schedule: NoiseSchedule,
        vae: nn.Module,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
        offload: bool = False,
        prefetch: bool | None = None,
        ffn_moe_routing: str = "random",
        steps: int = 200,
        eta: float = 1.0,
        seed: int = 42,
        color_fix: str = "adain",
        tiling: TilingConfig | None = None,
        sampler: str = "ddim",
        spacing: str | None = None,
        restart_at_stages: bool = False,
        check_memory: bool = True,
    ) -> None:
        if len(unets) != stages.num_stages:
            raise ValueError(f"{len(unets)} stage expert UNets for {stages.num_stages} stages")
        if stages.num_timesteps != schedule.num_timesteps:
            raise ValueError(
                f"stage boundaries end at T={stages.num_timesteps} but the noise schedule has "
                f"{schedule.num_timesteps} timesteps"
            )
        self.device = resolve_device(device)
        if dtype == torch.float16 and self.device.type == "cpu":
            logger.warning("float16 on the CPU is slow and not always supported; use bfloat16")
        if offload and self.device.type == "cpu":
            logger.warning(
                "offload on the CPU saves no memory (the stage experts' home is the same RAM) and "
                "costs one copy per stage change; leave it off unless you test the offload path"
            )
        self.dtype = dtype
        self.vae_dtype = vae_dtype or dtype
        self.stages, self.schedule = stages, schedule
        for u in unets:
            u.to(dtype=dtype)
            if hasattr(u, "pack_ffn_moe_experts"):
                u.pack_ffn_moe_experts()
        self.residency = ExpertResidency(
            unets, self.device, dtype, offload=offload, prefetch=prefetch
        )
        self.unets = self.residency.unets
        self.vae = vae.to(device=self.device, dtype=self.vae_dtype).eval().requires_grad_(False)
        self.router = TimestepRouter(
            [ConcatDenoiser(u, dtype) for u in self.unets],
            stages,
            on_switch=self.residency.on_switch,
        )
        self.multiple = max(unet_multiple(u) for u in self.unets)
        self.latent_channels = int(getattr(self.unets[0], "out_channels", 3))
        self.steps, self.eta, self.seed = steps, eta, seed
        self.set_sampler(sampler, spacing)
        self.restart_at_stages = restart_at_stages
        self.check_memory = check_memory
        self.set_color_fix(color_fix)
        self.set_ffn_moe_routing(ffn_moe_routing)
        self.tiling = tiling or TilingConfig()
        #: the resolved pipeline config when built by ``moe_sr.build`` (for export)
        self.config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ settings
    @property
    def offload(self) -> bool:
        return self.residency.offload

    def set_sampler(self, name: str, spacing: str | None = None) -> None:
        """Choose the sampler (``ddim``, ``dpmpp-2m``, ``unipc``) and its timestep spacing."""
        check_sampler_options(name, self.steps, None, spacing)
        self.sampler, self.spacing = name, spacing

    def describe_sampling(self, steps: int | None = None) -> str:
        """The sampling settings in words (for reports): sampler, steps, eta, seed, routing,
        colour fix."""
        steps = self.steps if steps is None else steps
        eta = f", eta {self.eta}" if self.sampler == "ddim" else ""
        spacing = f" ({self.spacing} spacing)" if self.spacing else ""
        return (
            f"{self.sampler}{spacing}, {steps} steps{eta}, seed {self.seed}, "
            f"{self.ffn_moe_routing} FFN-MoE routing, colour fix {self.color_fix}"
        )

    def set_color_fix(self, mode: str) -> None:
        if mode not in COLOR_FIX_MODES:
            raise ValueError(f"unknown colour fix {mode!r}; use one of {COLOR_FIX_MODES}")
        self.color_fix = mode

    def set_ffn_moe_routing(self, mode: str) -> None:
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown FFN-MoE routing {mode!r}; use one of {ROUTING_MODES}")
        self.ffn_moe_routing = mode

    def _seed_ffn_moe(self, seeds: Sequence[int]) -> None:
        # The release seeds torch's CPU generator before each batch; its FFN-MoE layers then
        # draw one randperm per layer and call from it. A CPU generator seeded alike replays it;
        # one per image routes each image of a batch by its own seed.
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        for u in self.unets:
            if hasattr(u, "ffn_moe_layers") and u.ffn_moe_layers():
                u.set_ffn_moe_routing(self.ffn_moe_routing, generator=gens)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of ``x_T`` for an LR image of ``height x width`` (the padded latent)."""
        ph, pw = _pad_hwc(np.zeros((height, width, 1), np.uint8), *self._pad_rule()).shape[:2]
        return self.latent_channels, LATENT_PER_LR * ph, LATENT_PER_LR * pw

    def batch_key(self, height: int, width: int) -> tuple[int, int, int] | None:
        """Images with equal keys can share a batch: the padded latent shape; ``None`` for an
        image that is tiled (it runs alone)."""
        shape = self.latent_shape(height, width)
        t = self.tiling
        if t.use_latent_tiles(*shape[1:]) or t.use_vae_tiles(*shape[1:]):
            return None
        return shape

    def _pad_rule(self) -> tuple[int, int]:
        # the latent (2x the LR) must be a multiple of the UNet's divisor; odd divisors: pad the
        # LR to the full multiple; at least 2 px at the UNet's lowest level (GroupNorm)
        pad_multiple = max(1, self.multiple // LATENT_PER_LR)
        if self.multiple % LATENT_PER_LR and self.multiple > 1:
            pad_multiple = self.multiple
        return pad_multiple, self.multiple

    # ------------------------------------------------------------------ the steps
    @torch.no_grad()
    def __call__(
        self,
        lr: torch.Tensor | np.ndarray,
        *,
        steps: int | None = None,
        eta: float | None = None,
        seed: int | None = None,
        color_fix: str | None = None,
        callback: StepCallback | None = None,
        latents: torch.Tensor | None = None,
        sampler: str | None = None,
        spacing: str | None = None,
        decode_callback: DecodeCallback | None = None,
    ) -> SRResult:
        """Super-resolve one LR image (``CHW`` float in [0, 1] or uint8 ``HWC``/``CHW``) by 8x.

        ``latents``: the starting noise ``x_T`` (shape :meth:`latent_shape`, as diffusers'
        ``latents=``) instead of the seeded draw, to reproduce a result across machines or
        implementations; the seed still drives the per-step noise and the FFN-MoE routing.
        """
        return self.run_batch(
            [lr], seeds=None if seed is None else [seed],
            latents=None if latents is None else [latents], steps=steps, eta=eta,
            color_fix=color_fix, callback=callback, sampler=sampler, spacing=spacing,
            decode_callback=decode_callback,
        )[0]  # fmt: skip

    @torch.no_grad()
    def run_batch(
        self,
        lrs: Sequence[torch.Tensor | np.ndarray],
        *,
        seeds: Sequence[int] | None = None,
        latents: Sequence[torch.Tensor | None] | None = None,
        steps: int | None = None,
        eta: float | None = None,
        color_fix: str | None = None,
        callback: StepCallback | None = None,
        sampler: str | None = None,
        spacing: str | None = None,
        decode_callback: DecodeCallback | None = None,
    ) -> list[SRResult]:
        """Super-resolve images of one padded size together (see the module docstring).

        ``seeds``: one per image (default: the pipeline's seed for every image); ``latents``:
        optional ``x_T`` per image (``None`` entries are drawn from the seed).
        """
        steps = self.steps if steps is None else steps
        sampler = self.sampler if sampler is None else sampler
        spacing = self.spacing if spacing is None and sampler == self.sampler else spacing
        if eta is None and sampler == "ddim":
            eta = self.eta
        check_sampler_options(sampler, steps, eta, spacing)
        mode = self.color_fix if color_fix is None else color_fix
        if mode not in COLOR_FIX_MODES:
            raise ValueError(f"unknown colour fix {mode!r}; use one of {COLOR_FIX_MODES}")
        n = len(lrs)
        seeds = [self.seed] * n if seeds is None else list(seeds)
        latents = [None] * n if latents is None else list(latents)
        if n < 1 or len(seeds) != n or len(latents) != n:
            raise ValueError(f"{n} images, {len(seeds)} seeds, {len(latents)} latents")
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        # 1. validate and pad; one padded size per batch; tiled images one at a time
        lr_u8 = [lr_to_uint8_hwc(x) for x in lrs]
        for img in lr_u8:
            if img.shape[0] < 1 or img.shape[1] < 1:
                raise ValueError(f"LR image is empty: {img.shape[0]}x{img.shape[1]}")
        padded = [_pad_hwc(img, *self._pad_rule()) for img in lr_u8]
        if len({p.shape for p in padded}) != 1:
            raise ValueError(
                "a batch needs images of one padded size, got "
                f"{sorted({p.shape[:2] for p in padded})}; group them with moe_sr.batching.batches"
            )
        lat_h, lat_w = (LATENT_PER_LR * v for v in padded[0].shape[:2])
        tiled = self.tiling.use_latent_tiles(lat_h, lat_w) or self.tiling.use_vae_tiles(
            lat_h, lat_w
        )
        if tiled and n > 1:
            return [
                r
                for k in range(n)
                for r in self.run_batch(
                    [lrs[k]], seeds=[seeds[k]], latents=[latents[k]], steps=steps, eta=eta,
                    color_fix=mode, callback=callback, sampler=sampler, spacing=spacing,
                    decode_callback=decode_callback,
                )
            ]  # fmt: skip
        self._check_memory(n, lat_h, lat_w)

        # 2. condition: x2 (UNet concat condition), as released
        cond = torch.cat([condition_x2(p) for p in padded]).to(self.device)
        timings["prepare"] = time.perf_counter() - clock

        # 3. sample the latent through the stage router (generators per image)
        clock = time.perf_counter()
        gens = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        x_T = self._start_latents(latents, gens, (self.latent_channels, lat_h, lat_w))
        z = self.sample_latent(
            cond, x_T, seeds=seeds, generators=gens, steps=steps, eta=eta, sampler=sampler,
            spacing=spacing, callback=callback,
        )  # fmt: skip
        timings["sample"] = time.perf_counter() - clock

        # 4. FA-VAE decode (quantize, fuse the LR encoder features)
        clock = time.perf_counter()
        x = self.decode(z, padded, callback=decode_callback)
        timings["decode"] = time.perf_counter() - clock

        # 5. crop back to 8x the input, colour fix, [-1, 1] -> [0, 1]
        results = []
        for k, img in enumerate(lr_u8):
            h, w = img.shape[:2]
            xk = x[k : k + 1, :, : SCALE * h, : SCALE * w].float()
            style = cond[k : k + 1, :, : LATENT_PER_LR * h, : LATENT_PER_LR * w].float()
            xk = apply_color_fix(xk, style, mode)
            image = ((xk + 1.0) / 2.0).clamp(0.0, 1.0)[0].cpu()
            latent = z[k, :, : LATENT_PER_LR * h, : LATENT_PER_LR * w].float().cpu()
            results.append(SRResult(image=image, latent=latent, timings=dict(timings)))
        return results

    def _check_memory(self, batch: int, lat_h: int, lat_w: int) -> None:
        if not self.check_memory:
            return
        est = self.memory_estimate(batch, lat_h, lat_w)
        free = available_bytes(self.device)
        if free is not None and est.total > free:
            raise MemoryError(
                f"an 8x SR of {lat_h // LATENT_PER_LR}x{lat_w // LATENT_PER_LR} px"
                f"{f' (batch {batch})' if batch > 1 else ''} needs about {gib(est.total)} "
                f"({est.describe()}) but {self.device} has {gib(free)} free; use smaller "
                "inputs or tiles, a smaller batch, or split the image"
            )

    def memory_estimate(self, batch: int, lat_h: int, lat_w: int) -> MemoryEstimate:
        """Estimated peak memory of :meth:`run_batch` for a padded latent ``lat_h x lat_w``."""
        t = self.tiling
        return MemoryEstimate.for_call(
            batch=batch,
            latent_hw=(lat_h, lat_w),
            scale=SCALE // LATENT_PER_LR,
            latent_channels=self.latent_channels,
            unet_channels=int(getattr(self.unets[0], "model_channels", 160)),
            vae_channels=_vae_channels(self.vae),
            unet_tile=t.latent_tile if t.use_latent_tiles(lat_h, lat_w) else None,
            tile_batch=t.tile_batch,
            vae_tile=t.vae_tile if t.use_vae_tiles(lat_h, lat_w) else None,
            dtype_bytes=torch.finfo(self.dtype).bits // 8,
            vae_dtype_bytes=torch.finfo(self.vae_dtype).bits // 8,
        )

    def _start_latents(
        self,
        latents: Sequence[torch.Tensor | None],
        generators: Sequence[torch.Generator],
        shape: tuple[int, int, int],
    ) -> torch.Tensor:
        """``x_T`` per image: drawn from the image's generator on the compute device, or the
        given one (the draw still happens, so the per-step noise that follows is the same:
        passing a seeded run's ``x_T`` back reproduces that run)."""
        out = []
        for given, gen in zip(latents, generators):
            drawn = torch.randn((1, *shape), generator=gen, device=self.device)
            if given is not None:
                given = torch.as_tensor(given)
                if given.ndim == 3:
                    given = given[None]
                if tuple(given.shape) != (1, *shape):
                    raise ValueError(
                        f"latents must have shape {shape} (pipe.latent_shape(h, w)), got "
                        f"{tuple(given.shape)}"
                    )
                drawn = given.to(self.device, torch.float32)
            out.append(drawn)
        return torch.cat(out)

    def sample_latent(
        self,
        cond: torch.Tensor,
        x_T: torch.Tensor,
        *,
        seeds: Sequence[int],
        generators: Sequence[torch.Generator] | None = None,
        steps: int,
        eta: float | None,
        sampler: str = "ddim",
        spacing: str | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Sample from ``x_T`` ``[B,C,H,W]`` to the latent, conditioned on ``cond`` ``[B,3,H,W]``.

        As in the release, the per-step noise comes from a generator on the compute device
        (``generators``, one per image; default: seeded with ``seeds``; on CUDA this mirrors the
        release's ``seed_everything(seed)``, unverified), and the FFN-MoE permutations from a CPU
        generator with the same seed; so one seed gives different samples on a CPU and on a GPU.
        """
        self._seed_ffn_moe(seeds)
        if generators is None:
            generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        denoiser: Any = self.router
        if self.tiling.use_latent_tiles(*cond.shape[-2:]):
            denoiser = TiledDenoiser(
                self.router,
                self.tiling.latent_tile,
                self.tiling.latent_overlap,
                multiple=self.multiple,
                tile_batch=self.tiling.tile_batch,
            )
        self.router.reset()
        breaks = self.stages.boundaries[1:-1] if self.restart_at_stages else ()
        return run_sampler(
            sampler, denoiser, self.schedule, x_T, cond, steps=steps, eta=eta, spacing=spacing,
            generator=list(generators), callback=callback, history_breaks=breaks,
        )  # fmt: skip

    def decode(
        self,
        z: torch.Tensor,
        lr_padded: Sequence[np.ndarray],
        *,
        callback: DecodeCallback | None = None,
    ) -> torch.Tensor:
        """FA-VAE decode of latents ``z`` with the features of the x8 LR images (the padded
        uint8 LR images of the batch). Tiled above the VAE tile: the x8 encoder input is then
        made tile by tile from the LR image (:func:`~ldm.data.sr_inputs.upscaled_crop`) and
        never held whole."""
        return fa_vae_decode(
            self.vae, z.to(self.vae_dtype), lr_padded, self.tiling,
            scale=SCALE // LATENT_PER_LR, lr_scale=SCALE, callback=callback,
        )  # fmt: skip

    def resident_weight_bytes(self) -> dict[str, int]:
        """Bytes of weights on the compute device: stage experts and VAE."""
        vae = sum(p.numel() * p.element_size() for p in self.vae.parameters())
        vae += sum(b.numel() * b.element_size() for b in self.vae.buffers())
        return {"experts": self.residency.resident_bytes(), "vae": vae}
