"""``moe-sr`` / ``python -m moe_sr``: 8x super-resolution of images with SS-MoE + FA-VAE.

Examples::

    # the released files (moe_sr.hub.download_release puts them under models/)
    moe-sr --ckpt models/Unet/moe_stage{0,1,2,3}.ckpt \\
        --vae-ckpt models/first_stage_models/vq-f4/fa_vae.pth -i examples/lr -o outputs/sr
    # a folder of our safetensors (stage experts + FA-VAE), GPU, half precision, stage experts
    # offloaded
    moe-sr --weights-dir release_st/ -i lr/ -o sr/ --device cuda --dtype fp16 --vae-fp32 --offload

Outputs are PNG files named after the inputs, sorted (``--format same`` keeps the input's
type), are written atomically, and existing ones are skipped unless ``--overwrite``. The output
side is checked before any work; no output may be an input. An unreadable image (or an
unwritable output) is reported and skipped; the exit status is 1 if any image failed, 130 on
Ctrl-C. Under ``torchrun`` each process takes its share of the sorted inputs
(``moe_sr.distributed``) and rank 0 prints one summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from ldm.cli.messages import (
    DefaultsHelpFormatter,
    interruptible,
    report_failures,
    stderr_line,
)
from ldm.diffusion.samplers import SAMPLERS
from moe_sr.color_fix import COLOR_FIX_MODES

logger = logging.getLogger("moe_sr.sr")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUT_FORMATS = ("png", "same")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr",
        description="8x image super-resolution: latent diffusion with a sampling-space mixture "
        "of experts and the frequency-augmented VAE (Luo et al., arXiv 2310.12004).",
        formatter_class=DefaultsHelpFormatter,
    )
    io = p.add_argument_group("input / output")
    io.add_argument("-i", "--input", nargs="+", required=True, help="LR images and/or folders")
    io.add_argument("-o", "--output", required=True, help="output folder (same file names)")
    io.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    io.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default="png",
        help="output image type: png (lossless) or the input's own type (same; JPEG inputs "
        "then give lossy JPEG outputs)",
    )
    io.add_argument(
        "--save-latents",
        action="store_true",
        help="also write the sampled latents to OUTPUT/latents/<name>.safetensors",
    )
    io.add_argument("--quiet", action="store_true", help="no progress bars")
    io.add_argument("--dry-run", action="store_true", help="print the plan and the config, exit")
    add_pipeline_options(p)
    return p


def add_pipeline_options(p: argparse.ArgumentParser) -> None:
    """The "model and weights", "sampling" and "resources" option groups (shared with
    ``moe-sr-eval``)."""
    w = p.add_argument_group("model and weights")
    w.add_argument("--config", default="moe_sr/sr8x", help="pipeline preset or YAML file")
    w.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set tiling.latent_tile=96 (repeatable)",
    )
    w.add_argument(
        "--ckpt",
        nargs="+",
        default=[],
        help="stage expert checkpoints in stage order (released moe_stage{k}.ckpt or our "
        ".safetensors; ours are ordered by their metadata)",
    )
    w.add_argument("--weights-dir", help="folder of our .safetensors (stage experts + FA-VAE)")
    w.add_argument(
        "--download-to",
        metavar="DIR",
        help="use the released files under DIR, downloading the missing ones from the "
        "Hugging Face Hub (amandaa/moe_sr, 4 x 3.65 GB + 289 MB)",
    )
    w.add_argument("--vae-config", help="FA-VAE preset or YAML ({target, params}); default: config")
    w.add_argument("--vae-ckpt", help="FA-VAE weights (released fa_vae.pth or .safetensors)")
    w.add_argument(
        "--weights",
        choices=["ema", "raw"],
        default="ema",
        help="which UNet weights of the released .ckpt files",
    )

    s = p.add_argument_group("sampling")
    s.add_argument(
        "--sampler",
        choices=list(SAMPLERS),
        help="ddim (released) or a few-step ODE solver (config default: ddim)",
    )
    s.add_argument("--steps", type=int, help="sampling steps (config default: 200)")
    s.add_argument(
        "--spacing",
        choices=["uniform", "quad", "quadratic", "karras", "logsnr"],
        help="timestep grid: ddim uniform|quad, solvers uniform|quadratic|karras|logsnr "
        "(default: ddim uniform = LDM's grid, solvers logsnr)",
    )
    s.add_argument("--eta", type=float, help="DDIM eta (config default: 1.0; ddim only)")
    s.add_argument("--seed", type=int, help="seed, the same for every image (default: 42)")
    s.add_argument(
        "--color-fix",
        choices=COLOR_FIX_MODES,
        help="(config default: adain as released; the demo's: wavelet)",
    )
    s.add_argument("--ffn-moe-routing", choices=["random", "average"], help="(default: random)")

    r = p.add_argument_group("resources")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="UNet precision")
    r.add_argument("--vae-fp32", action="store_true", help="keep the FA-VAE in float32")
    r.add_argument(
        "--offload", action="store_true", help="only the active stage expert on the device"
    )
    r.add_argument("--tile", choices=["auto", "on", "off"], help="tiling (default: auto)")
    r.add_argument("--tile-size", type=int, help="latent tile size (latent px; x4 = output px)")
    r.add_argument("--tile-overlap", type=int, help="latent tile overlap (latent px)")
    r.add_argument("--vae-tile-size", type=int, help="FA-VAE decoding tile (latent px)")
    r.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images of one padded size sampled together (each keeps its own seed and result)",
    )


#: ``--tile*`` options -> keys of the config's ``tiling:`` section (set as typed values, not
#: parsed from text: ``on`` / ``off`` would become YAML booleans).
TILE_FLAGS = (
    ("tile", "mode"),
    ("tile_size", "latent_tile"),
    ("tile_overlap", "latent_overlap"),
    ("vae_tile_size", "vae_tile"),
)


def _config(args: argparse.Namespace) -> dict:
    from ldm.config import load_config, to_plain
    from moe_sr.build import check_pipeline_config, load_pipeline_config

    cfg = load_pipeline_config(args.config, args.overrides)
    tiling = dict(cfg.get("tiling") or {})
    tiling.update({key: getattr(args, flag) for flag, key in TILE_FLAGS
                   if getattr(args, flag) is not None})  # fmt: skip
    cfg["tiling"] = tiling
    if args.vae_config:
        cfg["vae"] = to_plain(load_config(args.vae_config))
    check_pipeline_config(cfg)
    return cfg


def _output_suffix(src: Path, fmt: str) -> str:
    from ldm.data.image_io import check_write_suffix

    if fmt != "same":
        return "." + fmt
    if not src.suffix:
        raise ValueError(f"{src} has no extension, so --format same has no type to keep; use "
                         "--format png")  # fmt: skip
    return check_write_suffix(src.suffix, what=f"{src} (--format same)")


def _plan(files: list[Path], args: argparse.Namespace) -> list[tuple[Path, Path, Path | None]]:
    """``(input, output image, latent file or None)`` per input; raises ``ValueError`` when
    two inputs would write the same output."""
    out = Path(args.output)
    plan = []
    for f in files:
        latent = out / "latents" / f"{f.stem}.safetensors" if args.save_latents else None
        plan.append((f, out / (f.stem + _output_suffix(f, args.format)), latent))
    seen: dict[Path, Path] = {}
    for src, dst, _ in plan:
        if dst in seen:
            raise ValueError(
                f"{seen[dst]} and {src} would both write {dst}; run them apart (or rename one)"
            )
        seen[dst] = src
    return plan


@interruptible("moe-sr")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run(args)


def run(args: argparse.Namespace) -> int:
    """SR of ``args.input`` into ``args.output`` (the options of :func:`build_parser`); the
    exit status: 0 done, 1 some image failed, 2 bad config or weights."""
    from ldm.cli.outputs import OutputError, check_output_dir, refuse_inputs_as_outputs
    from ldm.config import ConfigError, dump
    from ldm.data.image_io import LOSSY_EXTENSIONS, collect_inputs
    from moe_sr.distributed import Shard

    try:
        cfg = _config(args)
        _check_sampling(args, cfg)
        shard = Shard.from_env()
    except (ConfigError, ValueError) as err:
        stderr_line(f"moe-sr: {err}")
        return 2
    files, errors = collect_inputs(args.input)
    try:  # the output side, before any work
        plan = _plan(files, args)
        refuse_inputs_as_outputs(files, [p for _, dst, lat in plan for p in (dst, lat) if p])
        check_output_dir(args.output)
    except (OutputError, ValueError) as err:
        stderr_line(f"moe-sr: {err}")
        return 2
    plan = shard.take(plan)  # the full sorted plan, split before any skipping
    errors = errors if shard.rank == 0 else []  # input problems are reported once
    lossy = sorted({dst.suffix for _, dst, _ in plan if dst.suffix.lower() in LOSSY_EXTENSIONS})
    if lossy:
        logger.warning("outputs of type %s are lossy (quality 95); --format png keeps every "
                       "pixel", ", ".join(lossy))  # fmt: skip
    todo = [
        item
        for item in plan
        if args.overwrite or not item[1].exists() or (item[2] is not None and not item[2].exists())
    ]
    if args.dry_run:
        sys.stdout.write(dump(cfg))
        for src, dst, lat in plan:
            state = "run" if (src, dst, lat) in todo else "skip (exists)"
            sys.stdout.write(f"{src} -> {dst}{' + ' + str(lat) if lat else ''}  [{state}]\n")
        return 0
    if len(todo) < len(plan):
        logger.info("skipping %d image(s) whose outputs exist (--overwrite)", len(plan) - len(todo))
    if todo:
        try:
            pipe = _build(args, cfg, shard)
        except (ValueError, OSError, RuntimeError) as err:  # incl. ReleaseDownloadError
            stderr_line(f"moe-sr: cannot build the pipeline: {err}")
            errors.append(f"rank {shard.rank}: cannot build the pipeline: {err}")
            if not shard.distributed:
                return 2
        else:
            errors += _run(pipe, todo, args)
    return _summarise(shard, len(plan), len(plan) - len(todo), errors)


def _check_sampling(args: argparse.Namespace, cfg: dict) -> None:
    from ldm.diffusion.samplers import check_sampler_options

    sampler = args.sampler or (cfg.get("sampler") or {}).get("name", "ddim")
    steps = args.steps or (cfg.get("sampler") or {}).get("steps", 200)
    check_sampler_options(sampler, steps, args.eta, args.spacing)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")


def _summarise(shard, planned: int, skipped: int, errors: list[str]) -> int:
    """One process: the failures. Several: rank 0 prints every rank's counts and failures."""
    from moe_sr.distributed import gather_to_rank0

    if not shard.distributed:
        return report_failures(f"moe-sr: {len(errors)} problem(s):", errors)
    counts = {"planned": planned, "skipped": skipped, "errors": errors}
    every = gather_to_rank0(shard, counts)
    if every is None:
        return 1 if errors else 0
    lines = [
        f"rank {r}: {c['planned'] - c['skipped'] - len(c['errors'])} done, {c['skipped']} "
        f"skipped (exist), {len(c['errors'])} failed"
        for r, c in enumerate(every)
    ]
    sys.stdout.write(f"moe-sr: {shard.world_size} processes\n  " + "\n  ".join(lines) + "\n")
    failures = [e for c in every for e in c["errors"]]
    return report_failures(f"moe-sr: {len(failures)} problem(s):", failures)


