"""``moe-sr-export-expert``: a stage-expert training checkpoint -> stage expert safetensors.

    python -m moe_sr.cli.export_expert logs/<run>/checkpoints/last.ckpt experts/stage2.safetensors

Writes the EMA UNet weights (``--weights raw`` for the raw ones) with the UNet config, the stage
index, the number of stages and the timestep interval in the metadata, the format that
``moe-sr --weights-dir`` and ``moe_sr.checkpoints.load_expert`` read.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.checkpoint import CheckpointError
from ldm.cli.messages import interruptible
from ldm.config import ConfigError


@interruptible("moe-sr-export-expert")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moe-sr-export-expert", description=__doc__.splitlines()[0])
    p.add_argument(
        "ckpt", help="Lightning checkpoint of a stage run (e.g. <run>/checkpoints/last.ckpt)"
    )
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.out.endswith(".safetensors"):
        sys.stderr.write("error: the output file must end in .safetensors\n")
        return 2
    from moe_sr.export import export_stage_expert

    try:
        path = export_stage_expert(args.ckpt, args.out, weights=args.weights)
    except (CheckpointError, ConfigError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
