"""``moe-sr-txt2img-decode``: decode txt2img latents with the KL-f8 FA-VAE.

Step 2 of text-to-image with the FA-VAE decoder (step 1: ``moe-sr-txt2img-latents``)::

    moe-sr-txt2img-decode latents/ --ckpt first_stage_models/kl-f8/fa_vae.pth -o images/
    moe-sr-txt2img-decode latents/ --ckpt fa_vae_kl_f8.safetensors \\
        --compare-sd-vae stable-diffusion-v1-5/stable-diffusion-v1-5 -o images/

Inputs: latent files (``.safetensors`` from step 1, or ``.pt`` tensors such as the
release's) and/or folders of them, processed in sorted order. Outputs, named like the
latents: ``OUT/fa_vae/NAME.png``; with ``--compare-sd-vae`` also ``OUT/sd_vae/NAME.png``
(the original VAE) and ``OUT/side_by_side/NAME.png`` (SD VAE left, FA-VAE right).
Existing outputs are kept (resume) unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ldm.cli.messages import interruptible, report_failures, stderr_line
from ldm.device import resolve_device

logger = logging.getLogger("moe_sr.txt2img_decode")

LATENT_SUFFIXES = (".safetensors", ".pt")
#: checkpoint files that --compare-sd-vae loads with our converter (folders/ids: diffusers)
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-txt2img-decode",
        description="Decode unscaled SD1.5 latents with the KL-f8 FA-VAE "
        "(optionally next to the original SD VAE).",
    )
    p.add_argument("inputs", nargs="+", help="latent files (.safetensors/.pt) and/or folders")
    p.add_argument(
        "--ckpt",
        required=True,
        help="FA-VAE weights: the released kl-f8/fa_vae.pth or a moe-sr .safetensors",
    )
    p.add_argument(
        "--config",
        default=None,
        help="FA-VAE preset or YAML for a .pth checkpoint (default fa_vae/kl_f8_fa)",
    )
    p.add_argument(
        "--compare-sd-vae",
        metavar="PATH_OR_ID",
        default=None,
        help="also decode with this VAE: diffusers VAE/pipeline folder, hub id, or a "
        "checkpoint file (LDM/SD or diffusers naming)",
    )
    p.add_argument(
        "--sd-vae-prefix",
        default="",
        help="key prefix of the VAE in a --compare-sd-vae checkpoint file "
        "(first_stage_model. for a full SD .ckpt)",
    )
    p.add_argument(
        "--sd-vae-config",
        default="autoencoder/kl_f8",
        help="preset of a --compare-sd-vae checkpoint file (default autoencoder/kl_f8; "
        "not needed for moe-sr .safetensors files)",
    )
    p.add_argument("-o", "--outdir", default="outputs/txt2img", help="output folder")
    p.add_argument("--batch-size", type=int, default=4, help="latents per decode call")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float32",
        help="decoder dtype (default float32)",
    )
    p.add_argument("--suffix", default=".png", help="output image type (default .png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def collect_latents(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Latent files (folders expanded), sorted by name, and error lines for bad paths."""
    files: list[Path] = []
    errors: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = [f for f in p.iterdir() if f.is_file() and f.suffix in LATENT_SUFFIXES]
            if not found:
                errors.append(f"{p}: folder holds no latent files (.safetensors, .pt)")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in LATENT_SUFFIXES:
                errors.append(f"{p}: not a latent file (.safetensors, .pt)")
            else:
                files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    files = sorted(dict.fromkeys(files), key=lambda f: (f.name, str(f)))
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            errors.append(f"{f} and {stems[f.stem]} would write the same output name {f.stem!r}")
        stems.setdefault(f.stem, f)
    return files, errors


def load_fa_vae(config: str | None, ckpt: str, device: torch.device, dtype: torch.dtype):
    from fa_vae.released import load_released

    model = load_released(ckpt, "kl_f8", preset=config) if config else load_released(ckpt, "kl_f8")
    return model.to(device=device, dtype=dtype).eval()


