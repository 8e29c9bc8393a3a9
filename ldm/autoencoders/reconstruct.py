"""Encode -> decode an image of any size with a first-stage model.

The image is padded by reflection to a multiple of the model's down-sampling
factor, reconstructed, and cropped back, so any ``H x W`` works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad ``x`` ``[B, C, H, W]`` on the right/bottom to multiples of ``multiple``.

    Returns the padded tensor and the original ``(H, W)``. Sides shorter than the
    padding fall back to replicate padding (reflection needs ``pad < size``).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


@torch.no_grad()
def reconstruct_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction of ``x`` (``[B, 3, H, W]`` or ``[3, H, W]`` in ``[0, 1]``) in ``[0, 1]``.

    The model works in ``[-1, 1]``: ``x`` is mapped there, encoded (VQ: quantised;
    KL: posterior mean), decoded, mapped back and clamped. Any ``H, W``.
    """
    single = x.ndim == 3
    if single:
        x = x[None]
    param = next(model.parameters())
    x = x.to(device=param.device, dtype=param.dtype) * 2.0 - 1.0
    x_pad, (h, w) = pad_to_multiple(x, model.downsample_factor)
    y = model.decode(model.encode_latent(x_pad))[..., :h, :w]  # KL: posterior mean
    y = ((y + 1.0) / 2.0).clamp_(0.0, 1.0)
    return y[0] if single else y
