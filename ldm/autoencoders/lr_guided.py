"""Reconstruction with an LR-guided decoder (the VQ-f4 FA-VAE) at any image size.

The VQ-f4 FA-VAE decoder fuses encoder features of the LR image upsampled x8 (the release's
``load_img``: MATLAB bicubic, 8-bit) with the latent of the HR image. Such models are found by
duck typing: a callable ``lr_features`` attribute and ``forward(x, lr_up=...)`` (``ldm`` does not
import ``fa_vae``).

Any size: the HR image is reflect-padded to a multiple of ``lcm(factor, downsample_factor)``
and the LR image correspondingly to a multiple of that ``/ factor``, so the upsampled LR stays
pixel-aligned with the padded HR; the result is cropped back. Without an LR image, the LR is
made from the (padded) HR by MATLAB bicubic x1/``factor``, as the COCO reconstruction protocol
of :mod:`ldm.evaluation.reconstruction` does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm.autoencoders.reconstruct import pad_to_multiple
from ldm.data.image_io import to_uint8_hwc

LR_FACTOR = 8


def needs_lr_input(model: nn.Module) -> bool:
    """True for models whose decoder takes LR features (a callable ``lr_features``)."""
    return callable(getattr(model, "lr_features", None))


def lr_from_hr(x: torch.Tensor, factor: int = LR_FACTOR) -> torch.Tensor:
    """MATLAB bicubic x1/``factor`` of ``x`` ``[3, H, W]`` in [0, 1] (8-bit, as an image file).

    Returns ``[3, ceil(H / factor), ceil(W / factor)]`` in [0, 1].
    """
    from ldm.data.resize import imresize

    u8 = to_uint8_hwc(x)
    lr = imresize(u8, scale=1 / factor)
    return torch.from_numpy(lr).permute(2, 0, 1).to(torch.float32) / 255


def check_lr_size(hr_hw: tuple[int, int], lr_hw: tuple[int, int], factor: int = LR_FACTOR) -> None:
    """Raise ``ValueError`` unless the LR is exactly 1/``factor`` of the HR size."""
    if (lr_hw[0] * factor, lr_hw[1] * factor) != tuple(hr_hw):
        raise ValueError(
            f"LR image is {lr_hw[0]}x{lr_hw[1]} (HxW) but the HR image is {hr_hw[0]}x{hr_hw[1]}: "
            f"the LR must be exactly 1/{factor} of the HR size "
            f"({hr_hw[0] / factor:g}x{hr_hw[1] / factor:g}); or let the LR be made from the HR "
            "(--lr-from-hr; lr=None in Python)"
        )


@torch.no_grad()
def reconstruct_image_with_lr(
    model: nn.Module,
    x: torch.Tensor,
    lr: torch.Tensor | None = None,
    *,
    factor: int = LR_FACTOR,
) -> torch.Tensor:
    """Reconstruction of ``x`` (``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1]) guided by ``lr``.

    ``lr``: ``[3, H/factor, W/factor]`` (or batched) in [0, 1], exactly 1/``factor`` of ``x``;
    ``None`` makes it from ``x`` (padded first, so any ``H, W``) by MATLAB bicubic. The model
    is called as ``model(x, lr_up=lr_up)`` in [-1, 1]; the result is in [0, 1], size of ``x``.
    """
    from ldm.data.sr_inputs import make_sr_inputs

    single = x.ndim == 3
    if single:
        x = x[None]
        lr = None if lr is None else lr[None]
    if lr is not None:
        if lr.ndim != 4 or lr.shape[0] != x.shape[0] or lr.shape[1] != x.shape[1]:
            raise ValueError(
                f"LR shape {tuple(lr.shape)} does not match the HR batch {tuple(x.shape)}"
            )
        check_lr_size(tuple(x.shape[-2:]), tuple(lr.shape[-2:]), factor)
    param = next(model.parameters())
    multiple = math.lcm(factor, int(model.downsample_factor))
    x_pad, (h, w) = pad_to_multiple(x.float().cpu(), multiple)
    if lr is None:
        lr_pad = [lr_from_hr(img, factor) for img in x_pad]
    else:
        lr_pad = list(pad_to_multiple(lr.float().cpu(), multiple // factor)[0])
    lr_up = torch.cat([make_sr_inputs(img, factor).vae_enc_input_x8 for img in lr_pad])
    assert lr_up.shape == x_pad.shape, (lr_up.shape, x_pad.shape)
    y = model(
        x_pad.to(param.device, param.dtype) * 2 - 1, lr_up=lr_up.to(param.device, param.dtype)
    )
    y = ((y[..., :h, :w].float() + 1) / 2).clamp_(0, 1)
    return y[0] if single else y
