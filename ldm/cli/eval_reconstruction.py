"""``moe-sr-eval-reconstruction`` / ``scripts/eval_reconstruction.py``: autoencoder reconstruction
metrics on COCO val2017 (or any image folder), one table row per model.

    python scripts/eval_reconstruction.py --images coco/val2017 --out runs/recon \\
        --model sd-kl-f8=autoencoder/kl_f8:vae.safetensors \\
        --model fa-kl-f8=fa_vae/kl_f8_fa:fa_kl_f8.ckpt --limit 5000
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.cli.evaluation import add_common_options, setup_logging
from ldm.cli.messages import interruptible
from ldm.evaluation.sr_folders import DEFAULT_METRICS, select_metrics, write_report_files

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-eval-reconstruction",
        description="Reconstruction metrics of autoencoders. Protocol: short side resized to "
        "--size (bicubic, antialias), centre crop --size x --size (256 in the paper's table). "
        "Writes per_image.csv, summary.json and table.md (Model | psnr | ssim | lpips | fid).",
    )
    p.add_argument("--images", required=True, help="image folder (e.g. COCO val2017)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--model", action="append", required=True, metavar="NAME=CONFIG:CKPT",
        help="a model: name, config preset or YAML, weights file (NAME=:CKPT for a moe-sr "
        ".safetensors that carries its config); repeat for several models",
    )  # fmt: skip
    p.add_argument(
        "--metrics", default=None,
        help="comma-separated metrics (default psnr,ssim,lpips,fid; fid is dropped with a note "
        "when its Inception weights are missing)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="first N images (sorted by name)")
    p.add_argument("--size", type=int, default=256, help="crop size (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--save-recon", action="store_true",
        help="keep the reconstructions in OUT/<name>/recon (they are always reused on resume)",
    )  # fmt: skip
    add_common_options(p)
    return p


@interruptible("moe-sr-eval-reconstruction")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from ldm.cli.outputs import check_output_dir
    from ldm.data.image_io import ImageReadError
    from ldm.evaluation import MissingMetricWeights
    from ldm.evaluation.reconstruction import ModelSpec, evaluate_reconstruction
    from ldm.evaluation.report import markdown_table

    try:
        check_output_dir(args.out, flag="--out")
        specs = [ModelSpec.parse(m) for m in args.model]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        metrics, notes = select_metrics(args.metrics, DEFAULT_METRICS, args.weights_dir)
        result = evaluate_reconstruction(
            {s.name: s for s in specs}, args.images, args.out, metrics=metrics, size=args.size,
            limit=args.limit, batch_size=args.batch_size, device=args.device,
            save_recon=args.save_recon, weights_dir=args.weights_dir,
            progress=not args.no_progress,
        )  # fmt: skip
    except (
        MissingMetricWeights, ValueError, FileNotFoundError, NotADirectoryError, ImageReadError
    ) as err:  # fmt: skip
        sys.stderr.write(f"error: {err}\n")
        return 2
    for m in result["models"].values():
        notes += [n for n in m["notes"] if n not in notes]
    result["notes"] = notes
    rows = [{"model": name, **row} for name, rep in result["models"].items() for row in rep["rows"]]
    table = markdown_table(
        {name: rep["summary"] for name, rep in result["models"].items()},
        result["metrics"], result["directions"],
    )  # fmt: skip
    table += (
        f"\nProtocol: {result['protocol']}; {result['num_images']} images from {args.images}.\n"
    )
    table += "".join(f"\nNote: {n}\n" for n in notes)
    out = Path(args.out)
    write_report_files(out, rows, result, table)
    sys.stdout.write(table)
    sys.stdout.write(f"wrote {out / 'per_image.csv'}, {out / 'summary.json'}, {out / 'table.md'}\n")
    return 0
