"""``python -m moe_sr.cli.demo_recipe``: the non-training steps of ``scripts/train_demo.sh``.

python -m moe_sr.cli.demo_recipe prepare-data [--root data/demo]
python -m moe_sr.cli.demo_recipe examples [--out assets/examples]
python -m moe_sr.cli.demo_recipe export-autoencoder RUN/checkpoints/last.ckpt OUT.safetensors
python -m moe_sr.cli.demo_recipe evaluate --weights-dir assets/demo [--steps 50] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEMO_CONFIG = "demo/sr8x_demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-sr-demo-recipe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("prepare-data", help="write the scikit-image photographs (train/holdout)")
    d.add_argument("--root", default="data/demo", help="output folder (default data/demo)")
    d.add_argument("--fa-crops", type=int, default=32, help="crops for the FA fine-tuning")
    d.add_argument("--seed", type=int, default=0, help="seed of the crop positions")

    e = sub.add_parser("examples", help="cut the bundled LR/HR examples from held-out photos")
    e.add_argument("--out", default="assets/examples")

    x = sub.add_parser("export-autoencoder", help="autoencoder_gan .ckpt -> our .safetensors")
    x.add_argument("ckpt")
    x.add_argument("out")

    f = sub.add_parser("init-fa-vae", help="plain VQ .safetensors -> FA-VAE (FA parts at init)")
    f.add_argument("autoencoder")
    f.add_argument("out")
    f.add_argument("--config", default="demo/autoencoder", help="FA-VAE preset or YAML")

    r = sub.add_parser("release", help="copy weight files as float16 (metadata kept)")
    r.add_argument("files", nargs="+")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])

    v = sub.add_parser(
        "evaluate", help="the demo model's quality checks on the held-out photographs (exit 3: a "
        "target is missed)"
    )  # fmt: skip
    v.add_argument("--weights-dir", default="assets/demo")
    v.add_argument("--config", default=DEMO_CONFIG, help="pipeline preset or YAML")
    v.add_argument("--holdout", default="data/demo/holdout")
    v.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the config's)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--markdown", default=None, help="write the table here (e.g. RESULTS.md)")
    v.add_argument("--json", default=None, help="write the per-image rows here")
    v.add_argument("--sr-out", default=None, help="write the SR images into this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from moe_sr import demo_recipe as recipe

    if args.command == "prepare-data":
        out = recipe.prepare_demo_data(args.root, fa_crops=args.fa_crops, seed=args.seed)
        sys.stdout.write(" ".join(f"{k}: {len(v)}" for k, v in out.items()) + f" in {args.root}\n")
    elif args.command == "examples":
        for path in recipe.make_examples(args.out):
            sys.stdout.write(f"{path}\n")
    elif args.command == "export-autoencoder":
        from moe_sr.export import export_autoencoder

        sys.stdout.write(f"{export_autoencoder(args.ckpt, args.out)}\n")
    elif args.command == "init-fa-vae":
        from fa_vae.model import fa_vae_from_autoencoder

        out = fa_vae_from_autoencoder(args.autoencoder, args.config, args.out)
        sys.stdout.write(f"{out}\n")
    elif args.command == "release":
        from moe_sr.export import release_copy

        for f in args.files:
            out = release_copy(f, Path(args.out) / Path(f).name, dtype=args.dtype)
            sys.stdout.write(f"{out}\n")
    elif args.command == "evaluate":
        from ldm.atomic import write_text
        from moe_sr import demo_eval
        from moe_sr.build import build_pipeline_from_folder

        pipe = build_pipeline_from_folder(args.weights_dir, args.config, device=args.device)
        report = demo_eval.evaluate_images(
            pipe, demo_eval.holdout_pairs(args.holdout), steps=args.steps, sr_out=args.sr_out
        )
        table = demo_eval.results_markdown(report, settings=pipe.describe_sampling(args.steps))
        sys.stdout.write(table)
        payload = {"rows": report.rows, "codebook_usage": report.codebook_usage,
                   "checks": report.checks}  # fmt: skip
        for path, text in ((args.markdown, table), (args.json, json.dumps(payload, indent=1))):
            if path:
                write_text(path, text.rstrip("\n") + "\n")
        return 0 if report.passed else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
