"""``python -m moe_sr.demo`` (``make demo``): 8x SR of the bundled examples, with a comparison.

Weights, first found wins:

1. ``--weights DIR`` or the environment variable ``MOESR_WEIGHTS``: the released full-size model,
   ``moe_stage{0..3}.ckpt`` and ``fa_vae.pth`` (vq-f4) either directly in ``DIR`` or in the
   release layout ``DIR/Unet/moe_stage{k}.ckpt``, ``DIR/first_stage_models/vq-f4/fa_vae.pth``
   (what ``moe_sr.hub.download_release(DIR)`` writes);
2. the bundled demo model ``assets/demo/`` (2 small stage experts + a small FA-VAE, trained by
   ``scripts/train_demo.sh``).

Inputs: ``assets/examples/lr/*.png`` (``--input`` for others); outputs in ``outputs/demo/``:
``<name>.png`` (the SR image) and ``<name>_compare.png`` (LR nearest / bicubic / SR / HR where
``assets/examples/hr/<name>.png`` exists), and ``comparison.png`` with every example.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from ldm.cli.messages import interruptible, report_failures

WEIGHTS_ENV = "MOESR_WEIGHTS"
#: The repository (the package is installed in editable mode): the bundled files are found
#: from any working directory.
REPO = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS = REPO / "assets" / "demo"
DEMO_CONFIG = "demo/sr8x_demo"
RELEASE_CONFIG = "moe_sr/sr8x"
EXAMPLES = REPO / "assets" / "examples"
DEFAULT_STEPS = 50

logger = logging.getLogger("moe_sr.demo")


class DemoError(Exception):
    """A problem the user can fix (missing weights, no inputs); printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-demo",
        description="8x super-resolution of the bundled example images with the demo model "
        f"(assets/demo) or the released weights (--weights DIR or ${WEIGHTS_ENV}).",
    )
    p.add_argument(
        "--weights", default=None, metavar="DIR",
        help=f"folder with the released moe_stage{{0..3}}.ckpt + fa_vae.pth (default: "
        f"${WEIGHTS_ENV}, else the demo model in assets/demo/)",
    )  # fmt: skip
    p.add_argument(
        "--demo-weights", default=str(DEMO_WEIGHTS),
        help="the demo model's folder (default: assets/demo of the repository)",
    )  # fmt: skip
    p.add_argument(
        "-i", "--input", nargs="+", default=[str(EXAMPLES / "lr")],
        help="LR images or folders (default: assets/examples/lr of the repository)",
    )  # fmt: skip
    p.add_argument(
        "--hr", default=str(EXAMPLES / "hr"),
        help="folder of HR references, by name (default: assets/examples/hr)",
    )  # fmt: skip
    p.add_argument("-o", "--output", default="outputs/demo", help="output folder")
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS,
        help=f"DDIM steps (default {DEFAULT_STEPS}; the release used 200)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _release_files(folder: Path) -> tuple[list[Path], Path]:
    """The released 8x SR files in ``folder`` (flat or the Hub layout)."""
    experts, vae = [], None
    for layout_experts, layout_vae in (
        (folder, folder),
        (folder / "Unet", folder / "first_stage_models" / "vq-f4"),
    ):
        found = [layout_experts / f"moe_stage{k}.ckpt" for k in range(4)]
        if all(p.is_file() for p in found) and (layout_vae / "fa_vae.pth").is_file():
            experts, vae = found, layout_vae / "fa_vae.pth"
            break
    if vae is None:
        raise DemoError(
            f"{folder} does not hold the released weights: expected moe_stage0..3.ckpt and "
            "fa_vae.pth (vq-f4) in it, or Unet/moe_stage{k}.ckpt and "
            "first_stage_models/vq-f4/fa_vae.pth (download them with "
            "`python -c 'from moe_sr.hub import download_release; download_release(\"DIR\")'`)"
        )
    return experts, vae


def build_demo_pipeline(args: argparse.Namespace):
    """``(pipeline, description)`` from the released weights or the demo model."""
    from ldm.checkpoint import CheckpointError
    from ldm.config import ConfigError
    from ldm.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise DemoError(str(err)) from None
    weights = args.weights or os.environ.get(WEIGHTS_ENV)
    try:
        return _load_pipeline(args, weights, device)
    except (CheckpointError, ConfigError, FileNotFoundError, NotADirectoryError) as err:
        raise DemoError(str(err)) from None


