"""``moe-sr-cache-latents``: encode a folder of HR images once with a training config's first stage.

    python -m ldm.cli.cache_latents --base configs/train/sr8x_unet.yaml --images data/train_hr \\
        --out data/train_latents [--device cuda] [key=value ...]

Then train from the cache (no encoder in the loop)::

    data.train:={target: latent_folder, params: {latent_dir: data/train_latents, crop_size: 256,
      flip: true, dataset: {target: sr_folder, params: {root_or_filelist: data/train_hr,
      crop_size: null, flip: false, scale: 8}}}}  model.params.first_stage=null
      model.params.scale_factor=1.0
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.cli.messages import interruptible
from ldm.config import ConfigError


@interruptible("moe-sr-cache-latents")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moe-sr-cache-latents", description=__doc__.splitlines()[0])
    p.add_argument(
        "--base", nargs="+", required=True, help="training config(s) with model.params.first_stage"
    )
    p.add_argument("--images", required=True, help="HR image folder (or .txt file list)")
    p.add_argument("--out", required=True, help="output folder of <stem>.safetensors latents")
    p.add_argument(
        "--scale", type=int, default=8, help="SR factor (images are trimmed to a multiple)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ldm.training.latent_cache import cache_latents_from_config
    from ldm.training.run import compose_config

    bases = [b for b in args.base if "=" not in b]
    overrides = [b for b in args.base if "=" in b] + args.overrides
    try:
        cfg = compose_config(bases, overrides)
        params = cfg.model.get("params", {})
        if params.get("first_stage") is None:
            raise ConfigError("the config has no model.params.first_stage to encode with")
        n = cache_latents_from_config(
            params.first_stage,
            {"target": "sr_folder", "params": {"root_or_filelist": args.images, "crop_size": None,
                                               "flip": False, "scale": args.scale}},
            args.out,
            ckpt=params.get("first_stage_ckpt"),
            ckpt_prefix=params.get("first_stage_ckpt_prefix", ""),
            device=args.device,
            overwrite=args.overwrite,
        )  # fmt: skip
    except ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(f"{n} latents written to {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
