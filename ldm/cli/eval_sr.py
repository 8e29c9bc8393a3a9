"""``moe-sr-eval-sr`` / ``scripts/eval_sr.py``: metrics of SR results against HR references.

    python scripts/eval_sr.py --hr DIV2K_valid_HR --sr ours=results/ours --sr bicubic=results/bic \\
        --metrics psnr,ssim,lpips --y-channel --crop-border 8 --out runs/eval_sr

Images are paired by file name (stem: ``0801.png`` pairs with ``0801.jpg``); names without a
partner are listed in the error. Running the SR pipeline first belongs to the moe_sr package
(``ldm`` does not import it): ``moe-sr-eval`` (``moe_sr/cli/eval_pipeline.py``) does both.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.cli.evaluation import add_common_options, evaluate_folders, setup_logging
from ldm.cli.messages import interruptible
from ldm.evaluation.sr_folders import parse_named_folders

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-eval-sr",
        description="Compare SR outputs with HR references (paired by file name). Writes "
        "per_image.csv, summary.json and table.md, one row per --sr folder.",
    )
    p.add_argument("--hr", required=True, help="folder of HR reference images")
    p.add_argument(
        "--sr", action="append", required=True, metavar="[NAME=]DIR",
        help="folder of SR results (repeat for several methods; NAME defaults to the folder name)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--metrics", default=None,
        help="comma-separated metrics: psnr, ssim, lpips, lpips-vgg, dists, niqe, musiq, clipiqa, "
        "maniqa, fid, ... (default psnr,ssim,lpips,fid; fid is dropped with a note when its "
        "Inception weights are missing)",
    )  # fmt: skip
    p.add_argument("--crop-border", type=int, default=0, help="pixels cropped for psnr/ssim")
    p.add_argument("--y-channel", action="store_true", help="psnr/ssim on the BT.601 Y channel")
    add_common_options(p)
    return p


@interruptible("moe-sr-eval-sr")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        sr = parse_named_folders(args.sr)
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return evaluate_folders(
        sr,
        args.hr,
        args.out,
        metrics=args.metrics,
        crop_border=args.crop_border,
        y_channel=args.y_channel,
        device=args.device,
        weights_dir=args.weights_dir,
        progress=not args.no_progress,
    )
