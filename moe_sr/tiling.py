"""Tiled latent diffusion and tiled FA-VAE decoding for inputs larger than the networks saw.

Both split the latent into overlapping tiles and blend the per-tile results with smooth Gaussian
weights (the "mixture of diffusers" idea: Jiménez 2023; MultiDiffusion, Bar-Tal et al. 2023):

* :class:`TiledDenoiser` wraps any denoiser. At **every** sampling step each tile's noise
  prediction is computed and the predictions are averaged with per-pixel weights, so the sampler
  always sees one coherent latent (seams cannot drift apart over the steps).
* :func:`tiled_fa_vae_decode` decodes latent tiles; for each tile the FA-VAE encoder runs on the
  matching crop of the x8 LR image, so the skip features are tiled alongside the latent and the
  full-size encoder activations are never held at once.

The UNet has global self-attention at its lowest resolution, so a tiled result is close to, not
equal to, the untiled one (tests state the PSNR).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ldm.data.sr_inputs import encoder_input, upscaled_crop
from ldm.diffusion.denoiser import Denoiser

TileMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class TilingConfig:
    """Tile sizes are in latent pixels (x4 for the output image of a vq-f4 FA-VAE).

    ``mode``: ``"auto"`` tiles a stage only when the latent is larger than its tile size,
    ``"on"`` always tiles (one tile if the latent fits), ``"off"`` never tiles.
    Defaults: 128-pixel latent tiles (the 512 px training crops of the release).
    """

    mode: TileMode = "auto"
    latent_tile: int = 128
    latent_overlap: int = 32
    vae_tile: int = 128
    vae_overlap: int = 16
    #: tiles per UNet call (batched); more is faster on a GPU, costs memory
    tile_batch: int = 4

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"tiling mode must be 'auto', 'on' or 'off', got {self.mode!r}")
        for tile, overlap, name in (
            (self.latent_tile, self.latent_overlap, "latent"),
            (self.vae_tile, self.vae_overlap, "vae"),
        ):
            if tile <= 0 or not 0 <= overlap < tile:
                raise ValueError(
                    f"{name} tiles: need tile > 0 and 0 <= overlap < tile, got {tile}, {overlap}"
                )
        if self.tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {self.tile_batch}")

    def use_latent_tiles(self, height: int, width: int) -> bool:
        if self.mode == "off":
            return False
        return self.mode == "on" or max(height, width) > self.latent_tile

    def use_vae_tiles(self, height: int, width: int) -> bool:
        if self.mode == "off":
            return False
        return self.mode == "on" or max(height, width) > self.vae_tile


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with >= ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    # spread the tiles evenly so every overlap is at least ``overlap``
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_boxes(
    height: int, width: int, tile: int, overlap: int, multiple: int = 1
) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` boxes; box sizes are ``min(tile, size)`` rounded down to ``multiple``."""
    th = _fit(tile, height, multiple)
    tw = _fit(tile, width, multiple)
    return [
        (y, y + th, x, x + tw)
        for y in tile_starts(height, th, min(overlap, th - 1))
        for x in tile_starts(width, tw, min(overlap, tw - 1))
    ]


def _fit(tile: int, size: int, multiple: int) -> int:
    t = min(tile, size)
    t -= t % multiple
    if t <= 0:
        raise ValueError(f"size {size} is smaller than the required multiple {multiple}")
    return t