def load_compare_vae(
    name: str,
    prefix: str,
    device: torch.device,
    dtype: torch.dtype,
    config: str = "autoencoder/kl_f8",
) -> torch.nn.Module:
    """The original SD VAE: a checkpoint file (LDM/SD or diffusers naming, loaded with our
    ``kl_model`` of preset ``config``), else a diffusers folder or hub id."""
    from fa_vae.txt2img import load_diffusers_vae

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix not in _FILE_SUFFIXES:
            raise ValueError(f"{path}: unknown VAE file type (expected one of {_FILE_SUFFIXES})")
        from ldm.autoencoders.loading import is_pretrained_file, load_autoencoder

        vae = load_autoencoder(None if is_pretrained_file(path) else config, path, prefix=prefix)
        return vae.to(device=device, dtype=dtype).eval()
    return load_diffusers_vae(name, torch_dtype=dtype, device=device)


def _batches(
    items: list[tuple[Path, torch.Tensor]], size: int
) -> list[tuple[list[Path], list[torch.Tensor]]]:
    """Consecutive ``(file, latent)`` pairs grouped into batches of equal latent shape."""
    out: list[tuple[list[Path], list[torch.Tensor]]] = []
    for f, z in items:
        if out and len(out[-1][0]) < size and out[-1][1][0].shape == z.shape:
            out[-1][0].append(f)
            out[-1][1].append(z)
        else:
            out.append(([f], [z]))
    return out


@interruptible("moe-sr-txt2img-decode")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from tqdm import tqdm

    from fa_vae.txt2img import PipelineLoadError, decode_latents, read_latent
    from ldm.checkpoint import CheckpointError
    from ldm.cli.outputs import check_output_dir
    from ldm.config import ConfigError
    from ldm.data.image_io import check_write_suffix, write_image

    if args.batch_size < 1:
        stderr_line("error: --batch-size must be >= 1")
        return 2
    try:  # the output side, before any work
        suffix = check_write_suffix(args.suffix, what="--suffix")
        check_output_dir(args.outdir)
    except ValueError as err:
        stderr_line(f"error: {err}")
        return 2
    files, errors = collect_latents(args.inputs)
    if errors:
        for line in errors:
            stderr_line(f"error: {line}")
        return 2
    dtype = getattr(torch, args.dtype)
    try:  # a bad --device is a ValueError, reported like a bad checkpoint
        device = resolve_device(args.device)
        fa = load_fa_vae(args.config, args.ckpt, device, dtype)
        sd = None
        if args.compare_sd_vae:
            sd = load_compare_vae(
                args.compare_sd_vae, args.sd_vae_prefix, device, dtype, args.sd_vae_config
            )
    except (CheckpointError, ConfigError, PipelineLoadError, OSError, ValueError) as err:
        stderr_line(f"error: {err}")
        return 2

    outdir = Path(args.outdir)
    kinds = ["fa_vae"] + (["sd_vae", "side_by_side"] if sd is not None else [])

    def outputs(f: Path) -> dict[str, Path]:
        return {k: outdir / k / f"{f.stem}{suffix}" for k in kinds}

    todo = [f for f in files if args.overwrite or not all(p.exists() for p in outputs(f).values())]
    skipped = len(files) - len(todo)
    failed: list[str] = []
    readable: list[tuple[Path, torch.Tensor]] = []
    for f in todo:  # latents are small ([4, 64, 64] for 512 px): read them all first
        try:
            readable.append((f, read_latent(f)))
        except (OSError, ValueError, RuntimeError) as err:
            failed.append(f"{f}: {err}")
    done = 0
    bar = tqdm(total=len(readable), desc="decode", unit="latent", disable=args.quiet)
    for batch_files, zs in _batches(readable, args.batch_size):
        z = torch.stack(zs)
        try:
            images = {"fa_vae": decode_latents(fa, z)}
            if sd is not None:
                images["sd_vae"] = decode_latents(sd, z)
                images["side_by_side"] = torch.cat([images["sd_vae"], images["fa_vae"]], dim=-1)
        except (RuntimeError, ValueError) as err:
            failed.extend(f"{f}: {err}" for f in batch_files)
            bar.update(len(batch_files))
            continue
        for j, f in enumerate(batch_files):
            try:  # an unwritable output is reported like an unreadable latent; the rest go on
                for kind, path in outputs(f).items():
                    write_image(images[kind][j].cpu(), path)
            except (OSError, ValueError) as err:
                failed.append(f"{f}: cannot write: {err}")
                continue
            done += 1
        bar.update(len(batch_files))
    bar.close()
    logger.info(
        "%d decoded, %d skipped (outputs exist; --overwrite replaces), %d failed -> %s",
        *(done, skipped, len(failed), outdir),
    )
    return report_failures(f"{len(failed)} latent(s) failed:", failed)


if __name__ == "__main__":
    sys.exit(main())
