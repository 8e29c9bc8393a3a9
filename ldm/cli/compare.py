"""``moe-sr-compare`` / ``scripts/compare.py``: a side-by-side picture with a zoomed crop.

    python scripts/compare.py --lr lr/0801.png --image ours=sr/0801.png --ref hr/0801.png \\
        --crop 200,120,64,64 --out figures/0801.png
    python scripts/compare.py --image "SD VAE=sd/a.png" --image "FA-VAE=fa/a.png" --out a.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ldm.cli.messages import interruptible


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-compare",
        description="Side-by-side comparison (LR nearest-upscaled / bicubic / methods / reference) "
        "with labels and a zoomed crop of one region.",
    )
    p.add_argument("--lr", default=None, help="LR image: adds 'LR (nearest)' and 'bicubic' columns")
    p.add_argument(
        "--image", action="append", default=[], metavar="LABEL=PATH",
        help="a labelled image column (repeat, in display order)",
    )  # fmt: skip
    p.add_argument("--ref", default=None, help="reference image: adds a 'reference' column")
    p.add_argument("--crop", default=None, help="zoom region x,y,w,h in full-size pixels")
    p.add_argument("--column-width", type=int, default=None, help="pixels per column")
    p.add_argument("--out", required=True, help="output image (png)")
    return p


@interruptible("moe-sr-compare")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ldm.cli.outputs import check_output_file
    from ldm.data.image_io import ImageReadError, check_write_suffix, read_image, write_image
    from ldm.evaluation.compare import comparison_columns, make_comparison, parse_crop

    try:
        check_write_suffix(Path(args.out).suffix, what=f"--out {args.out}")
        check_output_file(args.out, flag="--out")
        others = []
        for item in args.image:
            label, sep, path = item.partition("=")
            if not sep or not label:
                raise ValueError(f"--image wants LABEL=PATH, got {item!r}")
            others.append((label, read_image(path)))
        lr = read_image(args.lr) if args.lr else None
        ref = read_image(args.ref) if args.ref else None
        cols = comparison_columns(lr, others, ref)
        crop = parse_crop(args.crop) if args.crop else None
        picture = make_comparison(cols, crop, column_width=args.column_width)
    except (ValueError, TypeError, FileNotFoundError, ImageReadError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    out = write_image(np.asarray(picture.convert("RGB")), args.out)
    sys.stdout.write(f"wrote {out} ({picture.width}x{picture.height})\n")
    return 0