def gaussian_weights(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[H, W]`` separable Gaussian bump, sigma = size / 6 (edge weight ~1% of the centre)."""

    def bump(n: int) -> torch.Tensor:
        x = torch.arange(n, device=device, dtype=torch.float64)
        mid = (n - 1) / 2
        sigma = max(n / 6.0, 1e-3)
        return torch.exp(-0.5 * ((x - mid) / sigma) ** 2)

    return (bump(height)[:, None] * bump(width)[None, :]).to(dtype)


class TiledDenoiser(nn.Module):
    """``denoiser(x_t, t, cond)`` evaluated on overlapping tiles and blended (every step).

    ``cond`` must be a tensor with the latent's spatial size (the concat condition); it is cut
    into the same tiles. ``multiple`` is the UNet's size divisor.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        tile: int,
        overlap: int,
        *,
        multiple: int = 1,
        tile_batch: int = 4,
    ) -> None:
        super().__init__()
        if tile % multiple:
            raise ValueError(f"latent tile {tile} must be a multiple of the UNet's {multiple}")
        self.denoiser = denoiser
        self.tile, self.overlap, self.multiple, self.tile_batch = (
            tile,
            overlap,
            multiple,
            tile_batch,
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x_t.shape
        if cond.shape[-2:] != x_t.shape[-2:]:
            raise ValueError(
                f"tiled denoising needs a condition of the latent's size, got {tuple(cond.shape)}"
                f" for x_t {tuple(x_t.shape)}"
            )
        boxes = tile_boxes(h, w, self.tile, self.overlap, self.multiple)
        if len(boxes) == 1 and boxes[0] == (0, h, 0, w):
            return self.denoiser(x_t, t, cond)
        out = torch.zeros_like(x_t, dtype=torch.float32)
        norm = torch.zeros((1, 1, h, w), device=x_t.device, dtype=torch.float32)
        y0, y1, x0, x1 = boxes[0]
        weight = gaussian_weights(y1 - y0, x1 - x0, device=x_t.device)[None, None]
        for i in range(0, len(boxes), self.tile_batch):
            group = boxes[i : i + self.tile_batch]
            xs = torch.cat([x_t[..., a:c, p:q] for a, c, p, q in group])
            cs = torch.cat([cond[..., a:c, p:q] for a, c, p, q in group])
            eps = self.denoiser(xs, t.repeat(len(group)), cs).float()
            for j, (a, c, p, q) in enumerate(group):
                out[..., a:c, p:q] += eps[j * b : (j + 1) * b] * weight
                norm[..., a:c, p:q] += weight
        return (out / norm).to(x_t.dtype)


#: ``encoder_input(y0, y1, x0, x1)``: the FA-VAE encoder input of an output-pixel box
EncoderInput = Callable[[int, int, int, int], torch.Tensor]
#: ``callback(done, total)`` after each decoded tile
TileCallback = Callable[[int, int], None]


def tiled_fa_vae_decode(
    vae: nn.Module,
    z: torch.Tensor,
    enc_input: torch.Tensor | EncoderInput,
    tile: int,
    overlap: int,
    *,
    quantize: bool = True,
    scale: int | None = None,
    callback: TileCallback | None = None,
) -> torch.Tensor:
    """Decode latent ``z`` ``[B,C,h,w]`` with LR encoder features, tile by tile.

    ``enc_input`` is the FA-VAE encoder input at output size (``f*h x f*w``, f = the VAE's
    downsample factor), or a function that makes the crop of one output-pixel box (then the
    full-size input never exists; ``scale`` gives ``f``). Each latent tile is decoded with the
    skip features of the encoder run on the matching input crop; tiles are blended with
    Gaussian weights at output resolution. Time and memory: one tile's work per tile (the tile
    count grows with the area) plus the output and its blending weights.

    Full-size tiles spread evenly (overlaps larger than ``overlap`` where the size is not a
    multiple) decode better than tiles shrunk to the minimum overlap: on the tiny test model
    shrinking them lost 2-7 dB against the untiled decode, so the tile size is the knob: on a
    CPU keep it within the range where one tile's cost follows its area (<= 128 latent px,
    ``BENCHMARKS.md``).
    """
    b, _, h, w = z.shape
    if callable(enc_input):
        if scale is None:
            raise ValueError("give scale (output / latent size) with an encoder-input function")
        f, crop = scale, enc_input
    else:
        full = enc_input
        f = full.shape[-1] // w
        if full.shape[-2:] != (h * f, w * f):
            raise ValueError(
                f"encoder input {tuple(full.shape)} is not {f}x the latent {tuple(z.shape)}"
            )

        def crop(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            return full[..., y0:y1, x0:x1]

    out: torch.Tensor | None = None
    norm = torch.zeros((1, 1, h * f, w * f), device=z.device, dtype=torch.float32)
    boxes = tile_boxes(h, w, tile, overlap)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        enc = crop(y0 * f, y1 * f, x0 * f, x1 * f).to(device=z.device, dtype=z.dtype)
        feats = vae.encode(enc, return_features=True)[1]
        x = vae.decode(z[..., y0:y1, x0:x1], skips=feats, quantize=quantize).float()
        if out is None:
            out = torch.zeros((b, x.shape[1], h * f, w * f), device=z.device, dtype=torch.float32)
        weight = gaussian_weights((y1 - y0) * f, (x1 - x0) * f, device=z.device)[None, None]
        out[..., y0 * f : y1 * f, x0 * f : x1 * f] += x * weight
        norm[..., y0 * f : y1 * f, x0 * f : x1 * f] += weight
        del x, feats, enc
        if callback is not None:
            callback(i + 1, len(boxes))
    assert out is not None
    return out.div_(norm)


def fa_vae_decode(
    vae: nn.Module,
    z: torch.Tensor,
    lr_padded: Sequence[np.ndarray],
    tiling: TilingConfig,
    *,
    scale: int = 4,
    lr_scale: int = 8,
    callback: TileCallback | None = None,
) -> torch.Tensor:
    """The pipeline's FA-VAE decode of latents ``z`` (``scale`` x smaller than the output) with
    the features of the x``lr_scale`` bicubic LR images ``lr_padded`` (uint8 HWC, one per
    latent). Above the VAE tile: tiled, the x8 encoder input made tile by tile from the LR
    image (never held whole; one image at a time); below: whole, batched."""
    if tiling.use_vae_tiles(*z.shape[-2:]):
        if len(lr_padded) != 1:
            raise ValueError("tiled decoding takes one image at a time")
        img = lr_padded[0]
        return tiled_fa_vae_decode(
            vae, z, lambda *box: upscaled_crop(img, box, lr_scale), tiling.vae_tile,
            tiling.vae_overlap, scale=scale, callback=callback,
        )  # fmt: skip
    enc = torch.cat([encoder_input(p, lr_scale) for p in lr_padded])
    feats = vae.encode(enc.to(z.device, z.dtype), return_features=True)[1]
    x = vae.decode(z, skips=feats, quantize=True).float()
    if callback is not None:
        callback(1, 1)
    return x


def crop_boxes_cover(boxes: Sequence[tuple[int, int, int, int]], height: int, width: int) -> bool:
    """True if the boxes cover every pixel of ``[0,height) x [0,width)`` (used by tests)."""
    seen = torch.zeros(height, width, dtype=torch.bool)
    for y0, y1, x0, x1 in boxes:
        seen[y0:y1, x0:x1] = True
    return bool(seen.all())
