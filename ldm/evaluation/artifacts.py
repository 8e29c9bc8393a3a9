"""Automated checks for the artifacts a person sees first in an SR result.

PSNR and LPIPS average over the image; these three look for specific failure modes:

* :func:`border_error_ratio`: error in a band along the image border relative to the interior
  (padding and tiling defects show up as a bright or dark frame);
* :func:`grid_peakiness`: spectral peaks at multiples of ``1/period`` cycles per pixel relative
  to their neighbouring frequencies, i.e. a periodic pattern at the latent grid (a decoder
  upsampling by 4 and a UNet downsampling twice more make checkerboards of period 4 and 8).
  Compare it with the same number for bicubic upsampling, which has its own (mild) peaks at
  the LR grid period;
* :func:`mean_delta_e`: CIEDE2000 colour difference of the low-passed images (colour shifts,
  not texture).

All take ``[3, H, W]`` float tensors in ``[0, 1]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _check(img: torch.Tensor, name: str) -> torch.Tensor:
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"{name} must be an RGB image [3, H, W], got {tuple(img.shape)}")
    return img.detach().float().cpu()


def border_error_ratio(pred: torch.Tensor, ref: torch.Tensor, border: int = 16) -> float:
    """Mean absolute error within ``border`` pixels of the edge / mean absolute error inside.

    1.0: the border is as good as the interior; above: a frame of worse pixels.
    """
    pred, ref = _check(pred, "pred"), _check(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and ref {tuple(ref.shape)} differ in size")
    h, w = pred.shape[-2:]
    if min(h, w) <= 4 * border:
        raise ValueError(f"image {h}x{w} too small for a border of {border} px")
    err = (pred - ref).abs().mean(0)
    inner = torch.zeros_like(err, dtype=torch.bool)
    inner[border:-border, border:-border] = True
    return float(err[~inner].mean() / err[inner].mean().clamp_min(1e-12))


def _luma(img: torch.Tensor) -> np.ndarray:
    r, g, b = img.double().numpy()
    return 0.299 * r + 0.587 * g + 0.114 * b


def grid_peakiness(img: torch.Tensor, periods: tuple[int, ...] = (4, 8)) -> float:
    """Mean ratio of the power at the grid frequencies ``(k/p, l/p)`` cycles per pixel (every
    ``p`` in ``periods``, ``(k, l) != (0, 0)``) to the median power of the surrounding 7x7
    frequency bins (themselves excluded). ~1 for a natural image; a periodic pattern of period
    ``p`` gives values well above 1.
    """
    img = _check(img, "img")
    y = _luma(img)
    h, w = y.shape
    y = (y - y.mean()) * np.outer(np.hanning(h), np.hanning(w))  # no edge leakage lines
    power = np.abs(np.fft.fft2(y)) ** 2
    ratios = []
    seen = set()
    for p in periods:
        for k in range(p):
            for m in range(p):
                if (k, m) == (0, 0):
                    continue
                fy, fx = round(k * h / p) % h, round(m * w / p) % w
                if (fy, fx) in seen:
                    continue
                seen.add((fy, fx))
                ys = [(fy + d) % h for d in range(-3, 4)]
                xs = [(fx + d) % w for d in range(-3, 4)]
                block = power[np.ix_(ys, xs)].copy()
                peak = block[3, 3]
                block[3, 3] = np.nan
                ratios.append(peak / max(np.nanmedian(block), 1e-30))
    return float(np.mean(ratios))


def mean_delta_e(pred: torch.Tensor, ref: torch.Tensor, sigma: float = 4.0) -> float:
    """Mean CIEDE2000 between the two images after a Gaussian blur of ``sigma`` pixels (their
    colours, not their textures). Below ~2 is hard to see; a cast shows up as 5 and more."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    pred, ref = _check(pred, "pred"), _check(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and ref {tuple(ref.shape)} differ in size")
    both = _blur(torch.stack([pred, ref]), sigma).clamp(0, 1)
    lab = [rgb2lab(t.permute(1, 2, 0).double().numpy()) for t in both]
    return float(np.mean(deltaE_ciede2000(lab[0], lab[1])))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
