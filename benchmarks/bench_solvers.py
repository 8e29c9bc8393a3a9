"""Quality and time of the samplers on a trained model (not a test): DDIM vs few-step solvers.

For each sampler setting, 8x SR of the held-out LR images (``assets/examples/lr``) with the
given model, then LPIPS / DISTS / PSNR against the HR images (``assets/examples/hr``, by name)
with ``ldm.evaluation.evaluate``, and the wall time per image (sampling + decode, the thread
count is printed). Every setting uses the same seeds; DDIM with eta 1 (the release) is
stochastic, so ``--seeds 42 43 44`` averages over noise draws.

    # the issue's table on the demo model (after its retraining), one thread:
    OMP_NUM_THREADS=1 python benchmarks/bench_solvers.py --threads 1 \\
        --out runs/bench_solvers --seeds 42 43 44
    # a quick check of the script (tiny settings)
    python benchmarks/bench_solvers.py --settings ddim:4 unipc:3 --limit 1

Settings are ``SAMPLER:STEPS[:SPACING]`` (``ddim:200`` is the release: eta 1, LDM's grid).
Writes ``OUT/results.json`` and ``OUT/table.md`` (and the SR images with ``--save``).

``--analytic``: no model, the accuracy of the samplers on Gaussian data (``x_0 ~ N(mu, s^2)``
per element, where the optimal eps and the exact ODE solution are closed-form; the case
``tests/test_solvers.py`` asserts): RMS distance to the exact solution from ``t = 999``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_SETTINGS = [
    "ddim:200", "ddim:25",
    "dpmpp-2m:10", "dpmpp-2m:15", "dpmpp-2m:25",
    "unipc:10", "unipc:15", "unipc:25",
]  # fmt: skip
METRICS = ("lpips", "dists", "psnr")


def parse_setting(text: str) -> tuple[str, int, str | None]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise SystemExit(f"bench_solvers: setting {text!r} is not SAMPLER:STEPS[:SPACING]")
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None


def load_pairs(lr_dir: Path, hr_dir: Path, limit: int | None) -> list[tuple[str, object, object]]:
    from ldm.data.image_io import read_image

    names = sorted(p.name for p in lr_dir.iterdir() if (hr_dir / p.name).is_file())
    if not names:
        raise SystemExit(f"bench_solvers: no LR images in {lr_dir} with an HR image in {hr_dir}")
    return [(n, read_image(lr_dir / n), read_image(hr_dir / n)) for n in names[:limit]]


def run(args: argparse.Namespace) -> list[dict]:
    from ldm.evaluation.evaluate import evaluate
    from moe_sr.build import build_pipeline_from_folder

    pipe = build_pipeline_from_folder(args.weights_dir, args.config, device=args.device)
    pairs = load_pairs(Path(args.lr), Path(args.hr), args.limit)
    out = Path(args.out)
    rows = []
    for setting in args.settings:
        sampler, steps, spacing = parse_setting(setting)
        eta = 1.0 if sampler == "ddim" else None
        preds, refs, times = [], [], []
        for seed in args.seeds:
            for name, lr, hr in pairs:
                start = time.perf_counter()
                res = pipe(lr, sampler=sampler, steps=steps, spacing=spacing, eta=eta, seed=seed)
                times.append(time.perf_counter() - start)
                if res.image.shape != hr.shape:
                    raise SystemExit(f"{name}: SR {tuple(res.image.shape)} vs HR {tuple(hr.shape)}")
                preds.append(res.image)
                refs.append(hr)
                if args.save:
                    from ldm.data.image_io import write_image

                    write_image(
                        res.image, out / "sr" / setting.replace(":", "_") / f"{seed}_{name}"
                    )
        scores: dict[str, list[float]] = {m: [] for m in METRICS}
        for p, r in zip(preds, refs):
            report = evaluate(p[None], r[None], METRICS, weights_dir=args.metric_weights_dir)
            for m in METRICS:
                scores[m].append(float(report.summary[m]))
        row = {
            "setting": setting,
            "sampler": sampler,
            "steps": steps,
            "spacing": spacing,
            "evaluations": steps,
            **{m: statistics.fmean(v) for m, v in scores.items()},
            "s_per_image": statistics.median(times),
            "images": len(preds),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def analytic(steps_list: tuple[int, ...] = (10, 15, 20, 25)) -> str:
    """RMS error against the exact probability-flow solution on Gaussian data."""
    from ldm.diffusion.ddim import ddim_sample
    from ldm.diffusion.samplers import run_sampler
    from ldm.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule.linear()
    ac = schedule.alphas_cumprod
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    sd = torch.tensor([0.3, 0.05, 1.0], dtype=torch.float64).view(1, 3, 1, 1)

    def eps(x_t, t, cond):
        a = ac[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * sd**2 + (1 - a))

    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a0, a1 = ac[0], ac[999]
    exact = (
        a0.sqrt() * mu
        + (a0 * sd**2 + 1 - a0).sqrt() * (x_T - a1.sqrt() * mu) / (a1 * sd**2 + 1 - a1).sqrt()
    )

    def err(x):
        return ((x - exact) ** 2).mean().sqrt().item()

    ddim200 = err(ddim_sample(eps, schedule, x_T, None, steps=200, eta=0.0))
    lines = [
        f"RMS error vs the exact solution (DDIM-200, eta 0: {ddim200:.2e})",
        "",
        "| steps | DDIM eta 0 (LDM grid) | DPM-Solver++(2M) | UniPC |",
        "|---:|---:|---:|---:|",
    ]
    for n in steps_list:
        row = [err(ddim_sample(eps, schedule, x_T, None, steps=n, eta=0.0))]
        row += [
            err(run_sampler(s, eps, schedule, x_T, None, steps=n)) for s in ("dpmpp-2m", "unipc")
        ]
        lines.append(f"| {n} | " + " | ".join(f"{v:.2e}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict], reference: str = "ddim:200") -> str:
    ref = next((r for r in rows if r["setting"] == reference), None)
    lines = [
        "| sampler | steps (NFE) | LPIPS ↓ | ΔLPIPS vs DDIM-200 | DISTS ↓ | PSNR ↑ (dB) | s / image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "—" if ref is None or r is ref else f"{r['lpips'] - ref['lpips']:+.4f}"
        name = r["sampler"] + (f" ({r['spacing']})" if r["spacing"] else "")
        lines.append(
            f"| {name} | {r['steps']} | {r['lpips']:.4f} | {delta} | {r['dists']:.4f} | "
            f"{r['psnr']:.2f} | {r['s_per_image']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights-dir", default="assets/demo", help="folder of our safetensors")
    p.add_argument("--config", default="demo/sr8x_demo", help="pipeline preset of the weights")
    p.add_argument("--lr", default="assets/examples/lr")
    p.add_argument("--hr", default="assets/examples/hr")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, metavar="SAMPLER:STEPS")
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--metric-weights-dir", help="offline metric weights (default: the cache)")
    p.add_argument("--out", default="runs/bench_solvers")
    p.add_argument("--save", action="store_true", help="also write the SR images")
    p.add_argument("--analytic", action="store_true", help="Gaussian-data accuracy, no model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.analytic:
        sys.stdout.write(analytic())
        return 0
    for s in args.settings:
        parse_setting(s)
    print(
        f"bench_solvers: {platform.node()} {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}, "
        f"weights {args.weights_dir}, seeds {args.seeds}",
        flush=True,
    )
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (out / "table.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
