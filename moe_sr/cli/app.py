"""``moe-sr-app`` (``make app``): a local web page for 8x SR, on the pipeline ``moe-sr`` uses.

Examples::

    moe-sr-app                                   # the bundled demo model, http://127.0.0.1:7860
    moe-sr-app --weights-dir release_st/ --device cuda --dtype fp16 --vae-fp32
    moe-sr-app --download-to models/ --port 8080 --max-pixels 1000000

The model options are those of ``moe-sr`` (``--config``, ``--ckpt``, ``--weights-dir``,
``--download-to``, ``--steps`` ...): they set the model and the page's defaults. Without
weights the bundled demo model (``assets/demo``, config ``demo/sr8x_demo``) is served. Needs
the ``app`` extra (``pip install -e '.[app]'``; ``make install`` includes it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from ldm.cli.messages import DefaultsHelpFormatter, stderr_line
from ldm.config import CONFIG_ROOT
from moe_sr.cli.sr import add_pipeline_options

logger = logging.getLogger("moe_sr.app")

DEMO_WEIGHTS = CONFIG_ROOT.parent / "assets" / "demo"
DEMO_CONFIG = "demo/sr8x_demo"
RELEASE_CONFIG = "moe_sr/sr8x"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-app",
        description="A local web page for 8x super-resolution (Gradio). Without weights it "
        f"serves the bundled demo model ({DEMO_CONFIG}); --config defaults to {RELEASE_CONFIG} "
        "for other weights.",
        formatter_class=DefaultsHelpFormatter,
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument(
        "--share", action="store_true",
        help="also publish a temporary public *.gradio.live link (needs internet)",
    )  # fmt: skip
    s.add_argument(
        "--devices", nargs="+", metavar="DEVICE",
        help="devices offered in the page (default: cpu and every accelerator)",
    )  # fmt: skip
    s.add_argument("--per-device", type=int, default=1, help="jobs running at once per device")
    s.add_argument(
        "--concurrency", type=int,
        help="jobs running at once in all (default: --per-device x the devices offered)",
    )  # fmt: skip
    s.add_argument("--queue-size", type=int, default=32, help="jobs waiting at most")
    s.add_argument(
        "--max-pixels", type=int, default=256 * 256,
        help="largest LR input (width x height) taken; larger ones are refused before any work",
    )  # fmt: skip
    s.add_argument(
        "--max-tiled-pixels", type=int, default=1024 * 1024,
        help="larger inputs up to this size are taken when the run's tiling is 'on' (0: never)",
    )  # fmt: skip
    s.add_argument("--max-files", type=int, default=16, help="images per run at most")
    s.add_argument("--max-upload-mb", type=int, default=64, help="largest upload, MB")
    s.add_argument("--max-steps", type=int, help="most DDIM steps a run may ask (default: T-1)")
    s.add_argument(
        "--preview-every", type=int, default=5,
        help="show the sampler's current prediction every N steps (0: never)",
    )  # fmt: skip
    s.add_argument("--results-dir", help="where result PNGs go (default: a new temporary folder)")
    s.add_argument("--quiet", action="store_true", help="warnings only in the log")
    add_pipeline_options(p)
    p.set_defaults(config=None)
    return p


def resolve_model(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the demo model filled in when no weights were named, and a config."""
    args = argparse.Namespace(**vars(args))
    if not (args.ckpt or args.weights_dir or args.download_to):
        args.weights_dir = _shown_path(DEMO_WEIGHTS)
        args.config = args.config or DEMO_CONFIG
    args.config = args.config or RELEASE_CONFIG
    return args


def _shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (shorter commands)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def model_cli_args(args: argparse.Namespace) -> list[str]:
    """The server's model and resource options as ``moe-sr`` arguments (for the page's
    "same with the command line"); the per-run ones are added by ``cli_command``."""
    out = ["--config", str(args.config)]
    for item in args.overrides:
        out += ["--set", item]
    if args.ckpt:
        out += ["--ckpt", *map(str, args.ckpt)]
    for flag, value in (
        ("--weights-dir", args.weights_dir),
        ("--download-to", args.download_to),
        ("--vae-config", args.vae_config),
        ("--vae-ckpt", args.vae_ckpt),
        ("--tile-size", args.tile_size),
        ("--tile-overlap", args.tile_overlap),
        ("--vae-tile-size", args.vae_tile_size),
    ):
        if value is not None:
            out += [flag, str(value)]
    if args.weights != "ema":
        out += ["--weights", args.weights]
    out += ["--vae-fp32"] if args.vae_fp32 else []
    out += ["--offload"] if args.offload else []
    return out