def _build(args: argparse.Namespace, cfg: dict, shard=None):
    from moe_sr.build import build_pipeline, find_folder_files

    if sum(map(bool, (args.ckpt, args.weights_dir, args.download_to))) > 1:
        raise ValueError("give only one of --ckpt, --weights-dir and --download-to")
    if args.download_to:
        from moe_sr.hub import download_release

        paths = download_release(args.download_to)
        experts = [paths[f"stage{k}"] for k in range(4)]
        vae = args.vae_ckpt or paths["fa_vae_vqf4"]
    elif args.weights_dir:
        experts, vae = find_folder_files(args.weights_dir)
        vae = args.vae_ckpt or vae
    else:
        experts, vae = args.ckpt, args.vae_ckpt
        if not experts or not vae:
            raise ValueError(
                "give the stage expert checkpoints (--ckpt, one per stage) and --vae-ckpt, or "
                "--weights-dir, or --download-to DIR (the released files)"
            )
    dtype = DTYPES[args.dtype]
    return build_pipeline(
        cfg,
        experts,
        vae,
        weights=args.weights,
        device=args.device if shard is None else shard.device(args.device),
        dtype=dtype,
        vae_dtype=torch.float32 if args.vae_fp32 else None,
        offload=args.offload,
        sampler=args.sampler,
        spacing=args.spacing,
        steps=args.steps,
        eta=args.eta,
        seed=args.seed,
        color_fix=args.color_fix,
        ffn_moe_routing=args.ffn_moe_routing,
    )


