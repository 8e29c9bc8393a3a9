"""Decode speed and memory: our SD1.5 kl-f8 decoder against diffusers' AutoencoderKL.

Both models hold the same (random) weights, converted with the explicit key map.
A 1x4x64x64 latent (a 512x512 image) is decoded by each model in turn
(alternating which goes first every round), after one warm-up call each; we
report medians over ``--repeats`` rounds and the ratios ours / diffusers.

What is measured:

* time: wall-clock of ``model.decode(z)`` under ``torch.inference_mode()``, and
  the process CPU time of the same call (less sensitive to other jobs on a shared
  machine; it includes the small cost of the RSS sampler);
* memory: peak resident set size (RSS) during the call minus the RSS right
  before it, sampled every ``--sample-ms`` ms by a background thread from
  ``/proc/self/statm``. The process runs with ``MALLOC_MMAP_THRESHOLD_`` fixed
  (glibc otherwise raises the threshold after the first large free, so later
  calls would reuse heap pages and look smaller); the script re-executes itself
  with it set. A sampled peak can miss short spikes of less than the period.

Usage::

    python benchmarks/bench_vae.py --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def _reexec_with_fixed_mmap_threshold() -> None:
    if os.environ.get(MMAP_ENV) is None and sys.platform.startswith("linux"):
        env = dict(os.environ, **{MMAP_ENV: str(128 * 1024)})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS above the value at entry, sampled by a thread."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period_s)

    def __enter__(self) -> PeakRSS:
        self.base = _rss_bytes()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads for both models")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds (median reported)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 -> 512x512 image)")
    p.add_argument("--sample-ms", type=float, default=2.0, help="RSS sampling period")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    _reexec_with_fixed_mmap_threshold()

    import torch

    from ldm.autoencoders.diffusers_convert import to_diffusers
    from ldm.config import instantiate, load_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = instantiate(load_config("autoencoder/kl_f8")).eval()
    theirs = to_diffusers(ours).eval()
    z = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(1))

    def ours_decode():
        return ours.decode(z)

    def theirs_decode():
        return theirs.decode(z).sample

    runners = {"ours": ours_decode, "diffusers": theirs_decode}
    times: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    mems: dict[str, list[int]] = {k: [] for k in runners}
    with torch.inference_mode():
        out_a, out_b = ours_decode(), theirs_decode()  # warm-up, and check equality
        max_diff = (out_a - out_b).abs().max().item()
        del out_a, out_b
        for r in range(args.repeats):
            order = ["ours", "diffusers"] if r % 2 == 0 else ["diffusers", "ours"]
            for name in order:
                with PeakRSS(args.sample_ms / 1000) as mem:
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = runners[name]()
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                del out
                times[name].append(dt)
                cpu[name].append(dc)
                mems[name].append(mem.delta)
                print(f"round {r + 1}/{args.repeats} {name:9s} {dt:7.2f} s (cpu {dc:7.2f} s)  peak +{mem.delta / 2**20:7.0f} MiB",
                      flush=True)  # fmt: skip

    t = {k: statistics.median(v) for k, v in times.items()}
    c = {k: statistics.median(v) for k, v in cpu.items()}
    m = {k: statistics.median(v) for k, v in mems.items()}
    side = args.latent * 8
    print()
    print(f"decode 1x4x{args.latent}x{args.latent} -> {side}x{side}, SD1.5 kl-f8, random weights, "
          f"{args.threads} thread(s), torch {torch.__version__}, median of {args.repeats}")  # fmt: skip
    print(f"max |ours - diffusers| = {max_diff:.2e}")
    print()
    print("| model | wall time (s) | CPU time (s) | peak RSS delta (MiB) |")
    print("|---|---|---|---|")
    for k in runners:
        print(f"| {k} | {t[k]:.2f} | {c[k]:.2f} | {m[k] / 2**20:.0f} |")
    print(f"| ratio ours/diffusers | {t['ours'] / t['diffusers']:.3f} | "
          f"{c['ours'] / c['diffusers']:.3f} | {m['ours'] / max(1, m['diffusers']):.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
