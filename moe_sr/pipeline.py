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


class ExpertResidency:
    """Where the experts live: all on ``device``, or (offload) only the active one.

    With ``offload=True`` every expert's weights stay in a "home" copy on ``offload_device``
    (pinned CPU memory when the device is a GPU, so copies are fast and asynchronous), and
    :meth:`on_switch` (the router's hook) puts the next expert on the device and points the
    previous one back at its home copy; inference never changes weights, so nothing is copied
    back. 3 switches per image for four stages, plus one when the next image starts again at
    the last stage.

    ``prefetch`` (default: on for CUDA) copies the expert of the next stage (DDIM runs from the
    last stage down to stage 0) on a side stream while the current one computes, so a switch
    costs almost nothing; at most two experts are then on the device.
    """

    def __init__(
        self,
        unets: Sequence[nn.Module],
        device: torch.device,
        dtype: torch.dtype,
        *,
        offload: bool = False,
        offload_device: str | torch.device = "cpu",
        prefetch: bool | None = None,
    ) -> None:
        self.unets = list(unets)
        self.device, self.dtype = device, dtype
        self.offload_device = torch.device(offload_device)
        self.offload = offload  # (on a CPU-only run the "moves" are no-ops, the path is the same)
        self.prefetch = offload and (device.type == "cuda" if prefetch is None else prefetch)
        self.active: int | None = None
        self.switches = 0
        self.switch_seconds = 0.0
        home = self.offload_device if self.offload else device
        pin = self.offload and device.type == "cuda" and self.offload_device.type == "cpu"
        for u in self.unets:
            u.to(device=home, dtype=dtype).eval().requires_grad_(False)
            if pin:
                for t in _tensors(u):
                    t.data = t.data.pin_memory()
        #: home copies: ``self._home[k][i]`` is the i-th tensor of expert k on offload_device
        self._home = [[t.data for t in _tensors(u)] for u in self.unets] if self.offload else []
        #: prefetched experts: ``k -> (tensors on the device, CUDA event or None)``
        self._staged: dict[int, tuple[list[torch.Tensor], Any]] = {}
        use_stream = self.prefetch and device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if use_stream else None
        #: the most expert weight bytes that were on the device at once
        self.peak_resident_bytes = self.resident_bytes()

    def next_stage(self, k: int) -> int:
        """The stage sampled after ``k`` (descending; after stage 0 the next image's last)."""
        return k - 1 if k > 0 else len(self.unets) - 1

    def on_switch(self, prev: int | None, new: int) -> None:
        if not self.offload or new == self.active:
            return
        start = time.perf_counter()
        if self.active is not None:
            self._evict(self.active)
        staged, event = self._staged.pop(new, None) or (self._copy_in(new, None), None)
        if event is not None:  # the compute stream waits for the side-stream copy (GPU side)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for d in staged:
                d.record_stream(current)
        for t, d in zip(_tensors(self.unets[new]), staged):
            t.data = d
        self.active = new
        nxt = self.next_stage(new)
        if self.prefetch and nxt != new and nxt not in self._staged:
            self._staged[nxt] = self._prefetch(nxt)
        self.switches += 1
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes())
        self.switch_seconds += time.perf_counter() - start

    def _copy_in(self, k: int, stream: Any) -> list[torch.Tensor]:
        if stream is None:
            return [h.to(self.device, non_blocking=True) for h in self._home[k]]
        with torch.cuda.stream(stream):
            return [h.to(self.device, non_blocking=True) for h in self._home[k]]

    def _prefetch(self, k: int) -> tuple[list[torch.Tensor], Any]:
        if self._stream is None:
            return self._copy_in(k, None), None
        # the copy must not start before the compute stream has released memory it reuses
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        data = self._copy_in(k, self._stream)
        event = torch.cuda.Event()
        event.record(self._stream)
        return data, event

    def _evict(self, k: int) -> None:
        unet = self.unets[k]
        for t, home in zip(_tensors(unet), self._home[k]):
            t.data = home
        if hasattr(unet, "ffn_moe_layers"):
            for layer in unet.ffn_moe_layers():  # drop stacked weights held on the device
                layer.clear_cache()

    def resident_bytes(self) -> int:
        """Bytes of expert weights currently on the compute device (prefetched ones included)."""
        on_device = [p for u in self.unets for p in u.parameters()]
        on_device += [d for data, _ in self._staged.values() for d in data]
        return sum(
            t.numel() * t.element_size() for t in on_device if _same_device(t.device, self.device)
        )


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers in a fixed order (what offloading moves)."""
    return [*module.parameters(), *module.buffers()]


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True

    def index(d: torch.device) -> int:
        return d.index if d.index is not None else torch.cuda.current_device()

    return index(a) == index(b)


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
        ffn_moe_routing: ``"random"`` (released; seeded per image) or ``"average"``.
        steps, eta, seed, color_fix: sampler and post-processing defaults (released values).
        tiling: a :class:`~moe_sr.tiling.TilingConfig` (default: automatic above 128 latent px).
        cache_ffn_moe: keep the stacked FFN-MoE expert weights between UNet calls (faster, more
            memory); default: on when offloading, off otherwise.
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
        ffn_moe_routing: str = "random",
        steps: int = 200,
        eta: float = 1.0,
        seed: int = 42,
        color_fix: str = "adain",
        tiling: TilingConfig | None = None,
        cache_ffn_moe: bool | None = None,
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
        self.dtype = dtype
        self.vae_dtype = vae_dtype or dtype
        self.stages, self.schedule = stages, schedule
        self.residency = ExpertResidency(unets, self.device, dtype, offload=offload)
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
        # Stacked FFN-MoE expert weights: kept between calls they save a copy per UNet call but
        # cost ~74% of an expert's size. Default: only with offloading (one expert resident).
        cache = offload if cache_ffn_moe is None else cache_ffn_moe
        for u in self.unets:
            if hasattr(u, "cache_ffn_moe_weights") and u.ffn_moe_layers():
                u.cache_ffn_moe_weights(cache)
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
