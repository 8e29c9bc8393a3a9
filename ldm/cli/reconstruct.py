"""``moe-sr-reconstruct``: encode -> decode images with a first-stage autoencoder.

Examples::

    moe-sr-reconstruct --config autoencoder/vq_f4 --ckpt vq-f4/model.ckpt photos/ -o recon/
    moe-sr-reconstruct --config autoencoder/kl_f8 --ckpt sd15.ckpt --prefix first_stage_model. a.png
    moe-sr-reconstruct --ckpt my_vae.safetensors a.png b.jpg -o out/   # config in the file
    # LR-guided FA-VAE (VQ-f4): the LR images (1/8 of the HR, same file names), or made from the HR
    moe-sr-reconstruct --config fa_vae/vq_f4_fa --ckpt fa_vae.pth hr/ --lr lr/ -o recon/
    moe-sr-reconstruct --config fa_vae/vq_f4_fa --ckpt fa_vae.pth hr/ --lr-from-hr -o recon/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ldm.cli.messages import interruptible, report_failures, stderr_line

logger = logging.getLogger("moe_sr.reconstruct")


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
    p.add_argument("--ckpt", help="weights: .ckpt, .pth/.pt or .safetensors")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="without --ckpt: reconstruct with the untrained model of --config (for tests)",
    )
    p.add_argument("--prefix", default="", help="key prefix to select, e.g. first_stage_model.")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--suffix", default=".png", help="output file type: .png, .tif, .webp (lossless), .jpg"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    lr = p.add_argument_group(
        "LR-guided autoencoders (the VQ-f4 FA-VAE: its decoder fuses features of the LR image)"
    ).add_mutually_exclusive_group()
    lr.add_argument(
        "--lr",
        metavar="PATH_OR_DIR",
        help="the LR image (one input) or a folder of LR images matched to the inputs by file "
        "name (stem); each exactly 1/8 of its HR input's size",
    )
    lr.add_argument(
        "--lr-from-hr",
        action="store_true",
        help="make each LR image from its input by MATLAB bicubic x1/8",
    )
    return p


def match_lr(files: list[Path], lr: str) -> tuple[dict[Path, Path], list[str]]:
    """The LR image of each input (``lr``: one file, or a folder matched by stem), and error
    lines for inputs without one (or with several candidates)."""
    from ldm.data.image_io import list_images

    src = Path(lr)
    if src.is_file():
        if len(files) != 1:
            return {}, [f"--lr {src} is one file but there are {len(files)} inputs: give a folder"]
        return {files[0]: src}, []
    if not src.is_dir():
        return {}, [f"--lr {src}: no such file or folder"]
    by_stem: dict[str, list[Path]] = {}
    for f in list_images(src):
        by_stem.setdefault(f.stem, []).append(f)
    found, errors = {}, []
    for f in files:
        cands = by_stem.get(f.stem, [])
        if len(cands) == 1:
            found[f] = cands[0]
        elif not cands:
            errors.append(f"{f}: no LR image named {f.stem}.* in {src}")
        else:
            errors.append(f"{f}: several LR images match: {', '.join(c.name for c in cands)}")
    return found, errors


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


@interruptible("moe-sr-reconstruct")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from tqdm import tqdm

    from ldm.autoencoders.loading import load_autoencoder
    from ldm.autoencoders.lr_guided import needs_lr_input, reconstruct_image_with_lr
    from ldm.autoencoders.reconstruct import reconstruct_image
    from ldm.checkpoint import CheckpointError
    from ldm.cli.outputs import OutputError, check_output_dir, refuse_inputs_as_outputs
    from ldm.config import ConfigError
    from ldm.data.image_io import (
        ImageReadError,
        check_write_suffix,
        collect_inputs,
        read_image,
        write_image,
    )

    if args.config is None and args.ckpt is None:
        stderr_line("error: give --config (a preset or YAML) and/or --ckpt")
        return 2
    if args.ckpt is None and not args.random_weights:
        stderr_line(
            "error: give the weights with --ckpt; without them the model is untrained and its "
            "reconstructions are noise (--random-weights if that is what you want)"
        )
        return 2
    try:  # the output side, before any work
        suffix = check_write_suffix(args.suffix, what="--suffix")
        check_output_dir(args.outdir)
    except (OutputError, ValueError) as err:
        stderr_line(f"error: {err}")
        return 2
    try:
        model = load_autoencoder(args.config, args.ckpt, prefix=args.prefix)
    except (CheckpointError, ConfigError, ValueError) as err:
        stderr_line(f"error: {err}")
        return 2
    lr_guided = needs_lr_input(model)
    if lr_guided and not (args.lr or args.lr_from_hr):
        stderr_line(
            f"error: {type(model).__name__} is LR-guided (its decoder fuses LR features): give "
            "--lr PATH_OR_DIR (LR images, 1/8 of the input size, same file names) or "
            "--lr-from-hr (make them by bicubic x1/8 of the inputs)"
        )
        return 2
    if not lr_guided and (args.lr or args.lr_from_hr):
        flag = "--lr" if args.lr else "--lr-from-hr"
        stderr_line(f"error: {flag} is for LR-guided models (the VQ-f4 FA-VAE); "
             f"{type(model).__name__} takes no LR image: drop {flag}")  # fmt: skip
        return 2
    device = torch.device(args.device)
    model = model.to(device).eval()

    files, errors = collect_inputs(args.inputs)
    files = list(dict.fromkeys(files))  # a file named twice is processed once
    lr_files: dict[Path, Path] = {}
    if args.lr:
        lr_files, lr_errors = match_lr(files, args.lr)
        errors += lr_errors
        files = [f for f in files if f in lr_files]
    outdir = Path(args.outdir)
    names = output_names(files, suffix)
    try:
        refuse_inputs_as_outputs([*files, *lr_files.values()], [outdir / names[f] for f in files])
    except OutputError as err:
        stderr_line(f"error: {err}")
        return 2
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
        if lr_guided:
            try:
                lr = read_image(lr_files[path]) if args.lr else None
                y = reconstruct_image_with_lr(model, x, lr)
            except (ImageReadError, ValueError) as err:
                errors.append(f"{path}: {err}")
                tqdm.write(f"error: {path}: {err}", file=sys.stderr)
                continue
        else:
            y = reconstruct_image(model, x.to(device))
        try:  # an unwritable output is reported like an unreadable input; the batch goes on
            write_image(y, out)
        except (OSError, ValueError) as err:
            errors.append(f"{out}: cannot write: {err}")
            tqdm.write(f"error: {out}: cannot write: {err}", file=sys.stderr)
            continue
        done += 1

    logger.info(
        "%d written, %d skipped (exist; --overwrite replaces), %d failed -> %s",
        *(done, skipped, len(errors), outdir),
    )
    return report_failures(f"{len(errors)} input(s) failed:", errors)


if __name__ == "__main__":
    sys.exit(main())