def _load_pipeline(args: argparse.Namespace, weights: str | None, device):
    from moe_sr.build import build_pipeline, build_pipeline_from_folder

    if weights:
        experts, vae = _release_files(Path(weights))
        pipe = build_pipeline(RELEASE_CONFIG, experts, vae, device=device, seed=args.seed)
        return pipe, f"released weights from {weights}"
    folder = Path(args.demo_weights)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise DemoError(
            f"the demo weights are missing: {folder}/ holds no .safetensors. Train them with "
            "`bash scripts/train_demo.sh` (about an hour on 2 CPU cores; DEVICE=cuda for a GPU), "
            f"or use the released weights: --weights DIR (or {WEIGHTS_ENV}=DIR)"
        )
    pipe = build_pipeline_from_folder(folder, DEMO_CONFIG, device=device, seed=args.seed)
    return pipe, f"demo model from {folder}"


def _inputs(items: list[str]) -> list[Path]:
    from ldm.data.image_io import collect_inputs

    files, errors = collect_inputs(items, empty_folders_ok=True)
    if errors:
        raise DemoError("; ".join(errors))
    if not files:
        raise DemoError(f"no images in {items}")
    return files


def run_demo(args: argparse.Namespace, errors: list[str] | None = None) -> list[Path]:
    """Super-resolve every input; returns the written files (SR images and comparisons).
    Unreadable inputs are appended to ``errors`` and skipped."""
    from tqdm import tqdm

    from ldm.cli.outputs import OutputError, check_output_dir, refuse_inputs_as_outputs
    from ldm.data.image_io import ImageReadError, read_image, write_image
    from ldm.evaluation.compare import comparison_columns, make_comparison

    files = _inputs(args.input)
    out = Path(args.output)
    outputs = [out / f"{f.stem}{s}.png" for f in files for s in ("", "_compare")]
    try:  # the output side, before any work
        refuse_inputs_as_outputs(
            [*files, *(Path(args.hr) / f.name for f in files)], [*outputs, out / "comparison.png"]
        )
        check_output_dir(out)
    except OutputError as err:
        raise DemoError(str(err)) from None
    pipe, what = build_demo_pipeline(args)
    logger.info("using the %s (%d stages, %d DDIM steps)", what, pipe.stages.num_stages, args.steps)
    written: list[Path] = []
    pictures = []
    bar = tqdm(files, desc="images", unit="img", disable=args.quiet)
    for path in bar:
        bar.set_postfix_str(path.name)
        try:
            lr = read_image(path)
        except ImageReadError as err:  # reported at the end; the other images go on
            if errors is None:
                raise DemoError(str(err)) from None
            errors.append(str(err))
            continue
        steps_bar = tqdm(total=args.steps, desc="  DDIM", unit="step", leave=False,
                         disable=args.quiet)  # fmt: skip
        start = time.perf_counter()
        try:
            result = pipe(lr, steps=args.steps, callback=lambda *_, b=steps_bar: b.update(1))
        finally:
            steps_bar.close()
        logger.info("%s: %.1f s", path.name, time.perf_counter() - start)
        sr_path = out / f"{path.stem}.png"
        write_image(result.image, sr_path)
        hr_path = Path(args.hr) / path.name
        hr = read_image(hr_path) if hr_path.is_file() else None
        if hr is not None and tuple(hr.shape[-2:]) != tuple(result.image.shape[-2:]):
            logger.warning("%s is not 8x %s: not shown", hr_path, path.name)
            hr = None
        cols = comparison_columns(lr, [("SR (8x)", result.image)], hr)
        picture = make_comparison(cols)
        compare_path = out / f"{path.stem}_compare.png"
        write_image(np.asarray(picture.convert("RGB")), compare_path)
        pictures.append(picture)
        written += [sr_path, compare_path]
    if pictures:
        written.append(_stack(pictures, out / "comparison.png"))
    return written


def _stack(pictures: list, path: Path) -> Path:
    """All comparison rows in one picture (each scaled to the widest)."""
    from PIL import Image

    from ldm.data.image_io import write_image

    width = max(p.width for p in pictures)
    rows = [p if p.width == width else p.resize((width, round(p.height * width / p.width)))
            for p in pictures]  # fmt: skip
    canvas = Image.new("RGB", (width, sum(r.height for r in rows)), (255, 255, 255))
    top = 0
    for r in rows:
        canvas.paste(r, (0, top))
        top += r.height
    write_image(np.asarray(canvas), path)
    return path


@interruptible("moe-sr-demo")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    start = time.perf_counter()
    errors: list[str] = []
    try:
        written = run_demo(args, errors)
    except DemoError as err:
        sys.stderr.write(f"moe-sr-demo: {err}\n")
        return 2
    out = Path(args.output)
    sys.stdout.write(
        f"done in {time.perf_counter() - start:.0f} s: {len(written)} files in {out}/\n"
        f"  side-by-side picture: {out / 'comparison.png'}\n"
        f"  SR images: {', '.join(str(p) for p in written if not p.stem.endswith('_compare') and p.name != 'comparison.png')}\n"
    )
    return report_failures(f"moe-sr-demo: {len(errors)} input(s) failed:", errors)


if __name__ == "__main__":
    sys.exit(main())
