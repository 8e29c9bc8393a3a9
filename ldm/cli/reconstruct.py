"""``moe-sr-reconstruct``: encode -> decode images with a first-stage autoencoder.

Examples::

    moe-sr-reconstruct --config autoencoder/vq_f4 --ckpt vq-f4/model.ckpt photos/ -o recon/
    moe-sr-reconstruct --config autoencoder/kl_f8 --ckpt sd15.ckpt --prefix first_stage_model. a.png
    moe-sr-reconstruct --ckpt my_vae.safetensors a.png b.jpg -o out/   # config in the file
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger("moe_sr.reconstruct")


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-reconstruct",
        description="Encode and decode images (files or folders) with an autoencoder preset.",
    )
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument("-o", "--outdir", default="outputs/reconstruct", help="output folder")
    p.add_argument(
        "--config",
        help="preset name (autoencoder/vq_f4, autoencoder/kl_f8, ...) or YAML file; "
        "optional when --ckpt is a moe-sr safetensors file",
    )
    p.add_argument("--ckpt", help="weights: .ckpt, .pth/.pt or .safetensors (default: random)")
    p.add_argument("--prefix", default="", help="key prefix to select, e.g. first_stage_model.")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--suffix", default=".png", help="output file type (default .png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files to process (folders expanded, sorted) and error lines for missing paths."""
    from ldm.data.image_io import list_images

    files: list[Path] = []
    errors: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                errors.append(f"{p}: folder holds no images")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors


def output_names(files: list[Path], suffix: str) -> dict[Path, str]:
    """Output file name per input: ``stem + suffix``; inputs whose stems collide
    (``a.png``, ``a.jpg``; or the same name in two folders) get the extension and,
    if needed, the parent folder name added, so no output overwrites another."""
    names = {f: f.stem + suffix for f in files}
    for attempt in (
        lambda f: f"{f.stem}_{f.suffix.lstrip('.')}",
        lambda f: f"{f.parent.name}_{f.stem}_{f.suffix.lstrip('.')}",
    ):
        counts: dict[str, int] = {}
        for n in names.values():
            counts[n] = counts.get(n, 0) + 1
        for f, n in names.items():
            if counts[n] > 1:
                names[f] = attempt(f) + suffix
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from tqdm import tqdm

    from ldm.autoencoders.reconstruct import reconstruct_image
    from ldm.autoencoders.weights import load_autoencoder
    from ldm.checkpoint import CheckpointError
    from ldm.config import ConfigError
    from ldm.data.image_io import ImageReadError, read_image, write_image

    if args.config is None and args.ckpt is None:
        _err("error: give --config (a preset or YAML) and/or --ckpt")
        return 2
    try:
        model = load_autoencoder(args.config, args.ckpt, prefix=args.prefix)
    except (CheckpointError, ConfigError, ValueError) as err:
        _err(f"error: {err}")
        return 2
    device = torch.device(args.device)
    model = model.to(device).eval()

    files, errors = collect_inputs(args.inputs)
    outdir = Path(args.outdir)
    suffix = args.suffix if args.suffix.startswith(".") else "." + args.suffix
    files = list(dict.fromkeys(files))  # a file named twice is processed once
    names = output_names(files, suffix)
    done = skipped = 0
    for path in tqdm(files, desc="reconstruct", unit="img", disable=args.quiet):
        out = outdir / names[path]
        if out.exists() and not args.overwrite:
            skipped += 1
            continue
        try:
            x = read_image(path)
        except ImageReadError as err:
            errors.append(str(err))
            tqdm.write(f"error: {err}", file=sys.stderr)
            continue
        write_image(reconstruct_image(model, x.to(device)), out)
        done += 1

    logger.info(
        "%d written, %d skipped (exist; --overwrite replaces), %d failed -> %s",
        *(done, skipped, len(errors), outdir),
    )
    if errors:
        _err(f"{len(errors)} input(s) failed:")
        for line in errors:
            _err(f"  {line}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
