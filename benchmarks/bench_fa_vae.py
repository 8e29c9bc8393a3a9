"""Benchmark: what the FA-VAE decoder costs on top of the plain decoder.

1. Full-size decode of a ``--size`` x ``--size`` image (default 512) from a random latent,
   random weights, batch 1, no gradient, eval mode: the VQ-f4 FA-VAE
   (``fa_vae/vq_f4_fa``: fuse layer + frequency module; LR features precomputed) against the
   plain ``autoencoder/vq_f4`` decoder, and the KL-f8 FA-VAE against the SD1.5 decoder.
   Timed: ``post_quant_conv`` + decoder (no quantisation). Time and peak memory, and the
   FA / plain ratios.
2. The AFNO filter alone (``AFNO2D``, 128 channels, ``--size`` x ``--size``), and the whole
   frequency module (``UNetAff``, 128 channels) at that size.

    python benchmarks/bench_fa_vae.py --device cuda --repeats 10
    python benchmarks/bench_fa_vae.py --device cpu --repeats 1 --threads 2

3. ``--sweep LR_SIZES``: the SR pipeline's whole decode step (``moe_sr.tiling.fa_vae_decode``:
   LR x8 encoder features + quantize + FA decoder, tiled above ``--vae-tile`` latent px with the
   encoder input made tile by tile; ``--tile-mode off`` for the untiled decode) for square LR
   inputs of each size, random weights of ``--preset``; time and peak memory in total and per
   output megapixel, each size in a fresh subprocess:

    python benchmarks/bench_fa_vae.py --sweep 32 64 96 128 160 192 256 \
        --weights assets/demo/fa_vae.safetensors --device cpu --threads 1 --repeats 1
    python benchmarks/bench_fa_vae.py --sweep 32 64 128 256 --device cuda --repeats 3

Prints a markdown table. Peak memory is the extra memory of the measured call over the
memory held before it (weights, inputs): CUDA ``max_memory_allocated``; on the CPU each
case runs in a fresh subprocess and reports its peak resident set size minus the resident
size right before the call.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from ldm.device import resolve_device

CASES = ("vq_plain", "vq_fa", "kl_plain", "kl_fa", "afno", "unet_aff")
LABELS = {
    "vq_plain": "VQ-f4 decode, plain decoder",
    "vq_fa": "VQ-f4 decode, FA decoder (fuse layer + frequency module)",
    "kl_plain": "KL-f8 decode, plain SD1.5 decoder",
    "kl_fa": "KL-f8 decode, FA decoder (frequency module)",
    "afno": "AFNO filter alone (128 ch)",
    "unet_aff": "frequency module UNetAff alone (128 ch)",
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(case: str, size: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """A no-argument callable running the measured computation."""
    from fa_vae.frequency import AFNO2D, UNetAff
    from ldm.config import instantiate, load_config

    g = torch.Generator().manual_seed(0)
    if case in ("afno", "unet_aff"):
        module = (AFNO2D(128) if case == "afno" else UNetAff(128, 128)).to(device).eval()
        x = torch.randn(1, 128, size, size, generator=g).to(device)
        return lambda: module(x)

    preset = {
        "vq_plain": "autoencoder/vq_f4",
        "vq_fa": "fa_vae/vq_f4_fa",
        "kl_plain": "autoencoder/kl_f8",
        "kl_fa": "fa_vae/kl_f8_fa",
    }[case]
    model = instantiate(load_config(preset)).to(device).eval()
    f = model.downsample_factor
    z = torch.randn(1, model.latent_channels, size // f, size // f, generator=g).to(device)
    skips = None
    if case == "vq_fa":  # features of the x8-upsampled LR image: computed once, not timed
        lr_up = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device)
        with torch.no_grad():
            skips = model.lr_features(lr_up)
    return lambda: model.decoder(model.post_quant_conv(z), skips)


def _time_calls(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int
) -> tuple[list[float], list[float], float]:
    """Wall and CPU seconds of ``repeats`` calls of ``fn`` (no gradient) after ``warmup``
    untimed ones, and their peak memory in MiB over the memory held before them."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = _rss_mib()
        times, cpu_times = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            del out
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return times, cpu_times, peak


def measure(case: str, size: int, device: torch.device, repeats: int, warmup: int) -> dict:
    times, _, peak = _time_calls(_build(case, size, device), device, repeats, warmup)
    return {"case": case, "ms": 1000 * statistics.median(times), "peak_mib": peak}


