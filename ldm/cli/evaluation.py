"""Options, logging and the exit-status wrapper shared by the evaluation commands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.evaluation import metric_weights as W

log = logging.getLogger(__name__)


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights-dir", default=None, metavar="DIR",
        help=f"offline metric weights folder (default ${W.ENV_VAR} or {W.DEFAULT_DIR})",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def evaluate_folders(sr: dict[str, Path], hr: str | Path, out: str | Path, **options) -> int:
    """:func:`ldm.evaluation.sr_folders.evaluate_sr_folders` for a command: the table on
    stdout, bad input as one ``error:`` line on stderr; returns the exit status (0, or 2)."""
    from ldm.cli.outputs import check_output_dir
    from ldm.data.image_io import ImageReadError
    from ldm.evaluation.sr_folders import evaluate_sr_folders

    try:
        check_output_dir(out, flag="--out")
        table = evaluate_sr_folders(sr, hr, out, **options)
    except (
        W.MissingMetricWeights, ValueError, FileNotFoundError, NotADirectoryError, ImageReadError
    ) as err:  # fmt: skip
        sys.stderr.write(f"error: {err}\n")
        return 2
    out = Path(out)
    sys.stdout.write(table)
    sys.stdout.write(f"wrote {out / 'per_image.csv'}, {out / 'summary.json'}, {out / 'table.md'}\n")
    return 0


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
