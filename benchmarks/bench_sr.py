"""Benchmark of the 8x SR pipeline at full size with random weights (not a test).

Four full-size SS-MoE stage experts (``unet/sr8x_expert``, 428.5 M parameters each) and the FA-VAE
VQ-f4 (``fa_vae/vq_f4_fa``), one 64x64 LR image -> 512x512 output, a few DDIM steps. Each memory
policy runs in its own subprocess, so peak memory is measured cleanly:

* ``resident``: all four stage experts on the device;
* ``offload``: only the active stage expert on the device, the others on the CPU (3 switches/image),
  the next stage expert copied ahead on a side stream (CUDA);
* ``offload-noprefetch``: the same, each stage expert copied when its stage starts.

Reports time per DDIM step (overall and the median per stage), FA-VAE decode time, the
expert-switch cost (host time in the switch hook, and the sampling time against ``resident``),
peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS) and the resident weight bytes against
the release's ~14.6 GB (four 3.65 GB stage files, each holding raw + EMA UNets and an unused
first stage). On CUDA the step times are read from CUDA events (the GPU timeline; the bench adds
no synchronisation) after a warm-up image of ``--warmup-steps`` steps; ``--profile PREFIX``
also writes a torch.profiler trace and op table of the measured image per policy.

    python benchmarks/bench_sr.py                       # CPU, 4 steps (slow: minutes)
    python benchmarks/bench_sr.py --device cuda --steps 200 --dtype fp16 --vae-fp32 \
        --policies resident offload offload-noprefetch
    python benchmarks/bench_sr.py --device cuda --sampler unipc --steps 15 --dtype fp16 \
        --vae-fp32 --policies resident [--compile]     # a few-step solver (+ torch.compile)

**Throughput mode** (``--throughput``): images per second for batch sizes ``--batch-sizes``
(default 1 4 8) over ``--images`` images of one size, any pipeline preset with random weights
(``--config demo/sr8x_demo`` is small enough for a CPU), batch sizes interleaved over
``--repeats`` rounds, in one process:

    python benchmarks/bench_sr.py --throughput --config demo/sr8x_demo --lr-size 32 \
        --sampler unipc --steps 10 --images 8 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import time

import torch

RELEASE_BYTES = 4 * 3_650_066_050  # four moe_stage{k}.ckpt files, loaded fully by the release
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _peak_rss() -> int:
    from moe_sr.memory import proc_field_bytes

    peak = proc_field_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def build_random_pipeline(args: argparse.Namespace, policy: str = "resident"):
    """The pipeline of ``args.config`` with random weights (stage experts are copies of one)."""
    import fa_vae.targets  # noqa: F401
    import ldm.targets  # noqa: F401  (register targets also without `pip install -e .`)
    from ldm.config import instantiate, load_config
    from moe_sr.build import build_schedule
    from moe_sr.pipeline import MoESRPipeline
    from moe_sr.stages import StageSchedule
    from moe_sr.tiling import TilingConfig

    torch.manual_seed(0)
    cfg = load_config(args.config)
    stages = StageSchedule(list(cfg.stages))
    first = instantiate(cfg.unet).eval()  # random init once; the other stage experts are copies
    unets = [first] + [copy.deepcopy(first) for _ in range(stages.num_stages - 1)]
    pipe = MoESRPipeline(
        unets,
        stages,
        build_schedule(cfg.schedule),
        instantiate(cfg.vae).eval(),
        device=torch.device(args.device),
        dtype=DTYPES[args.dtype],
        vae_dtype=torch.float32 if args.vae_fp32 else None,
        offload=policy.startswith("offload"),
        prefetch=False if policy == "offload-noprefetch" else None,
        ffn_moe_routing=args.routing,
        steps=args.steps,
        sampler=args.sampler,
        spacing=args.spacing,
        tiling=TilingConfig(mode="off"),
    )
    if args.compile:
        for u in pipe.unets:
            u.compile()
    return pipe


def run_policy(args: argparse.Namespace) -> dict:
    """Build the full-size pipeline, super-resolve one image, return the measurements."""
    device = torch.device(args.device)
    t0 = time.perf_counter()
    pipe = build_random_pipeline(args, args.policy)
    build_s = time.perf_counter() - t0
    cuda = device.type == "cuda"
    lr = torch.rand(3, args.lr_size, args.lr_size)
    warmup = args.warmup_steps if args.warmup_steps is not None else (4 if cuda else 0)
    if warmup:  # first-call costs (kernel loading, allocator growth) out of the measurement
        pipe(lr, steps=warmup)
        pipe.residency.switches, pipe.residency.switch_seconds = 0, 0.0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    marks: list[tuple[int, float, object]] = []  # per step: stage, host clock, CUDA event

    def on_step(i: int, t: int, *_: object) -> None:
        event = None
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        marks.append((int(pipe.stages.stage_of(t)), time.perf_counter(), event))

    resident_before = pipe.resident_weight_bytes()
    _reset_peak_rss()  # measure the SR call, not the model construction
    profiler = _profiler(cuda) if args.profile else contextlib.nullcontext()
    start_event = torch.cuda.Event(enable_timing=True) if cuda else None
    if start_event is not None:
        start_event.record()
    t0 = time.perf_counter()
    with profiler as prof:
        result = pipe(lr, callback=on_step)
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    if args.profile:
        _write_profile(prof, f"{args.profile}_{args.policy}_{args.dtype}", cuda)
    step_times = []
    prev_clock, prev_event = t0, start_event
    for _, clock, event in marks:
        if cuda:
            step_times.append(prev_event.elapsed_time(event) / 1e3)  # type: ignore[union-attr]
        else:
            step_times.append(clock - prev_clock)
        prev_clock, prev_event = clock, event
    per_stage: dict[int, list[float]] = {}
    for (stage, _, _), dt in zip(marks, step_times):
        per_stage.setdefault(stage, []).append(dt)
    res = pipe.residency
    sample_s = result.timings["sample"]
    out = {
        "policy": args.policy,
        "sampler": args.sampler,
        "compile": args.compile,
        "device": str(device),
        "dtype": args.dtype,
        "vae_dtype": str(pipe.vae_dtype).replace("torch.", ""),
        "steps": args.steps,
        "output": list(result.image.shape),
        "build_s": build_s,
        "total_s": total,
        "sample_s": sample_s,
        "decode_s": result.timings["decode"],
        "step_s_mean": sum(step_times) / len(step_times),
        "step_s_median": _median(step_times),
        "step_s_median_per_stage": {k: _median(v) for k, v in sorted(per_stage.items())},
        "step_clock": "cuda events" if cuda else "host",
        "warmup_steps": warmup,
        "prefetch": pipe.residency.prefetch,
        "switches": res.switches,
        "switch_s_total": res.switch_seconds,
        "switch_share": res.switch_seconds / sample_s if sample_s else 0.0,
        "expert_bytes_resident_max": res.peak_resident_bytes,
        "vae_bytes": resident_before["vae"],
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "peak_rss_bytes": _peak_rss(),
    }
    return out


def run_throughput(args: argparse.Namespace) -> str:
    """Images per second of ``pipe.run_batch`` per batch size (see the module docstring)."""
    device = torch.device(args.device)
    pipe = build_random_pipeline(args)
    g = torch.Generator().manual_seed(0)
    lrs = [torch.rand(3, args.lr_size, args.lr_size, generator=g) for _ in range(args.images)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    pipe.run_batch(lrs[: max(args.batch_sizes)], steps=2)  # warm-up (largest batch)
    rates: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    for r in range(args.repeats):
        for b in args.batch_sizes if r % 2 == 0 else args.batch_sizes[::-1]:
            sync()
            t0 = time.perf_counter()
            for i in range(0, len(lrs), b):
                pipe.run_batch(lrs[i : i + b], seeds=list(range(i, min(i + b, len(lrs)))))
            sync()
            rates[b].append(len(lrs) / (time.perf_counter() - t0))
    base = _median(rates[args.batch_sizes[0]])
    lines = [
        f"throughput: {args.config} (random weights), LR {args.lr_size}x{args.lr_size} -> "
        f"{8 * args.lr_size}x{8 * args.lr_size}, {args.sampler} {args.steps} steps, UNet "
        f"{args.dtype}, {args.images} images, median of {args.repeats} interleaved round(s); "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "",
        f"| batch size | images / s | vs batch {args.batch_sizes[0]} |",
        "|---:|---:|---:|",
    ]
    for b in args.batch_sizes:
        lines.append(f"| {b} | {_median(rates[b]):.3f} | {_median(rates[b]) / base:.2f}x |")
    return "\n".join(lines)


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else float("nan")


def _profiler(cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    return profile(activities=acts, record_shapes=False)


def _write_profile(prof, prefix: str, cuda: bool) -> None:
    """``PREFIX.json`` (chrome trace) and ``PREFIX.txt`` (ops by self device/CPU time)."""
    prof.export_chrome_trace(prefix + ".json")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(prefix + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n")


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"8x SR, {args.config} with random weights, LR {args.lr_size}x{args.lr_size} -> "
        f"{8 * args.lr_size}x{8 * args.lr_size}, {args.sampler} {args.steps} steps"
        f"{' (torch.compile)' if args.compile else ''}, UNet {args.dtype}, "
        f"FFN-MoE routing {args.routing}, median of {args.repeats} run(s) per policy; "
        f"{platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "",
        "| policy | s/step (mean) | s/step (median) | median per stage | sampling s | vs resident"
        " | FA-VAE decode s | switches | switch s (host, total) | switch / sampling |"
        " peak device mem | peak RSS (SR call) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((r["sample_s"] for r in rows if r["policy"] == "resident"), None)
    for r in rows:
        rel = f"{100 * (r['sample_s'] / base - 1):+.1f} %" if base else "-"
        per_stage = r["step_s_median_per_stage"]
        stages = " / ".join(f"{per_stage[k]:.3f}" for k in sorted(per_stage, key=int, reverse=True))
        lines.append(
            f"| {r['policy']} | {r['step_s_mean']:.3f} | {r['step_s_median']:.3f} | "
            f"{stages} | {r['sample_s']:.2f} | {rel} | {r['decode_s']:.2f} | {r['switches']} | "
            f"{r['switch_s_total']:.3f} | {100 * r['switch_share']:.2f} % | "
            f"{_gb(r['peak_cuda_bytes'])} | {_gb(r['peak_rss_bytes'])} |"
        )
    lines.append(
        "\n(step times: " + rows[0]["step_clock"] + f"; warm-up image of {rows[0]['warmup_steps']} "
        "steps first; median per stage from the last stage to stage 0; sampling s of every run in "
        "the JSON. switch s: host time inside "
        "the router's switch hook; with CUDA prefetching the copy runs on a side stream, so the "
        "real cost is the sampling-time difference vs resident.)"
    )
    lines += [
        "",
        "| weights resident on the device | bytes | vs release (14.6 GB fp32) |",
        "|---|---|---|",
    ]
    for r in rows:
        total = r["expert_bytes_resident_max"] + r["vae_bytes"]
        lines.append(
            f"| {r['policy']}: stage experts {_gb(r['expert_bytes_resident_max'])} + FA-VAE "
            f"{_gb(r['vae_bytes'])} ({r['dtype']}/{r['vae_dtype']}) | {_gb(total)} | "
            f"{100 * total / RELEASE_BYTES:.0f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps (4 touches every stage expert)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--vae-fp32", action="store_true", help="keep the FA-VAE in float32")
    p.add_argument("--lr-size", type=int, default=64, help="LR side (output is 8x)")
    p.add_argument("--routing", choices=["random", "average"], default="random")
    p.add_argument("--policies", nargs="+", default=["resident", "offload"],
                   choices=["resident", "offload", "offload-noprefetch"])  # fmt: skip
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per policy (interleaved); the run with the median sampling time "
                   "is reported")  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of a warm-up image before the measured one (default: 4 on CUDA, "
                   "0 on the CPU)")  # fmt: skip
    p.add_argument("--profile", metavar="PREFIX",
                   help="write PREFIX_<policy>_<dtype>.json/.txt torch.profiler files")  # fmt: skip
    p.add_argument("--config", default="moe_sr/sr8x", help="pipeline preset (random weights)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpmpp-2m", "unipc"])
    p.add_argument("--spacing", help="the sampler's timestep spacing (default: its own)")
    p.add_argument("--compile", action="store_true", help="torch.compile the stage expert UNets")
    p.add_argument("--throughput", action="store_true", help="images/s per batch size")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--images", type=int, default=8, help="images per throughput round")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--policy", help=argparse.SUPPRESS)  # internal: run one policy, print JSON
    p.add_argument("--json", help="also write the measurements to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.throughput:
        print(run_throughput(args))
        return 0
    if args.policy:
        print(json.dumps(run_policy(args)))
        return 0
    runs: dict[str, list[dict]] = {policy: [] for policy in args.policies}
    for _ in range(args.repeats):  # policies interleaved, so slow phases of a shared machine
        for policy in args.policies:  # hit all of them alike
            cmd = [sys.executable, __file__, "--policy", policy, "--device", args.device,
                   "--steps", str(args.steps), "--dtype", args.dtype,
                   "--lr-size", str(args.lr_size), "--routing", args.routing,
                   "--config", args.config, "--sampler", args.sampler]  # fmt: skip
            cmd += ["--vae-fp32"] if args.vae_fp32 else []
            cmd += ["--compile"] if args.compile else []
            cmd += ["--spacing", args.spacing] if args.spacing else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            if args.warmup_steps is not None:
                cmd += ["--warmup-steps", str(args.warmup_steps)]
            if args.profile:
                cmd += ["--profile", args.profile]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if res.returncode != 0:
                sys.stderr.write(res.stderr[-4000:])
                return 1
            runs[policy].append(json.loads(res.stdout.strip().splitlines()[-1]))
    rows = []
    for results in runs.values():  # the run with the median sampling time
        ranked = sorted(results, key=lambda r: r["sample_s"])
        row = dict(ranked[len(ranked) // 2])
        row["sample_s_runs"] = [r["sample_s"] for r in results]
        rows.append(row)
    text = report(rows, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "table": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
