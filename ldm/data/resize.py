"""MATLAB-style bicubic ``imresize`` for numpy images and torch tensors.

This is the resize the official 8x SR code uses everywhere (``load_img`` builds the UNet
condition and the FA-VAE encoder input with it, and the training LR images are made with it):
MATLAB's ``imresize(img, ..., 'bicubic')``:

- Keys cubic kernel with ``a = -0.5``;
- the output pixel ``x`` (1-based) samples the input at ``u = x / s + (1 - 1 / s) / 2``;
- when downscaling (``s < 1``) the kernel is stretched to ``k(s * d) * s`` and its support
  to ``4 / s`` input pixels (antialiasing);
- the weights of each output pixel are normalised to sum to 1;
- out-of-range taps are mirrored symmetrically, with the edge pixel repeated
  (``-1 -> 0``, ``n -> n - 1``);
- the image is resized one axis at a time, the axis with the smaller scale first (ties: H
  first);
- for unsigned-integer images (uint8) each 1-D pass ends with clip + round-half-to-even back to
  the integer type, so the result is NOT ``round(resize(float(img)))`` for some pixels. The
  fixture ``resize_and_colorfix`` pins this down.

Two implementations share one set of weights:

- :func:`imresize_np` for ``HWC`` / ``HW`` numpy arrays (float or unsigned integer). It
  accumulates the taps of every output pixel in float64 in kernel order, exactly like the
  reference implementation, so uint8 results match bit for bit.
- :func:`imresize_torch` for ``NCHW`` / ``CHW`` tensors (any device; batched). Each pass is one
  matmul with a dense ``[out, in]`` resampling matrix (mirrored taps folded in).

:func:`imresize` dispatches on the input type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "cubic",
    "contributions",
    "resize_matrix",
    "resolve_size",
    "imresize",
    "imresize_np",
    "imresize_torch",
]

KERNEL_WIDTH = 4.0  # support of the bicubic kernel, in input pixels at scale 1
# numpy path: bound on the float64 tap buffer of one chunk (elements)
_MAX_CHUNK_ELEMENTS = 8_000_000

Scale = float | Sequence[float]


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB ``imresize``'s bicubic)."""
    ax = np.abs(np.asarray(x, dtype=np.float64))
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


