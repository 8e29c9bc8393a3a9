"""Evaluation reports: per-image rows, a mean summary, metric directions; CSV/JSON/markdown writers."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ldm.atomic import atomic_write, write_text


@dataclass
class Report:
    """Result of :func:`ldm.evaluation.evaluate`.

    ``rows``: one dict per image (``{"image": name, <metric>: value, ...}``) for the per-image
    metrics; ``summary``: the mean of each per-image metric and the value of each distribution
    metric (fid); ``directions``: ``"lower"`` or ``"higher"`` (is better) per metric;
    ``options``: how it was computed (crop border, Y channel, protocol...); ``notes``: free text.
    """

    metrics: list[str]
    directions: dict[str, str]
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _atomic_write_text(text: str, path: Path) -> None:
    write_text(path, text)


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Per-image rows as CSV (columns: union of keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt_csv(row.get(k)) for k in columns})


def _fmt_csv(v):
    return f"{v:.6f}" if isinstance(v, float) else ("" if v is None else v)


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows written by :func:`write_csv` (numbers back to float where they parse)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        parsed = {}
        for k, v in row.items():
            try:
                parsed[k] = float(v) if k not in ("image", "model") else v
            except ValueError:
                parsed[k] = v
        out.append(parsed)
    return out


def write_json(obj, path: str | os.PathLike) -> None:
    """JSON (a :class:`Report` or plain data), NaN written as null."""
    if isinstance(obj, Report):
        obj = obj.to_dict()
    _atomic_write_text(json.dumps(_nan_to_none(obj), indent=2) + "\n", Path(path))


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


_DIGITS = {
    "psnr": 2,
    "ssim": 4,
    "lpips": 4,
    "lpips-vgg": 4,
    "dists": 4,
    "fid": 2,
}


def markdown_table(
    summaries: dict[str, dict[str, float]], metrics: list[str], directions: dict[str, str]
) -> str:
    """``| Model | psnr | ssim | lpips | fid |`` with one row per model (arrows give directions)."""
    arrow = {"higher": "↑", "lower": "↓"}
    head = (
        "| Model | "
        + " | ".join(f"{m} {arrow.get(directions.get(m, ''), '')}".strip() for m in metrics)
        + " |"
    )
    sep = "|---|" + "|".join("---:" for _ in metrics) + "|"
    lines = [head, sep]
    for model, summary in summaries.items():
        cells = []
        for m in metrics:
            v = summary.get(m)
            cells.append(
                "n/a"
                if v is None or (isinstance(v, float) and math.isnan(v))
                else f"{v:.{_DIGITS.get(m, 4)}f}"
            )
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(text: str, path: str | os.PathLike) -> None:
    _atomic_write_text(text, Path(path))
