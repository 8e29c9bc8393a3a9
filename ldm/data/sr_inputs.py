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

from ldm.data.resize import imresize_np

__all__ = ["SRInputs", "lr_to_uint8_hwc", "make_sr_inputs", "uint8_to_signed"]


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
    return np.around(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def uint8_to_signed(img_u8: np.ndarray) -> torch.Tensor:
    """uint8 ``HWC`` -> float32 ``1CHW`` in [-1, 1] (``x / 255 * 2 - 1``, as ``load_img``)."""
    t = torch.from_numpy(np.ascontiguousarray(img_u8)).permute(2, 0, 1).to(torch.float32)
    return (2.0 * (t / 255.0) - 1.0)[None]


def make_sr_inputs(lr: np.ndarray | torch.Tensor, factor: int = 8) -> SRInputs:
    """The release's ``load_img(..., factor, return_upscale=True)`` from an in-memory LR image.

    Returns float32 tensors on the CPU in [-1, 1]: ``cond_x2`` ``[1,3,2h,2w]`` (for
    ``factor == 8``; the LR at its own size otherwise, as released) and ``vae_enc_input_x8``
    ``[1,3,factor*h,factor*w]``.
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    lr_u8 = lr_to_uint8_hwc(lr)
    h, w = lr_u8.shape[:2]
    enc = imresize_np(lr_u8, output_shape=(h * factor, w * factor))
    cond = imresize_np(lr_u8, output_shape=(2 * h, 2 * w)) if factor == 8 else lr_u8
    return SRInputs(cond_x2=uint8_to_signed(cond), vae_enc_input_x8=uint8_to_signed(enc))