@lru_cache(maxsize=128)
def _contributions_cached(
    in_len: int, out_len: int, scale: float, antialias: bool
) -> tuple[np.ndarray, np.ndarray]:
    stretch = antialias and scale < 1.0
    width = KERNEL_WIDTH / scale if stretch else KERNEL_WIDTH
    # positions (1-based, like MATLAB) of the output pixels in input coordinates
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx1 = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based tap indices
    dist = u[:, None] - idx1
    weights = scale * cubic(scale * dist) if stretch else cubic(dist)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # symmetric mirroring with the edge repeated: period 2n, [0..n-1, n-1..0]
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    indices = mirror[np.mod(idx1.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(weights != 0, axis=0)  # drop tap columns that are zero for every pixel
    weights = np.ascontiguousarray(weights[:, keep])
    indices = np.ascontiguousarray(indices[:, keep])
    weights.setflags(write=False)
    indices.setflags(write=False)
    return weights, indices


def contributions(
    in_len: int, out_len: int, scale: float, antialias: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``[out_len, P]`` (float64) and 0-based input indices ``[out_len, P]`` (int64).

    ``scale`` is ``out_len / in_len`` (or the user's scale); read-only arrays (cached).
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"imresize: lengths must be >= 1, got in={in_len}, out={out_len}")
    return _contributions_cached(int(in_len), int(out_len), float(scale), bool(antialias))


@lru_cache(maxsize=128)
def _resize_matrix_cached(in_len: int, out_len: int, scale: float, antialias: bool) -> np.ndarray:
    weights, indices = _contributions_cached(in_len, out_len, scale, antialias)
    matrix = np.zeros((out_len, in_len), dtype=np.float64)
    rows = np.repeat(np.arange(out_len), weights.shape[1])
    np.add.at(matrix, (rows, indices.reshape(-1)), weights.reshape(-1))
    matrix.setflags(write=False)
    return matrix


def resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """Dense 1-D resampling matrix ``[out_len, in_len]`` (float64, read-only): ``y = M @ x``."""
    contributions(in_len, out_len, scale, antialias)  # validates
    return _resize_matrix_cached(int(in_len), int(out_len), float(scale), bool(antialias))


def _ceil_size(scale: float, length: int) -> int:
    """``ceil(scale * length)`` as MATLAB, but immune to float noise (0.1 * 30 -> 3, not 4)."""
    value = scale * length
    nearest = round(value)
    if abs(value - nearest) <= 1e-9 * max(1.0, abs(value)):
        return int(nearest)
    return int(math.ceil(value))


def resolve_size(
    in_hw: tuple[int, int], scale: Scale | None, output_shape: Sequence[int] | None
) -> tuple[tuple[int, int], tuple[float, float]]:
    """Return ``((out_h, out_w), (scale_h, scale_w))`` from exactly one of scale / output_shape.

    With ``output_shape`` the per-axis scales are ``out / in`` (MATLAB and the official code).
    With ``scale`` (a number or an ``(sh, sw)`` pair) the size is ``ceil(scale * in)``.
    """
    if (scale is None) == (output_shape is None):
        raise ValueError("imresize: give exactly one of `scale` or `output_shape`")
    h, w = int(in_hw[0]), int(in_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"imresize: empty image of size {h}x{w}")
    if output_shape is not None:
        if len(output_shape) != 2:
            raise ValueError(f"imresize: output_shape must be (H, W), got {tuple(output_shape)}")
        oh, ow = (int(s) for s in output_shape)
        if oh < 1 or ow < 1:
            raise ValueError(f"imresize: output_shape must be positive, got {(oh, ow)}")
        return (oh, ow), (oh / h, ow / w)
    if isinstance(scale, (int, float)):
        sh = sw = float(scale)
    else:
        if len(scale) != 2:
            raise ValueError(f"imresize: scale must be a number or (sh, sw), got {scale!r}")
        sh, sw = float(scale[0]), float(scale[1])
    if not (sh > 0 and sw > 0 and math.isfinite(sh) and math.isfinite(sw)):
        raise ValueError(f"imresize: scale must be positive and finite, got {(sh, sw)}")
    return (_ceil_size(sh, h), _ceil_size(sw, w)), (sh, sw)


def _pass_order(scales: tuple[float, float]) -> tuple[int, int]:
    """Axis order of the 1-D passes: smaller scale first, ties -> H (axis 0) first."""
    return (0, 1) if scales[0] <= scales[1] else (1, 0)


# ----------------------------------------------------------------------------------- numpy


def _finish_pass(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.unsignedinteger):
        info = np.iinfo(dtype)
        return np.around(np.clip(out, info.min, info.max)).astype(dtype)
    return out


def _resize_axis_np(img: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray):
    """One 1-D pass along ``axis`` (0 = H, 1 = W) of an ``HWC`` array; float64 result."""
    out_len, taps = weights.shape
    other = img.shape[1 - axis] * img.shape[2]
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, taps * other))
    pieces = []
    for start in range(0, out_len, chunk):
        w = weights[start : start + chunk]
        ind = indices[start : start + chunk]
        if axis == 0:  # gathered: [o, P, W, C]
            gathered = img[ind].astype(np.float64)
            pieces.append(np.sum(w[:, :, None, None] * gathered, axis=1))
        else:  # gathered: [H, o, P, C]
            gathered = img[:, ind].astype(np.float64)
            pieces.append(np.sum(w[None, :, :, None] * gathered, axis=2))
    return np.concatenate(pieces, axis=axis)


def imresize_np(
    img: np.ndarray,
    scale: Scale | None = None,
    output_shape: Sequence[int] | None = None,
    *,
    antialias: bool = True,
) -> np.ndarray:
    """MATLAB bicubic resize of an ``HWC`` or ``HW`` numpy image.

    Unsigned-integer images (uint8, uint16) are clipped and rounded half-to-even to their type
    after each 1-D pass (as MATLAB and the official code) and returned in that type. Float
    images are computed in float64 and returned in their own float dtype.
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"imresize_np expects a numpy array, got {type(img).__name__}")
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize_np expects an HWC or HW image, got shape {img.shape}")
    dtype = img.dtype
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.unsignedinteger)):
        raise TypeError(f"imresize_np supports float and unsigned-integer images, got {dtype}")
    squeeze = img.ndim == 2
    x = img[:, :, None] if squeeze else img
    size, scales = resolve_size(x.shape[:2], scale, output_shape)
    for axis in _pass_order(scales):
        weights, indices = contributions(x.shape[axis], size[axis], scales[axis], antialias)
        x = _finish_pass(_resize_axis_np(x, axis, weights, indices), dtype)
    if np.issubdtype(dtype, np.floating):
        x = x.astype(dtype, copy=False)
    return x[:, :, 0] if squeeze else x


# ----------------------------------------------------------------------------------- torch

_INTEGER_RANGES = {torch.uint8: (0.0, 255.0)}


def imresize_torch(
    x: torch.Tensor,
    scale: Scale | None = None,
    output_shape: Sequence[int] | None = None,
    *,
    antialias: bool = True,
) -> torch.Tensor:
    """MATLAB bicubic resize of an ``NCHW`` or ``CHW`` tensor, on its own device.

    float32 / float64 are computed in their own precision; float16 / bfloat16 in float32 and
    cast back. ``uint8`` tensors are computed in float64 and clipped + rounded (half-to-even)
    after each pass, like :func:`imresize_np`. Differentiable for float inputs.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"imresize_torch expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4):
        raise ValueError(f"imresize_torch expects NCHW or CHW, got shape {tuple(x.shape)}")
    in_dtype = x.dtype
    if in_dtype in _INTEGER_RANGES:
        work_dtype = torch.float64
    elif in_dtype in (torch.float32, torch.float64):
        work_dtype = in_dtype
    elif in_dtype in (torch.float16, torch.bfloat16):
        work_dtype = torch.float32
    else:
        raise TypeError(f"imresize_torch supports float and uint8 tensors, got {in_dtype}")
    size, scales = resolve_size(tuple(x.shape[-2:]), scale, output_shape)
    y = x.to(work_dtype)
    for axis in _pass_order(scales):
        in_len = y.shape[-2 + axis]
        m = resize_matrix(in_len, size[axis], scales[axis], antialias)
        m = torch.from_numpy(np.array(m)).to(device=y.device, dtype=work_dtype)
        y = torch.matmul(m, y) if axis == 0 else torch.matmul(y, m.transpose(0, 1))
        if in_dtype in _INTEGER_RANGES:
            lo, hi = _INTEGER_RANGES[in_dtype]
            y = torch.round(y.clamp(lo, hi))  # torch.round: half to even, like np.around
    return y.to(in_dtype)


def imresize(
    img: np.ndarray | torch.Tensor,
    scale: Scale | None = None,
    output_shape: Sequence[int] | None = None,
    *,
    antialias: bool = True,
) -> np.ndarray | torch.Tensor:
    """MATLAB bicubic resize: numpy ``HWC``/``HW`` arrays or torch ``NCHW``/``CHW`` tensors.

    Give exactly one of ``scale`` (number or ``(sh, sw)``; size ``ceil(scale * in)``) or
    ``output_shape`` ``(H, W)``. See the module docstring for the exact algorithm.
    """
    if isinstance(img, torch.Tensor):
        return imresize_torch(img, scale, output_shape, antialias=antialias)
    if isinstance(img, np.ndarray):
        return imresize_np(img, scale, output_shape, antialias=antialias)
    raise TypeError(f"imresize expects a numpy array or a torch tensor, got {type(img).__name__}")
