"""The 8x super-resolution pipeline: SS-MoE latent diffusion + FA-VAE decoding.

One image goes through these steps (``MoESRPipeline.__call__``; official
``sr_8x_inf/sr_val_ddim_moe.py:main``):

1. validate the LR image and pad it (reflect) so that every network gets a size it can take;
2. condition: MATLAB-bicubic x2 (the UNet's concat condition, at latent size) and x8 (the
   FA-VAE encoder input, at output size), both from the uint8 LR image as released;
3. sample the latent with DDIM through the :class:`~moe_sr.router.TimestepRouter` (released
   defaults: 200 steps, eta 1.0, seeded), optionally on blended latent tiles;
4. decode the pre-quantisation latent with the FA-VAE (quantized first, as the release's
   ``VQModelResiUnet.decode``), fusing the encoder features of the x8 LR image, optionally tiled;
5. crop back to exactly 8x the input and correct the colours towards the LR image
   (``adain`` as released, ``wavelet`` or ``none``); return the image in [0, 1].

Departures from the release (see ``shared/DESIGN.md`` section 5): the FA-VAE runs in eval mode;
padding makes any size work; FFN-MoE routing can be ``average`` (deterministic); experts can be
offloaded one at a time; half precision is an explicit choice instead of autocast.
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

from ldm.data.sr_inputs import lr_to_uint8_hwc, make_sr_inputs
from ldm.device import resolve_device
from ldm.diffusion.ddim import ddim_sample
from ldm.diffusion.schedule import NoiseSchedule
from moe_sr.color_fix import COLOR_FIX_MODES
from moe_sr.color_fix import color_fix as apply_color_fix
from moe_sr.residency import ExpertResidency
from moe_sr.router import TimestepRouter
from moe_sr.stages import StageSchedule
from moe_sr.tiling import TiledDenoiser, TilingConfig, tiled_fa_vae_decode

logger = logging.getLogger(__name__)

SCALE = 8  # output / input size
LATENT_PER_LR = 2  # latent / LR size (vq-f4 latent of an 8x output)
ROUTING_MODES = ("random", "average")

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass
class SRResult:
    """``image`` [3, 8h, 8w] in [0, 1] (float32, CPU); ``latent`` [C, 2h, 2w] the sampled
    pre-quantisation latent (cropped like the image); ``timings`` in seconds."""

    image: torch.Tensor
    latent: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


class _ExpertDenoiser:
    """``eps = unet(cat([x_t, cond]), t)`` in the UNet's dtype, returned in the sampler's dtype."""

    def __init__(self, unet: nn.Module, dtype: torch.dtype) -> None:
        self.unet, self.dtype = unet, dtype

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x_t, cond], dim=1).to(self.dtype)
        return self.unet(x, t).to(x_t.dtype)


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
    """8x SR with a sampling-space mixture of expert UNets and the FA-VAE (see module doc).

    Args:
        unets: one expert UNet per stage, in stage order (``UNetModel`` instances).
        stages: the stage boundaries the experts were trained with.
        schedule: the diffusion noise schedule (release: linear 0.0015..0.0155, T=1000).
        vae: the FA-VAE (``fa_vae_vq_f4``): ``encode(x, return_features=True)``,
            ``decode(z, skips=..., quantize=True)``.
        device: compute device (default: CUDA if available, else CPU).
        dtype: UNet precision (``torch.float16``/``bfloat16`` on GPU; bfloat16 also works on CPU).
        vae_dtype: FA-VAE precision (default: ``dtype``; pass ``torch.float32`` to keep the VAE
            in full precision under a half-precision UNet).
        offload: keep only the active expert on ``device`` (the others on the CPU).
        prefetch: with ``offload``, copy the next stage's expert ahead on a side stream
            (default: on for CUDA; see :class:`~moe_sr.residency.ExpertResidency`).
        ffn_moe_routing: ``"random"`` (released; seeded per image) or ``"average"``.
        steps, eta, seed, color_fix: sampler and post-processing defaults (released values).
        tiling: a :class:`~moe_sr.tiling.TilingConfig` (default: automatic above 128 latent px).

    The experts are cast to ``dtype`` and their FFN-MoE expert weights packed
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
    ) -> None:
        if len(unets) != stages.num_stages:
            raise ValueError(f"{len(unets)} expert UNets for {stages.num_stages} stages")
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
                "offload on the CPU saves no memory (the experts' home is the same RAM) and costs "
                "one copy per stage change; leave it off unless you test the offload path"
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
            [_ExpertDenoiser(u, dtype) for u in self.unets],
            stages,
            on_switch=self.residency.on_switch,
        )
        self.multiple = max(unet_multiple(u) for u in self.unets)
        self.latent_channels = int(getattr(self.unets[0], "out_channels", 3))
        self.steps, self.eta, self.seed = steps, eta, seed
        self.set_color_fix(color_fix)
        self.set_ffn_moe_routing(ffn_moe_routing)
        self.tiling = tiling or TilingConfig()
        #: the resolved pipeline config when built by ``moe_sr.build`` (for export)
        self.config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ settings
    @property
    def offload(self) -> bool:
        return self.residency.offload

    def set_color_fix(self, mode: str) -> None:
        if mode not in COLOR_FIX_MODES:
            raise ValueError(f"unknown colour fix {mode!r}; use one of {COLOR_FIX_MODES}")
        self.color_fix = mode

    def set_ffn_moe_routing(self, mode: str) -> None:
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown FFN-MoE routing {mode!r}; use one of {ROUTING_MODES}")
        self.ffn_moe_routing = mode

    def _seed_ffn_moe(self, seed: int) -> None:
        # The release seeds torch's CPU generator before each batch; its FFN-MoE layers then
        # draw one randperm per layer and call from it. A CPU generator seeded alike replays it.
        gen = torch.Generator().manual_seed(seed)
        for u in self.unets:
            if hasattr(u, "ffn_moe_layers") and u.ffn_moe_layers():
                u.set_ffn_moe_routing(self.ffn_moe_routing, generator=gen)

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
    ) -> SRResult:
        """Super-resolve one LR image (``CHW`` float in [0, 1] or uint8 ``HWC``/``CHW``) by 8x."""
        steps = self.steps if steps is None else steps
        eta = self.eta if eta is None else eta
        seed = self.seed if seed is None else seed
        mode = self.color_fix if color_fix is None else color_fix
        if mode not in COLOR_FIX_MODES:
            raise ValueError(f"unknown colour fix {mode!r}; use one of {COLOR_FIX_MODES}")
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        # 1. validate and pad: the latent (2x the LR) must be a multiple of the UNet's divisor
        lr_u8 = lr_to_uint8_hwc(lr)
        h, w = lr_u8.shape[:2]
        if h < 1 or w < 1:
            raise ValueError(f"LR image is empty: {h}x{w}")
        pad_multiple = max(1, self.multiple // LATENT_PER_LR)
        if self.multiple % LATENT_PER_LR and self.multiple > 1:
            pad_multiple = self.multiple  # odd divisors: pad the LR to the full multiple
        # at least 2 px at the UNet's lowest level (GroupNorm needs more than one value)
        lr_padded = _pad_hwc(lr_u8, pad_multiple, minimum=self.multiple)

        # 2. condition: x2 (UNet concat condition) and x8 (FA-VAE encoder input), as released
        inputs = make_sr_inputs(lr_padded, factor=SCALE)
        cond = inputs.cond_x2.to(self.device)
        enc_input = inputs.vae_enc_input_x8.to(self.device)
        timings["prepare"] = time.perf_counter() - clock

        # 3. sample the latent through the stage router (one generator per image)
        clock = time.perf_counter()
        z = self.sample_latent(cond, steps=steps, eta=eta, seed=seed, callback=callback)
        timings["sample"] = time.perf_counter() - clock

        # 4. FA-VAE decode (quantize, fuse the LR encoder features)
        clock = time.perf_counter()
        x = self.decode(z, enc_input)
        timings["decode"] = time.perf_counter() - clock

        # 5. crop back to 8x the input, colour fix, [-1, 1] -> [0, 1]
        x = x[..., : SCALE * h, : SCALE * w].float()
        style = cond[..., : LATENT_PER_LR * h, : LATENT_PER_LR * w].float()
        x = apply_color_fix(x, style, mode)
        image = ((x + 1.0) / 2.0).clamp(0.0, 1.0)[0].cpu()
        latent = z[0, :, : LATENT_PER_LR * h, : LATENT_PER_LR * w].float().cpu()
        return SRResult(image=image, latent=latent, timings=timings)

    def sample_latent(
        self,
        cond: torch.Tensor,
        *,
        steps: int,
        eta: float,
        seed: int,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """DDIM from seeded noise ``x_T`` to the latent, conditioned on ``cond`` [1,3,H,W].

        As in the release, ``x_T`` and the per-step noise come from a generator on the compute
        device (on CUDA this mirrors the release's ``seed_everything(seed)``; unverified), and the
        FFN-MoE permutations from a CPU generator with the same seed; so one seed gives
        different samples on a CPU and on a GPU.
        """
        self._seed_ffn_moe(seed)
        gen = torch.Generator(self.device).manual_seed(seed)
        shape = (cond.shape[0], self.latent_channels, *cond.shape[-2:])
        x_T = torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32)
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
        return ddim_sample(
            denoiser, self.schedule, x_T, cond, steps=steps, eta=eta, generator=gen,
            callback=callback,
        )  # fmt: skip

    def decode(self, z: torch.Tensor, enc_input: torch.Tensor) -> torch.Tensor:
        """FA-VAE decode of latent ``z`` with the features of ``enc_input`` (tiled if large)."""
        z = z.to(self.vae_dtype)
        enc_input = enc_input.to(self.vae_dtype)
        if self.tiling.use_vae_tiles(*z.shape[-2:]):
            return tiled_fa_vae_decode(
                self.vae, z, enc_input, self.tiling.vae_tile, self.tiling.vae_overlap
            )
        feats = self.vae.encode(enc_input, return_features=True)[1]
        return self.vae.decode(z, skips=feats, quantize=True).float()

    def resident_weight_bytes(self) -> dict[str, int]:
        """Bytes of weights on the compute device: experts and VAE."""
        vae = sum(p.numel() * p.element_size() for p in self.vae.parameters())
        vae += sum(b.numel() * b.element_size() for b in self.vae.buffers())
        return {"experts": self.residency.resident_bytes(), "vae": vae}
