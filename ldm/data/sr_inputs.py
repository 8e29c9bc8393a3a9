"""The two conditioning tensors of the 8x SR model, built exactly like the release.

``sr_val_ddim_moe.py:load_img(path, factor=8, return_upscale=True)`` reads the LR image as
uint8 and returns:

1. ``cond_x2``: ``imresize(lr_u8, output_shape=(2h, 2w))`` (uint8 path, rounding after each
   1-D pass) ``/ 255 * 2 - 1``: the UNet's concat condition at latent size (vq-f4 latent of an
   8x output = 2x the LR). For another ``factor`` the release uses the LR image itself.
2. ``vae_enc_input``: ``imresize(lr_u8, output_shape=(8h, 8w))`` ``/ 255 * 2 - 1``: the FA-VAE
   encoder input at output size, whose features feed the decoder's skip fusion.

Both resizes start from the uint8 LR image (not from each other). The release reads BGR with
OpenCV and swaps to RGB afterwards; the resize acts per channel, so starting from RGB is the same.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ldm.data.image_io import to_uint8
from ldm.data.resize import imresize_np

__all__ = [
    "SRInputs",
    "condition_x2",
    "encoder_input",
    "lr_to_uint8_hwc",
    "make_sr_inputs",
    "uint8_to_signed",
    "upscaled_crop",
]

#: LR pixels of context around a crop: the bicubic taps of an upscaled pixel reach at most 3
#: LR pixels from it (kernel width 4, ``floor(u - 2)`` .. ``+5``), so 4 make every kept pixel exact
CROP_MARGIN = 4


class SRInputs(NamedTuple):
    """``cond_x2`` [1,3,2h,2w] (or the LR itself when factor != 8) and ``vae_enc_input_x8``."""

    cond_x2: torch.Tensor
    vae_enc_input_x8: torch.Tensor


def lr_to_uint8_hwc(lr: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bring an LR image to a uint8 ``HWC`` RGB numpy array.

    numpy arrays are ``HWC`` (or ``HW``), tensors ``CHW`` (or ``1CHW``); uint8 values are used
    as they are, float values in [0, 1] (what ``ldm.data.image_io.read_image`` returns) are
    rounded to the nearest uint8 level (lossless for images that were 8-bit on disk).
    """
    if isinstance(lr, torch.Tensor):
        t = lr.detach().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"make_sr_inputs takes one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim != 3:
            raise ValueError(f"LR tensor must be CHW or 1CHW, got shape {tuple(t.shape)}")
        t = t.permute(1, 2, 0)
        arr = t.numpy() if t.dtype == torch.uint8 else t.to(torch.float64).numpy()
    elif isinstance(lr, np.ndarray):
        arr = lr
    else:
        raise TypeError(f"LR image must be a numpy array or torch tensor, got {type(lr).__name__}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"LR image must be HWC with 1 or 3 channels, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"LR image must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise ValueError(
            f"float LR image must be in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}]; "
            "pass uint8 values or divide by 255"
        )
    return to_uint8(arr)


def uint8_to_signed(img_u8: np.ndarray) -> torch.Tensor:
    """uint8 ``HWC`` -> float32 ``1CHW`` in [-1, 1] (``x / 255 * 2 - 1``, as ``load_img``)."""
    t = torch.from_numpy(np.ascontiguousarray(img_u8)).permute(2, 0, 1).to(torch.float32)
    return (2.0 * (t / 255.0) - 1.0)[None]


def condition_x2(lr_u8: np.ndarray) -> torch.Tensor:
    """The UNet's concat condition ``[1,3,2h,2w]``: MATLAB bicubic x2 of the uint8 LR image."""
    h, w = lr_u8.shape[:2]
    return uint8_to_signed(imresize_np(lr_u8, output_shape=(2 * h, 2 * w)))


def encoder_input(lr_u8: np.ndarray, factor: int = 8) -> torch.Tensor:
    """The FA-VAE encoder input ``[1,3,factor*h,factor*w]``: MATLAB bicubic x``factor``."""
    h, w = lr_u8.shape[:2]
    return uint8_to_signed(imresize_np(lr_u8, output_shape=(h * factor, w * factor)))


def make_sr_inputs(lr: np.ndarray | torch.Tensor, factor: int = 8) -> SRInputs:
    """The release's ``load_img(..., factor, return_upscale=True)`` from an in-memory LR image.

    Returns float32 tensors on the CPU in [-1, 1]: ``cond_x2`` ``[1,3,2h,2w]`` (for
    ``factor == 8``; the LR at its own size otherwise, as released) and ``vae_enc_input_x8``
    ``[1,3,factor*h,factor*w]``.
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    lr_u8 = lr_to_uint8_hwc(lr)
    cond = condition_x2(lr_u8) if factor == 8 else uint8_to_signed(lr_u8)
    return SRInputs(cond_x2=cond, vae_enc_input_x8=encoder_input(lr_u8, factor))


def upscaled_crop(
    lr_u8: np.ndarray, box: tuple[int, int, int, int], factor: int = 8
) -> torch.Tensor:
    """Rows ``y0:y1`` and columns ``x0:x1`` (output pixels) of the release's x``factor``
    encoder input (``make_sr_inputs(lr_u8).vae_enc_input_x8``), made from an LR crop only.

    Bit for bit the same values: for an integer scale each output pixel's bicubic weights
    depend only on its phase, its taps stay within :data:`CROP_MARGIN` LR pixels (a crop edge
    inside the image gets that margin; an edge at the image border mirrors like the full
    resize), and each 1-D pass rounds per pixel. So a large image's encoder input can be made
    tile by tile and never held whole (64x the LR pixels in float32).
    """
    h, w = lr_u8.shape[:2]
    y0, y1, x0, x1 = box
    if not (0 <= y0 < y1 <= h * factor and 0 <= x0 < x1 <= w * factor):
        raise ValueError(f"crop {box} outside the x{factor} image of {h}x{w}")
    ly0, lx0 = max(0, y0 // factor - CROP_MARGIN), max(0, x0 // factor - CROP_MARGIN)
    ly1 = min(h, -(-y1 // factor) + CROP_MARGIN)
    lx1 = min(w, -(-x1 // factor) + CROP_MARGIN)
    crop = np.ascontiguousarray(lr_u8[ly0:ly1, lx0:lx1])
    up = imresize_np(crop, output_shape=((ly1 - ly0) * factor, (lx1 - lx0) * factor))
    oy, ox = ly0 * factor, lx0 * factor
    return uint8_to_signed(up[y0 - oy : y1 - oy, x0 - ox : x1 - ox])
