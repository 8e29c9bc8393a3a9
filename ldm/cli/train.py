"""``moe-sr-train`` / ``scripts/train.py``: train a model from YAML configs.

latent-diffusion ``main.py`` conventions on Lightning 2.x::

    python scripts/train.py --base configs/train/tiny_sr.yaml [more.yaml] [-t] \\
        [-r RUN_DIR_OR_CKPT] [--name N] [--seed S] [--dry-run] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.checkpoint import CheckpointError
from ldm.cli.messages import interruptible, stderr_line
from ldm.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-sr-train",
        description="Train a model (diffusion UNet, stage expert, FA-VAE) from YAML configs. "
        "Configs merge left to right; key=value overrides apply last "
        "(e.g. lightning.trainer.max_steps=10 data.batch_size=4).",
    )
    p.add_argument(
        "-b", "--base", nargs="*", default=[], metavar="CFG",
        help="config files (or preset names under configs/), merged left to right",
    )  # fmt: skip
    p.add_argument(
        "-t", "--train", action="store_true",
        help="train (the default; accepted for latent-diffusion compatibility)",
    )  # fmt: skip
    p.add_argument(
        "-r", "--resume", default=None, metavar="RUN_DIR_OR_CKPT",
        help="resume a run: its folder (continues from checkpoints/last.ckpt) or a .ckpt in it",
    )  # fmt: skip
    p.add_argument("-n", "--name", default=None, help="run name (default: the first config's stem)")
    p.add_argument("-s", "--seed", type=int, default=23, help="global seed (default 23, as LDM)")
    p.add_argument("-l", "--logdir", default="logs", help="parent folder of the run folders")
    p.add_argument(
        "--no-scale-lr", dest="scale_lr", action="store_false", default=None,
        help="use base_learning_rate as it is (default: scale by accumulate*devices*nodes*batch)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotlist config overrides; key:=value replaces a whole section instead of merging",
    )  # fmt: skip
    return p


@interruptible("moe-sr-train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # --base takes several files, so it also swallows trailing key=value overrides: split them.
    bases = [b for b in args.base if "=" not in b]
    overrides = [b for b in args.base if "=" in b] + list(args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ldm.training.run import run

    try:
        out = run(
            bases,
            overrides,
            resume=args.resume,
            name=args.name,
            seed=args.seed,
            logdir=args.logdir,
            scale_lr=args.scale_lr,
            dry_run=args.dry_run,
        )
    except (ConfigError, CheckpointError) as err:
        stderr_line(f"moe-sr-train: {err}")
        return 2
    if args.dry_run:
        sys.stdout.write(str(out))
    else:
        sys.stdout.write(f"run folder: {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
