"""Pictures the page shows next to the SR result: LR nearest, LR bicubic, the sampling preview."""

from __future__ import annotations

import numpy as np
import torch

from ldm.data.image_io import to_uint8_hwc
from ldm.data.resize import imresize_np
from moe_sr.pipeline import LATENT_PER_LR, SCALE


def nearest_x8(lr_u8: np.ndarray) -> np.ndarray:
    """The LR pixels as blocks at output size (uint8 ``HWC``)."""
    return np.repeat(np.repeat(lr_u8, SCALE, axis=0), SCALE, axis=1)


def bicubic_x8(lr_u8: np.ndarray) -> np.ndarray:
    """MATLAB bicubic x8 (uint8 ``HWC``), the resize the pipeline conditions its decoder on."""
    h, w = lr_u8.shape[:2]
    return imresize_np(lr_u8, output_shape=(SCALE * h, SCALE * w))


def latent_preview(pred_x0: torch.Tensor, lr_h: int, lr_w: int) -> np.ndarray:
    """The sampler's current prediction of the clean latent, as an RGB picture at output size.

    Decoding it with the FA-VAE would cost as much as the final decode at every preview, so the
    latent itself is shown: its first three channels (the vq-f4 latent is 3 channels and looks
    like a colour-shifted small image), each stretched to [0, 255], blocks of
    ``SCALE / LATENT_PER_LR`` pixels. A cheap look at where sampling is going, not a result.
    """
    z = pred_x0.detach()[0, :, : LATENT_PER_LR * lr_h, : LATENT_PER_LR * lr_w].float().cpu()
    if z.shape[0] < 3:
        z = z.mean(0, keepdim=True).expand(3, -1, -1)
    z = z[:3]
    lo = z.amin(dim=(1, 2), keepdim=True)
    hi = z.amax(dim=(1, 2), keepdim=True)
    z = (z - lo) / (hi - lo).clamp_min(1e-6)
    img = to_uint8_hwc(z)
    block = SCALE // LATENT_PER_LR
    return np.repeat(np.repeat(img, block, axis=0), block, axis=1)
