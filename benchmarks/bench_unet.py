"""Benchmark: the full-size 8x SR stage expert UNet and its FFN-MoE layer.

1. One forward of ``configs/unet/sr8x_expert.yaml`` (random weights, batch ``--batch``,
   ``--size`` x ``--size`` latent) per FFN-MoE routing mode: ``random`` (released behaviour; the
   FFN experts are packed, as every built UNet is: the FFN expert stack is a view) and ``average``.
   Median time and peak memory.
2. One FFN-MoE layer alone (640 channels, 16 FFN experts, ``(size/8)^2`` tokens = the released
   FFN experts' attention resolution): ours (batched FFN experts) vs the released algorithm
   (``LoopFFNMoE`` below: ``FeedForwardMoe.forward`` line by line, one call per FFN expert), same
   weights and permutation (outputs compared), measured **interleaved in one process**
   (alternating order, each run timed alone) so that both see the same machine state.

    python benchmarks/bench_unet.py --device cuda              # full size (128x128 latent)
    python benchmarks/bench_unet.py --device cpu --size 64 --threads 1 --repeats 21

Prints a markdown table. Peak memory: CUDA ``max_memory_allocated`` per measurement; on the
CPU the process' peak resident set size so far (monotonic, so an upper bound).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from ldm.config import instantiate, load_config
from ldm.device import resolve_device
from ldm.unet import FFNMoE, chunk_sizes


class LoopFFNMoE(nn.Module):
    """Reference: the released ``FeedForwardMoe`` algorithm, one Python call per FFN expert."""

    def __init__(self, ours: FFNMoE) -> None:
        super().__init__()
        self.ours = ours  # shares the weights

    def forward(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        feat = self.ours.moe_norm(x.flatten(2).transpose(1, 2))[:, perm]
        outs, start = [], 0
        for k, size in enumerate(chunk_sizes(h * w, self.ours.num_experts)):
            outs.append(self.ours.moe_blocks[k](feat[:, start : start + size]))
            start += size
        y = torch.cat(outs, dim=1)[:, torch.argsort(perm)]
        return x + y.transpose(1, 2).reshape(b, c, h, w)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> tuple[float, float]:
    """Median wall time (ms) and peak memory (MiB) of ``fn``."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), _peak_mib(device)


def bench_unet(args, device: torch.device, dtype: torch.dtype) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    with torch.device(device):
        model = instantiate(load_config("unet/sr8x_expert")).to(dtype).eval()
    x = torch.randn(args.batch, 6, args.size, args.size, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=device, dtype=torch.long)
    rows = []
    for name, mode in (
        ("random (packed FFN experts, the default)", "random"),
        ("average", "average"),
    ):
        model.set_ffn_moe_routing(mode, generator=torch.Generator().manual_seed(0))

        def run():
            with torch.inference_mode():
                return model(x, t)

        ms, mib = measure(run, device, args.warmup, args.repeats)
        rows.append((f"UNet forward, {name}", ms, mib))
    return rows


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median ms of each function, timed one call at a time in alternating order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def bench_ffn_moe(args, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    with torch.device(device):
        layer = FFNMoE(640, num_experts=16).to(dtype).eval()
    side = max(args.size // 8, 1)
    x = torch.randn(args.batch, 640, side, side, device=device, dtype=dtype)
    perm = torch.randperm(side * side)
    layer.set_routing("fixed", perm=perm)
    avg = FFNMoE(640, num_experts=16).to(device, dtype).eval()
    avg.load_state_dict(layer.state_dict())
    avg.set_routing("average")
    loop = LoopFFNMoE(layer)
    perm_dev = perm.to(device)
    with torch.inference_mode():
        err = (layer(x) - loop(x, perm_dev)).abs().max().item()

    def inference(fn):
        def run():
            with torch.inference_mode():
                return fn()

        return run

    fns = {
        "FFN-MoE layer, per-expert loop (released algorithm)": inference(lambda: loop(x, perm_dev)),
        "FFN-MoE layer, ours batched (packed FFN experts: the stack is a view)": inference(
            lambda: layer(x)
        ),
        "FFN-MoE layer, average (one FFN)": inference(lambda: avg(x)),
    }
    medians = interleaved(fns, device, args.warmup, max(args.repeats, 5))
    names = list(fns)
    rows = [(n, ms, _peak_mib(device)) for n, ms in medians.items()]
    ratios = {"batched (packed FFN experts)": medians[names[0]] / medians[names[1]]}
    return rows, ratios, err, side * side


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=str(resolve_device(None)))
    p.add_argument("--size", type=int, default=128, help="latent height = width (multiple of 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-unet", action="store_true", help="only the FFN-MoE layer benchmark")
    args = p.parse_args(argv)
    if args.size % 8:
        p.error("--size must be a multiple of 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    dtype = getattr(torch, args.dtype)

    ffn_rows, ratios, err, tokens = bench_ffn_moe(args, device, dtype)
    rows = [] if args.skip_unet else bench_unet(args, device, dtype)
    rows += ffn_rows

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {dev_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.dtype}, batch {args.batch}, latent {args.size}x{args.size} "
        f"(FFN-MoE at {tokens} tokens), median of {args.repeats} (FFN layer: "
        f"{max(args.repeats, 5)}, interleaved) after {args.warmup} warm-up"
    )
    mem = "peak GPU MiB" if device.type == "cuda" else "process peak RSS MiB"
    print(f"\n| what | median ms | {mem} |\n|---|---:|---:|")
    for name, ms, mib in rows:
        print(f"| {name} | {ms:.2f} | {mib:.0f} |")
    print()
    for name, r in ratios.items():
        print(f"FFN-MoE speed-up, per-expert loop / ours {name}: {r:.2f}x")
    print(f"max |ours - loop| = {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
