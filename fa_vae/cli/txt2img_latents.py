"""``moe-sr-txt2img-latents``: Stable Diffusion 1.5 latents for a file of prompts.

Step 1 of text-to-image with the FA-VAE decoder (step 2: ``moe-sr-txt2img-decode``)::

    moe-sr-txt2img-latents --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts prompts.txt --seeds 42 43 --steps 50 --guidance 7.5 -o latents/

One prompt per line (blank lines and lines starting with ``#`` are skipped; the prompt
index counts the kept lines from 0). For prompt ``i`` and seed ``s`` it writes
``{i:05d}_s{s}.safetensors`` (the *unscaled* latent, divided by the VAE's
``scaling_factor``) and ``{i:05d}_s{s}.json`` (prompt, seed, settings). Existing latents are
kept (resume) unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ldm.cli.messages import interruptible, stderr_line
from ldm.device import resolve_device

logger = logging.getLogger("moe_sr.txt2img_latents")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-txt2img-latents",
        description="Generate Stable Diffusion 1.5 latents (unscaled) for prompts and seeds.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="diffusers StableDiffusionPipeline: local folder or hub id "
        "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5; offline: a local folder)",
    )
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="seeds (default 42)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default empty)")
    p.add_argument("--height", type=int, default=None, help="image height (default: model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("-o", "--outdir", default="outputs/txt2img_latents", help="output folder")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="pipeline dtype (default: float16 on cuda, float32 on cpu)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing latents")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file: one per line, blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    prompts = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return prompts


@interruptible("moe-sr-txt2img-latents")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from tqdm import tqdm

    from fa_vae.txt2img import (
        PipelineLoadError,
        TokenizerError,
        check_tokenizer,
        generate_latents,
        latent_name,
        load_sd_pipeline,
        save_latent,
        scaling_factor_of,
    )

    if args.steps < 1 or args.batch_size < 1:
        stderr_line("error: --steps and --batch-size must be >= 1")
        return 2
    if len(set(args.seeds)) != len(args.seeds):
        stderr_line(f"error: --seeds repeats a seed: {args.seeds}")
        return 2
    try:  # resolve_device raises ValueError
        prompts = read_prompts(args.prompts)
        device = resolve_device(args.device)
    except (OSError, ValueError) as err:
        stderr_line(f"error: {err}")
        return 2
    dtype_name = args.dtype or ("float32" if device.type == "cpu" else "float16")
    try:
        pipe = load_sd_pipeline(args.model, torch_dtype=getattr(torch, dtype_name), device=device)
        check_tokenizer(pipe)
    except (PipelineLoadError, TokenizerError) as err:
        stderr_line(f"error: {err}")
        return 2
    pipe.set_progress_bar_config(disable=True)
    factor = scaling_factor_of(pipe)

    outdir = Path(args.outdir)
    todo = []
    for i in range(len(prompts)):
        seeds = [s for s in args.seeds if args.overwrite or not _exists(outdir, latent_name(i, s))]
        if seeds:
            todo.append((i, seeds))
    skipped = len(prompts) * len(args.seeds) - sum(len(s) for _, s in todo)
    written = 0
    for i, seeds in tqdm(todo, desc="latents", unit="prompt", disable=args.quiet):
        latents = generate_latents(
            pipe,
            [prompts[i]],
            seeds,
            args.steps,
            args.guidance,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            batch_size=args.batch_size,
        )[0]
        for seed, latent in zip(seeds, latents):
            meta = {
                "prompt": prompts[i],
                "prompt_index": i,
                "seed": seed,
                "steps": args.steps,
                "guidance": args.guidance,
                "negative_prompt": args.negative_prompt or "",
                "model": str(args.model),
                "dtype": dtype_name,
                "device": device.type,
                "scaling_factor": factor,
                "latent": "unscaled (pipeline latents / scaling_factor)",
            }
            save_latent(latent, outdir / f"{latent_name(i, seed)}.safetensors", meta)
            written += 1
    logger.info(
        "%d latents written, %d kept (exist; --overwrite replaces) -> %s", written, skipped, outdir
    )
    return 0


def _exists(outdir: Path, stem: str) -> bool:
    return (outdir / f"{stem}.safetensors").is_file()


if __name__ == "__main__":
    sys.exit(main())