def _run(pipe, todo: list[tuple[Path, Path, Path | None]], args: argparse.Namespace) -> list[str]:
    from tqdm import tqdm

    from ldm.data.image_io import ImageReadError, read_image, write_image
    from moe_sr.batching import group_batches

    errors = []
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=args.quiet)

    def readable():
        for item in todo:
            try:
                yield item, read_image(item[0])
            except (ImageReadError, OSError, ValueError) as err:
                errors.append(f"{item[0]}: {err}")
                bar.update(1)

    def key(entry):
        return pipe.batch_key(*entry[1].shape[-2:])

    for batch in group_batches(readable(), key, args.batch_size):
        bar.set_postfix_str(batch[0][0][0].name + (f" +{len(batch) - 1}" if len(batch) > 1 else ""))
        steps_bar = tqdm(total=pipe.steps if args.steps is None else args.steps, desc="  steps",
                         unit="step", leave=False, disable=args.quiet)  # fmt: skip
        decode_bar = _DecodeBar(args.quiet)
        start = time.perf_counter()
        try:
            results = pipe.run_batch(
                [lr for _, lr in batch],
                callback=lambda *_, bar=steps_bar: bar.update(1),
                decode_callback=decode_bar,
            )
        except (ValueError, RuntimeError, MemoryError) as err:
            errors += [f"{item[0]}: {err}" for item, _ in batch]
            bar.update(len(batch))
            continue
        finally:
            steps_bar.close()
            decode_bar.close()
        for ((src, dst, latent_path), _), result in zip(batch, results):
            bar.update(1)
            try:  # an unwritable output is reported like an unreadable input; the batch goes on
                write_image(result.image, dst)
                if latent_path is not None:
                    _save_latent(result.latent, latent_path, src, pipe, args)
            except (OSError, ValueError) as err:
                errors.append(f"{dst}: cannot write: {err}")
        logger.debug("%d image(s) in %.1f s", len(batch), time.perf_counter() - start)
    bar.close()
    return errors


class _DecodeBar:
    """A progress bar for a tiled FA-VAE decode (``decode_callback(done, total)``)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def __call__(self, done: int, total: int) -> None:
        if total < 2 or self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="  decode", unit="tile", leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _save_latent(latent: torch.Tensor, path: Path, src: Path, pipe, args) -> None:
    from safetensors.torch import save_file

    from ldm.atomic import atomic_write

    meta = {
        "source": src.name,
        "seed": str(pipe.seed if args.seed is None else args.seed),
        "steps": str(pipe.steps if args.steps is None else args.steps),
        "eta": str(pipe.eta if args.eta is None else args.eta),
        "layout": "CHW pre-quantisation vq-f4 latent of the 8x output (2x the LR size)",
    }
    with atomic_write(path) as tmp:
        save_file({"latent": latent.contiguous()}, str(tmp), metadata=meta)


if __name__ == "__main__":
    sys.exit(main())
