"""``moe-sr-eval-sr`` / ``scripts/eval_sr.py``: metrics of SR results against HR references.

    python scripts/eval_sr.py --hr DIV2K_valid_HR --sr ours=results/ours --sr bicubic=results/bic \\
        --metrics psnr,ssim,lpips --y-channel --crop-border 8 --out runs/eval_sr

Images are paired by file name (stem: ``0801.png`` pairs with ``0801.jpg``); names without a
partner are listed in the error. Running the SR pipeline first belongs to the moe_sr package
(``ldm`` does not import it): ``moe-sr-eval`` (``moe_sr/cli/eval_sr.py``) does both.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.cli._eval_common import add_common_options, parse_metrics, setup_logging, write_outputs
from ldm.cli.messages import interruptible

log = logging.getLogger(__name__)
DEFAULT_METRICS = ["psnr", "ssim", "lpips", "fid"]


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


def _parse_sr(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep:
            name, folder = Path(item).name, item
        if name in out:
            raise ValueError(f"two --sr entries named {name!r}: give NAME=DIR")
        out[name] = Path(folder)
    return out


@interruptible("moe-sr-eval-sr")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        sr = _parse_sr(args.sr)
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


def evaluate_folders(
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
) -> int:
    """Evaluate every ``{name: SR folder}`` against ``hr``; write per_image.csv, summary.json
    and table.md to ``out`` and print the table. ``metrics``: ``"a,b"`` or ``None`` (default
    list). Returns the exit status (2 with the error on stderr for bad input)."""
    from ldm.cli.outputs import check_output_dir
    from ldm.evaluation import MissingMetricWeights, evaluate
    from ldm.evaluation.metrics import check_available, metric_spec
    from ldm.evaluation.report import markdown_table

    try:
        check_output_dir(out, flag="--out")
        metrics, notes = parse_metrics(metrics, DEFAULT_METRICS, weights_dir)
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
    except (MissingMetricWeights, ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
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
    out = Path(out)
    write_outputs(out, rows, result, table)
    sys.stdout.write(table)
    sys.stdout.write(f"wrote {out / 'per_image.csv'}, {out / 'summary.json'}, {out / 'table.md'}\n")
    return 0