def measure_decode(lr_size: int, args: argparse.Namespace) -> dict:
    """The pipeline's decode of a random latent for a random ``lr_size`` square LR image."""
    import numpy as np

    from ldm.config import instantiate, load_config
    from moe_sr.tiling import TilingConfig, fa_vae_decode

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    if args.weights:
        from ldm.checkpoint import load_pretrained

        vae = load_pretrained(args.weights, kinds=("autoencoder",)).to(device).eval()
    else:
        vae = instantiate(load_config(args.preset)).to(device).eval()
    lr = np.random.default_rng(0).integers(0, 256, (lr_size, lr_size, 3), dtype=np.uint8)
    z = torch.randn(1, vae.latent_channels, 2 * lr_size, 2 * lr_size, generator=g).to(device)
    tiling = TilingConfig(mode=args.tile_mode, vae_tile=args.vae_tile, vae_overlap=args.vae_overlap)
    tiles = []

    def decode() -> torch.Tensor:
        return fa_vae_decode(vae, z, [lr], tiling, callback=lambda i, n: tiles.append(n))

    times, cpu_times, peak = _time_calls(decode, device, args.repeats, args.warmup)
    mpx = (8 * lr_size) ** 2 / 1e6
    cpu = statistics.median(cpu_times)
    return {"lr": lr_size, "out": 8 * lr_size, "tiles": tiles[-1], "s": statistics.median(times),
            "cpu_s": cpu, "peak_mib": peak, "cpu_s_per_mpx": cpu / mpx,
            "mib_per_mpx": peak / mpx}  # fmt: skip


def _sweep(args: argparse.Namespace) -> str:
    rows = []
    for lr_size in args.sweep:
        if torch.device(args.device).type == "cpu":
            cmd = [sys.executable, __file__, "--sweep-child", str(lr_size), *_sweep_flags(args)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        else:
            rows.append(measure_decode(lr_size, args))
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [
        f"FA-VAE decode sweep ({args.weights or args.preset + ', random weights'}): tiling "
        f"{args.tile_mode}, VAE tile "
        f"{args.vae_tile} latent px (overlap {args.vae_overlap}), device {args.device}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, median of "
        f"{args.repeats}",
        "",
        "| LR px | output px | tiles | wall s | CPU s | CPU s / Mpx | peak extra MiB | MiB / Mpx |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lr']} | {r['out']} | {r['tiles']} | {r['s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['cpu_s_per_mpx']:.2f} | {r['peak_mib']:.0f} | {r['mib_per_mpx']:.0f} |"
        )
    return "\n".join(lines)


def _sweep_flags(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--repeats", str(args.repeats), "--warmup",
            str(args.warmup), "--threads", str(args.threads), "--preset", args.preset,
            "--tile-mode", args.tile_mode, "--vae-tile", str(args.vae_tile),
            "--vae-overlap", str(args.vae_overlap)] + (
            ["--weights", args.weights] if args.weights else [])  # fmt: skip


def _measure_in_subprocess(case: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--child", case, "--device", args.device,
        "--size", str(args.size), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
        "--threads", str(args.threads),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _table(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"FA-VAE benchmark: {args.size}x{args.size} output, batch 1, device {args.device}, "
        f"torch {torch.__version__}, median of {args.repeats} (warmup {args.warmup})",
        "",
        "| case | time (ms) | peak extra memory (MiB) |",
        "|---|---:|---:|",
    ]
    for case, r in results.items():
        lines.append(f"| {LABELS[case]} | {r['ms']:.1f} | {r['peak_mib']:.0f} |")
    for kind in ("vq", "kl"):
        plain, fa = results.get(f"{kind}_plain"), results.get(f"{kind}_fa")
        if plain and fa:
            mem = fa["peak_mib"] / plain["peak_mib"] if plain["peak_mib"] > 0 else float("nan")
            lines.append(
                f"| **{kind.upper()} FA / plain ratio** | **{fa['ms'] / plain['ms']:.2f}x** "
                f"| **{mem:.2f}x** |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=str(resolve_device(None)))
    parser.add_argument("--size", type=int, default=512, help="output height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=None, help="default: 2 on CUDA, 0 on CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--sweep", nargs="+", type=int, metavar="LR", help="LR sizes (px)")
    parser.add_argument("--preset", default="fa_vae/vq_f4_fa", help="FA-VAE preset (sweep)")
    parser.add_argument("--weights", help="our FA-VAE .safetensors instead of random weights")
    parser.add_argument("--tile-mode", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--vae-tile", type=int, default=128, help="latent px (sweep)")
    parser.add_argument("--vae-overlap", type=int, default=16, help="latent px (sweep)")
    parser.add_argument("--sweep-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.warmup is None:
        args.warmup = 2 if device.type == "cuda" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.size, device, args.repeats, args.warmup)))
        return
    if args.sweep_child:
        print(json.dumps(measure_decode(args.sweep_child, args)))
        return
    if args.sweep:
        print(_sweep(args))
        return
    results = {}
    for case in args.cases:
        if device.type == "cpu":
            results[case] = _measure_in_subprocess(case, args)
        else:
            results[case] = measure(case, args.size, device, args.repeats, args.warmup)
            torch.cuda.empty_cache()
        print(f"{case}: {results[case]['ms']:.1f} ms", file=sys.stderr)
    print(_table(results, args))


if __name__ == "__main__":
    main()
