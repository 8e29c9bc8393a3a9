"""``moe-sr-eval``: run the SR pipeline on an LR folder, then score the outputs against HR.

One command for "outputs and metrics" (issue: SR evaluation, ``--run-pipeline``)::

    moe-sr-eval --lr DIV2K_valid_LR_x8 --hr DIV2K_valid_HR --out runs/div2k \\
        --weights-dir release_st/ --device cuda --metrics psnr,ssim,lpips --y-channel

SR outputs go to ``OUT/sr`` (``--sr-dir``), keep the LR file names and are skipped when they
exist (``--overwrite`` redoes them), so an interrupted run resumes. The metrics and the report
files (per_image.csv, summary.json, table.md in ``OUT``) are those of ``moe-sr-eval-sr``
(:func:`ldm.evaluation.sr_folders.evaluate_sr_folders`); ``--compare NAME=DIR`` adds rows for other SR
folders (e.g. bicubic) in the same table. The pipeline options are those of ``moe-sr``.
Under ``torchrun`` the SR generation is sharded over the processes (``moe_sr.distributed``) and
the metrics are computed once, on rank 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.cli.messages import DefaultsHelpFormatter, interruptible, stderr_line
from moe_sr.cli.sr import add_pipeline_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-eval",
        description="8x SR of a folder of LR images with SS-MoE + FA-VAE, then metrics against "
        "the HR references (paired by file name).",
        formatter_class=DefaultsHelpFormatter,
    )
    io = p.add_argument_group("data and outputs")
    io.add_argument("--lr", required=True, help="folder of LR images (the pipeline input)")
    io.add_argument("--hr", required=True, help="folder of HR references (same file names)")
    io.add_argument("--out", required=True, help="folder of the reports (and of OUT/sr)")
    io.add_argument("--sr-dir", help="folder of the SR outputs (default: OUT/sr)")
    io.add_argument("--name", default="moe_sr", help="row name of the pipeline in the table")
    io.add_argument(
        "--compare", action="append", default=[], metavar="[NAME=]DIR",
        help="another SR folder scored in the same table (repeatable)",
    )  # fmt: skip
    io.add_argument("--overwrite", action="store_true", help="redo existing SR outputs")
    io.add_argument("--quiet", action="store_true", help="no progress bars")
    io.add_argument("--dry-run", action="store_true", help="print the SR plan, run nothing")

    m = p.add_argument_group("metrics (as moe-sr-eval-sr)")
    m.add_argument(
        "--metrics", default=None,
        help="comma-separated metrics (default psnr,ssim,lpips,fid; fid is dropped with a note "
        "when its Inception weights are missing)",
    )  # fmt: skip
    m.add_argument("--crop-border", type=int, default=0, help="pixels cropped for psnr/ssim")
    m.add_argument("--y-channel", action="store_true", help="psnr/ssim on the BT.601 Y channel")
    m.add_argument("--metric-weights-dir", metavar="DIR", help="offline metric weights folder")
    m.add_argument("--metric-device", help="device of the metrics (default: --device, else cpu)")
    add_pipeline_options(p)
    return p


@interruptible("moe-sr-eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from ldm.cli.evaluation import evaluate_folders
    from ldm.cli.outputs import check_output_dir
    from ldm.evaluation import MissingMetricWeights
    from ldm.evaluation.io import check_lr_hr_pairs
    from ldm.evaluation.metrics import check_available
    from ldm.evaluation.sr_folders import DEFAULT_METRICS, parse_named_folders, select_metrics
    from moe_sr.cli.sr import run as run_sr
    from moe_sr.distributed import Shard
    from moe_sr.pipeline import SCALE

    for flag, folder in (("--lr", args.lr), ("--hr", args.hr)):
        if not Path(folder).is_dir():
            stderr_line(f"moe-sr-eval: {flag} {folder}: no such folder")
            return 2
    try:
        compare = parse_named_folders(args.compare)
    except ValueError as err:
        stderr_line(f"moe-sr-eval: {err}")
        return 2
    if args.name in compare:
        stderr_line(f"moe-sr-eval: --compare {args.name}=... clashes with --name {args.name}")
        return 2
    try:  # what would fail after the SR run fails before it
        check_lr_hr_pairs(args.lr, args.hr, SCALE)
        metrics, _ = select_metrics(args.metrics, DEFAULT_METRICS, args.metric_weights_dir)
        check_available(metrics, args.metric_weights_dir)
        check_output_dir(args.out, flag="--out")
    except (MissingMetricWeights, ValueError) as err:
        stderr_line(f"moe-sr-eval: {err}")
        return 2
    sr_dir = Path(args.sr_dir) if args.sr_dir else Path(args.out) / "sr"
    sr_args = argparse.Namespace(
        **vars(args), input=[args.lr], output=str(sr_dir), save_latents=False, format="png"
    )
    rc = run_sr(sr_args)  # under torchrun: this rank's share, then a final gather on rank 0
    if Shard.from_env().rank != 0:
        return rc  # the metrics are computed once, on rank 0, after every rank's SR
    if rc != 0:
        stderr_line(f"moe-sr-eval: the SR run did not complete (status {rc}); no evaluation")
        return rc
    if args.dry_run:
        return 0
    return evaluate_folders(
        {args.name: sr_dir, **compare},
        args.hr,
        args.out,
        metrics=args.metrics,
        crop_border=args.crop_border,
        y_channel=args.y_channel,
        device=args.metric_device or args.device or "cpu",
        weights_dir=args.metric_weights_dir,
        progress=not args.quiet,
    )


if __name__ == "__main__":
    sys.exit(main())