def make_builder(args: argparse.Namespace):
    """``build(device, precision) -> pipeline`` with ``moe-sr``'s own config and build code."""
    from moe_sr.cli.sr import _build, _config

    def build(device: str, precision: str):
        run_args = argparse.Namespace(**{**vars(args), "device": device, "dtype": precision})
        return _build(run_args, _config(run_args))

    return build


def main(argv: list[str] | None = None) -> int:
    args = resolve_model(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own requests, one per start
    try:
        server = make_server(args)
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        stderr_line("moe-sr-app: needs gradio: pip install -e '.[app]' (make install does it)")
        return 2
    except (ValueError, OSError, RuntimeError) as err:  # weights, config, device
        stderr_line(f"moe-sr-app: cannot build the pipeline: {err}")
        return 2
    page, launch = server
    page.launch(**launch)
    return 0


def make_server(args: argparse.Namespace):
    """``(page, launch_kwargs)``: the pipeline built (errors raise here), the page made."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no phoning home
    from ldm.device import resolve_device
    from moe_sr.app.controller import AppController
    from moe_sr.app.jobs import SRRunner
    from moe_sr.app.options import RunSettings, SizeLimits, available_devices, device_name
    from moe_sr.app.pool import PipelinePool
    from moe_sr.app.ui import CSS, PageInfo, build_page, theme

    device = device_name(resolve_device(args.device))
    devices = list(dict.fromkeys(device_name(d) for d in args.devices or available_devices()))
    if device not in devices:
        devices.insert(0, device)
    pool = PipelinePool(make_builder(args), per_device=args.per_device)
    with pool.acquire(device, args.dtype) as pipe:  # built now: bad weights fail at start-up
        defaults = RunSettings(
            steps=pipe.steps, eta=pipe.eta, seed=pipe.seed, color_fix=pipe.color_fix,
            ffn_moe_routing=pipe.ffn_moe_routing, tile=pipe.tiling.mode, device=device,
            precision=args.dtype,
        )  # fmt: skip
        max_steps = args.max_steps or pipe.schedule.num_timesteps - 1
        stages = pipe.stages.num_stages
    limits = SizeLimits(args.max_pixels, args.max_tiled_pixels, args.max_files)
    results_dir = Path(args.results_dir or tempfile.mkdtemp(prefix="moe-sr-app-"))
    runner = SRRunner(
        pool, model_args=model_cli_args(args), limits=limits, out_dir=results_dir,
        preview_every=args.preview_every,
    )  # fmt: skip
    controller = AppController(runner, devices=devices, max_steps=max_steps)
    weights = args.weights_dir or args.download_to or " ".join(map(str, args.ckpt))
    info = PageInfo(
        title="moe-sr: 8x super-resolution",
        model=f"Model: `{args.config}` from `{weights}` ({stages} stage experts), on this "
        "machine. Latent diffusion with a sampling-space mixture of experts and the "
        "frequency-augmented VAE (Luo et al., arXiv 2310.12004).",
        limits=f"Inputs up to {limits.max_pixels:,} LR pixels (with tiling 'on': "
        f"{max(limits.max_tiled_pixels, limits.max_pixels):,}); {limits.max_files} images per "
        f"run; results in `{results_dir}`.",
    )
    page = build_page(controller, defaults, info, max_steps=max_steps)
    concurrency = args.concurrency or args.per_device * len(devices)
    page.queue(default_concurrency_limit=concurrency, max_size=args.queue_size)
    launch = {
        "server_name": args.host,
        "server_port": args.port,
        "share": args.share,
        "allowed_paths": [str(results_dir)],
        "max_file_size": f"{args.max_upload_mb}mb",
        "theme": theme(),
        "css": CSS,
        "footer_links": ["gradio", "settings"],
    }
    logger.info("serving on http://%s:%d (%s on %s)", args.host, args.port, args.config, device)
    return page, launch


if __name__ == "__main__":
    sys.exit(main())
