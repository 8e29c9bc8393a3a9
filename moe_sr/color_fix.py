"""Colour correction of the SR output towards the LR input, and conversion to uint8.

Diffusion SR outputs often drift in colour. The release corrects this with AdaIN
(``sr_val_ddim_moe.py:adaptive_instance_normalization``, ``--color_fix``) against the UNet
condition, i.e. the LR image bicubic-upsampled x2. We offer:

- ``adain``: per image and channel, shift/scale the output's mean and std to the reference's
  (mean and **unbiased** variance over H·W, ``std = sqrt(var + 1e-5)``), as released;
- ``wavelet``: StableSR's wavelet colour fix (an à-trous decomposition with a 3x3 B-spline kernel
  at dilations 1, 2, 4, 8, 16): the high frequencies come from the output, the lowest band from
  the reference, which is first MATLAB-bicubic upsampled to the output's size;
- ``none``: the output unchanged.

All functions take ``NCHW`` (or ``CHW``) tensors in [-1, 1]; content and style (the
LR-like reference) may differ in size but not in batch or channel count.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ldm.data.image_io import to_uint8 as image_to_uint8
from ldm.data.resize import imresize_torch

__all__ = [
    "COLOR_FIX_MODES",
    "adain_color_fix",
    "wavelet_color_fix",
    "wavelet_decomposition",
    "color_fix",
    "to_uint8",
    "to_uint8_official",
]

ColorFixMode = Literal["adain", "wavelet", "none"]
COLOR_FIX_MODES: tuple[str, ...] = ("adain", "wavelet", "none")

ADAIN_EPS = 1e-5


def _as_batch(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 3:
        return x[None], True
    if x.ndim == 4:
        return x, False
    raise ValueError(f"{name} must be NCHW or CHW, got shape {tuple(x.shape)}")


def _check_pair(content: torch.Tensor, style: torch.Tensor) -> None:
    if content.shape[:2] != style.shape[:2]:
        raise ValueError(
            "colour fix: content and style need the same batch size and channel count, got "
            f"content {tuple(content.shape)} and style {tuple(style.shape)}"
        )


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mean_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    mean = flat.mean(dim=2)[:, :, None, None]
    var = flat.var(dim=2, unbiased=True)[:, :, None, None]  # needs H·W >= 2
    return mean, (var + eps).sqrt()


def adain_color_fix(
    content: torch.Tensor, style: torch.Tensor, eps: float = ADAIN_EPS
) -> torch.Tensor:
    """AdaIN: ``(content - mean_c) / std_c * std_s + mean_s`` per image and channel.

    Statistics over H·W with the unbiased variance and ``std = sqrt(var + eps)`` (the released
    ``calc_mean_std``). Computed in float32 (float64 for float64 input), returned in
    ``content``'s dtype.
    """
    c, squeeze = _as_batch(content, "content")
    s, _ = _as_batch(style, "style")
    _check_pair(c, s)
    for name, t in (("content", c), ("style", s)):
        if t.shape[-1] * t.shape[-2] < 2:
            raise ValueError(f"adain_color_fix: {name} needs at least 2 pixels per channel")
    work = _work_dtype(c)
    c32, s32 = c.to(work), s.to(work)
    c_mean, c_std = _mean_std(c32, eps)
    s_mean, s_std = _mean_std(s32, eps)
    out = ((c32 - c_mean) / c_std * s_std + s_mean).to(content.dtype)
    return out[0] if squeeze else out


def _wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 B-spline blur ``[1,2,1]^T [1,2,1] / 16`` at ``dilation``, replicate padding."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device) / 4.0
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1], dilation=dilation)


def wavelet_decomposition(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """À-trous decomposition: ``(high, low)`` with ``high + low == x``.

    ``low`` is ``x`` blurred at dilations 1, 2, ..., 2**(levels-1); ``high`` the sum of the
    detail bands removed on the way.
    """
    if levels < 1:
        raise ValueError(f"wavelet_decomposition: levels must be >= 1, got {levels}")
    low = x
    for i in range(levels):
        low = _wavelet_blur(low, 2**i)
    return x - low, low


def wavelet_color_fix(content: torch.Tensor, style: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """StableSR's wavelet colour fix: high frequencies of ``content`` + low band of ``style``.

    ``style`` is MATLAB-bicubic resized to ``content``'s size first when the sizes differ
    (the SR pipeline passes the LR condition, which is smaller than the output).
    """
    c, squeeze = _as_batch(content, "content")
    s, _ = _as_batch(style, "style")
    _check_pair(c, s)
    work = _work_dtype(c)
    c, s = c.to(work), s.to(work)
    if s.shape[-2:] != c.shape[-2:]:
        s = imresize_torch(s, output_shape=tuple(c.shape[-2:]))
    high, _ = wavelet_decomposition(c, levels)
    _, low = wavelet_decomposition(s, levels)
    out = (high + low).to(content.dtype)
    return out[0] if squeeze else out


def color_fix(
    content: torch.Tensor, style: torch.Tensor, mode: ColorFixMode = "adain"
) -> torch.Tensor:
    """Dispatch on ``mode``: ``"adain"`` (released), ``"wavelet"`` or ``"none"``."""
    if mode == "adain":
        return adain_color_fix(content, style)
    if mode == "wavelet":
        return wavelet_color_fix(content, style)
    if mode == "none":
        return content
    raise ValueError(
        f"unknown colour-fix mode {mode!r}; choose one of {', '.join(COLOR_FIX_MODES)}"
    )


def to_uint8(x: torch.Tensor, rounding: Literal["round", "truncate"] = "round") -> torch.Tensor:
    """Map an image in [-1, 1] to uint8 ``[0, 255]`` (same layout, same device).

    ``v = 255 * clamp((x + 1) / 2, 0, 1)`` in float32, then ``rounding="round"`` (our default:
    nearest, half to even; the error is at most 0.5 grey level) or ``"truncate"`` (what the
    release does with ``.astype(np.uint8)``; biases every pixel down by 0.5 on average).
    """
    if rounding not in ("round", "truncate"):
        raise ValueError(f"to_uint8: rounding must be 'round' or 'truncate', got {rounding!r}")
    work = x.to(torch.float32) if x.dtype != torch.float32 else x
    if rounding == "round":  # the one rounding rule of ldm.data.image_io
        return image_to_uint8((work + 1.0) / 2.0)
    v = 255.0 * torch.clamp((work + 1.0) / 2.0, 0.0, 1.0)
    return v.to(torch.uint8)  # float -> uint8 truncates towards zero (values are >= 0)


def to_uint8_official(x: torch.Tensor) -> torch.Tensor:
    """The release's saving: ``(255 * clamp((x + 1) / 2, 0, 1)).astype(uint8)`` (truncation).

    Kept for bit-exact comparisons with released outputs; prefer :func:`to_uint8`.
    """
    return to_uint8(x, rounding="truncate")
