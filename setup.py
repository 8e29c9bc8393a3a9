"""moe-sr: 8x image super-resolution with latent diffusion, a sampling-space
mixture of experts and a frequency-augmented decoder (Luo et al., arXiv 2310.12004)."""

from pathlib import Path

from setuptools import find_packages, setup

# Versions here and in environment.yaml are kept equal (tests/test_packaging.py checks).
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
CORE = [
    "numpy>=1.24",
    "pillow>=10.0",
    "omegaconf>=2.3",
    "einops>=0.7",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "huggingface_hub>=0.23",
]
EXTRAS = {
    # Lightning training, logging, Real-ESRGAN degradations (basicsr: see README).
    # (scikit-image, scikit-learn, matplotlib: the demo recipe's training photographs ship in them)
    "train": [
        "lightning>=2.4",
        "tensorboard>=2.15",
        "scipy>=1.11",
        "scikit-image>=0.22",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
    ],
    # pyiqa is PolyForm Noncommercial since 2026-04: an optional extra on purpose.
    "eval": ["pyiqa==0.1.16", "scikit-image>=0.22", "scipy>=1.11"],
    # txt2img with Stable Diffusion 1.5 (FA-VAE as a drop-in decoder).
    "txt2img": ["diffusers>=0.30", "transformers>=4.40"],
    # the local web page (moe-sr-app)
    "app": ["gradio>=6.0,<7"],
    "dev": [
        "pytest>=8.0",
        "hypothesis>=6.100",  # the fuzz tests (tests/test_fuzz.py)
        "ruff==0.17.6",
        "scikit-image>=0.22",
        "diffusers>=0.30",
        "transformers>=4.40",
        # the app's browser test drives Debian's chromium (apt); no browser download
        "playwright>=1.50",
    ],
}

setup(
    name="moe-sr",
    version="0.1.0",
    description=__doc__.strip().splitlines()[0],
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm", "ldm.*", "fa_vae", "fa_vae.*", "moe_sr", "moe_sr.*"]),
    install_requires=TORCH + CORE,
    extras_require=EXTRAS,
    entry_points={
        # Modules that register config targets (ldm/registry.py imports them on demand).
        "moe_sr.registry": [
            "ldm = ldm.targets",
            "fa_vae = fa_vae.targets",
            "moe_sr = moe_sr.targets",
        ],
        "console_scripts": [
            "moe-sr = moe_sr.cli.sr:main",
            "moe-sr-train = ldm.cli.train:main",
            "moe-sr-export-expert = moe_sr.cli.export_expert:main",
            "moe-sr-cache-latents = ldm.cli.cache_latents:main",
            "moe-sr-reconstruct = ldm.cli.reconstruct:main",
            "moe-sr-eval-reconstruction = ldm.cli.eval_reconstruction:main",
            "moe-sr-eval-sr = ldm.cli.eval_sr:main",
            "moe-sr-eval = moe_sr.cli.eval_pipeline:main",
            "moe-sr-demo = moe_sr.cli.demo:main",
            "moe-sr-demo-recipe = moe_sr.cli.demo_recipe:main",
            "moe-sr-compare = ldm.cli.compare:main",
            "moe-sr-app = moe_sr.cli.app:main",
            "moe-sr-txt2img-latents = fa_vae.cli.txt2img_latents:main",
            "moe-sr-txt2img-decode = fa_vae.cli.txt2img_decode:main",
        ],
    },
)
