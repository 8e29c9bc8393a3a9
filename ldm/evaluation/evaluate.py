"""``evaluate(pred, ref, metrics)``: image-quality metrics over folders or tensors -> :class:`Report`."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.data.image_io import list_images, read_image
from ldm.evaluation import fid as fid_mod
from ldm.evaluation.io import match_folders
from ldm.evaluation.metrics import PyiqaMetric, check_available, metric_spec
from ldm.evaluation.report import Report

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("psnr", "ssim", "lpips")


def _progress(it, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total)


def evaluate(
    pred: str | os.PathLike | torch.Tensor | Sequence[str | os.PathLike],
    ref: str | os.PathLike | torch.Tensor | Sequence[str | os.PathLike] | None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    crop_border: int = 0,
    y_channel: bool = False,
    device: torch.device | str | None = None,
    weights_dir: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> Report:
    """Compute ``metrics`` for predictions against references.

    Args:
        pred: a folder of images, a list of image files, or a tensor ``[N, 3, H, W]`` in [0, 1].
        ref: the reference folder (images paired with ``pred`` by file name; a clear error lists
            unmatched names) or tensor; ``None`` when all metrics are no-reference.
        metrics: names (``psnr, ssim, lpips, lpips-vgg, dists, niqe, musiq, clipiqa, maniqa,
            fid`` or any pyiqa metric; ``fid`` compares the two sets as distributions).
        crop_border: pixels removed on each side before psnr/ssim.
        y_channel: psnr/ssim on the BT.601 Y channel instead of RGB.
        device: torch device (default cpu).
        weights_dir: offline metric weights folder (see :mod:`ldm.evaluation.metric_weights`).
        names: image names for tensor inputs (default ``"0", "1", ...``).

    Every metric's weights are checked before any image is read; a missing file raises
    :class:`~ldm.evaluation.metric_weights.MissingMetricWeights`. Returns a :class:`Report` with
    per-image rows, means and each metric's direction.
    """
    metrics = list(dict.fromkeys(metrics))
    specs = {m: metric_spec(m) for m in metrics}
    needs_ref = [m for m, s in specs.items() if s.kind in ("FR", "DIST")]
    if needs_ref and ref is None:
        raise ValueError(f"metrics {needs_ref} need a reference (ref=None was given)")
    tensors = isinstance(pred, torch.Tensor)
    if ref is not None and tensors != isinstance(ref, torch.Tensor):
        raise TypeError("give pred and ref both as folders/files or both as tensors")
    check_available(metrics, weights_dir)

    if tensors:
        if pred.ndim != 4 or (ref is not None and ref.shape != pred.shape):
            shape = None if ref is None else tuple(ref.shape)
            raise ValueError(
                f"want [N, 3, H, W] tensors of equal shape, got {tuple(pred.shape)} and {shape}"
            )
        names = list(names) if names is not None else [str(i) for i in range(pred.shape[0])]
        items = [
            (n, lambda i=i: pred[i], (lambda i=i: ref[i]) if ref is not None else None)
            for i, n in enumerate(names)
        ]
    elif isinstance(pred, list | tuple):  # explicit files, paired by position
        if ref is not None and len(ref) != len(pred):
            raise ValueError(f"{len(pred)} prediction files but {len(ref)} reference files")
        refs = list(ref) if ref is not None else [None] * len(pred)
        pairs = [(Path(p), None if r is None else Path(r)) for p, r in zip(pred, refs, strict=True)]
    else:
        pairs = (
            match_folders(pred, ref) if ref is not None else [(p, None) for p in list_images(pred)]
        )
    if not tensors:
        items = [
            (
                p.name,
                lambda p=p: read_image(p),
                (lambda r=r: read_image(r)) if r is not None else None,
            )
            for p, r in pairs
        ]

    per_image = [m for m in metrics if specs[m].kind != "DIST"]
    notes: list[str] = []
    built = {
        m: PyiqaMetric(
            m, device=device, crop_border=crop_border, y_channel=y_channel, weights_dir=weights_dir
        )
        for m in per_image
    }
    rows = []
    gray_refs: list[str] = []
    for name, load_pred, load_ref in _progress(items, progress, "evaluate", len(items)):
        x = load_pred()[None]
        y = load_ref()[None] if load_ref is not None else None
        if y is not None and x.shape != y.shape:
            raise ValueError(
                f"{name}: prediction {tuple(x.shape[1:])} and reference {tuple(y.shape[1:])} differ in size"
            )
        if y is not None and _is_gray(y[0]) and not _is_gray(x[0]):
            gray_refs.append(name)
        row = {"image": name}
        for m, metric in built.items():
            row[m] = float(metric(x, y if specs[m].kind == "FR" else None)[0])
        rows.append(row)

    if gray_refs:
        notes.append(
            f"{len(gray_refs)} reference image(s) are grayscale but the predictions are colour "
            f"({', '.join(gray_refs[:3])}{', ...' if len(gray_refs) > 3 else ''}): the metrics "
            "compare colour with gray; use colour references or grayscale predictions"
        )
        log.warning(notes[-1])
    summary = {m: sum(r[m] for r in rows) / len(rows) for m in per_image} if rows else {}
    for m in metrics:
        if specs[m].kind != "DIST":
            continue
        if len(items) < 2:  # a distribution needs two samples: say so, keep the other metrics
            summary[m] = float("nan")
            notes.append(f"{m} not computed: it compares two sets of images and needs at "
                         f"least 2 per side, got {len(items)}")  # fmt: skip
            log.warning(notes[-1])
        elif tensors:
            summary[m] = fid_mod.fid_tensors(pred, ref, device=device, weights_dir=weights_dir)
        else:
            summary[m] = _folder_fid(pairs, device=device, weights_dir=weights_dir)
    return Report(
        metrics=metrics,
        directions={m: s.direction for m, s in specs.items()},
        rows=rows,
        summary=summary,
        options={"crop_border": crop_border, "y_channel": y_channel, "num_images": len(rows)},
        notes=notes,
    )


def _is_gray(img: torch.Tensor) -> bool:
    """``[3, H, W]`` with three equal channels (a grayscale file read as RGB)."""
    return bool(torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]))


def _folder_fid(pairs, *, device, weights_dir) -> float:
    """FID over the paired files (pyiqa's FID reads folders: link the files into temp folders)."""
    pf, rf = [p for p, _ in pairs], [r for _, r in pairs]
    with tempfile.TemporaryDirectory(prefix="moesr_fid_") as tmp:
        dirs = Path(tmp, "pred"), Path(tmp, "ref")
        for d, files in zip(dirs, (pf, rf), strict=True):
            d.mkdir()
            for i, f in enumerate(files):
                os.symlink(f.resolve(), d / f"{i:06d}{f.suffix}")
        return fid_mod.fid_pyiqa(*dirs, device=device, weights_dir=weights_dir)
