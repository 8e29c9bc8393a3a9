"""The demo model's recipe: training data from photographs that ship inside Python packages.

``scripts/train_demo.sh`` runs these steps around ``scripts/train.py``:

1. :func:`prepare_demo_data` writes the photographs of :data:`TRAIN_IMAGES` and
   :data:`HOLDOUT_IMAGES` (no download) as HR PNGs (trimmed to a multiple of 8) and their MATLAB-bicubic x1/8 LR images:
   ``<root>/train/{hr,lr}``, ``<root>/holdout/{hr,lr}`` (never trained on) and
   ``<root>/fa_crops/{hr,lr}`` (fixed training crops on which the experts generate the latents
   that the FA decoder is fine-tuned on). Deterministic: same files on every run.
2. the exports (autoencoder and stage expert checkpoints -> safetensors, the float16 release
   copies that ``assets/demo`` holds) are :mod:`moe_sr.export`, the FA-VAE start from the plain
   autoencoder :func:`fa_vae.model.fa_vae_from_autoencoder`, the held-out evaluation
   :mod:`moe_sr.demo_eval`.

:func:`make_examples` cuts the small LR / HR example pairs bundled in ``assets/examples``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SCALE = 8
#: Training photographs: (file stem, source). Sources are ``skimage:<skimage.data function>``
#: (``[i]`` indexes a tuple result) or ``<package>:<file inside the installed package>``; all
#: ship inside the wheels, no download. ``skimage:cat`` is the same photo as ``chelsea`` (held
#: out), so it is used nowhere. Licences: scikit-image's data is public domain / CC0 (see
#: skimage/data/README.txt); matplotlib's ``grace_hopper.jpg`` is a US Navy photograph (public
#: domain); scikit-learn's ``china.jpg`` (danielbuechele) and ``flower.jpg`` (vultilion) are
#: CC BY 2.0 (sklearn/datasets/images/README.txt).
TRAIN_IMAGES: tuple[tuple[str, str], ...] = (
    ("astronaut", "skimage:astronaut"),
    ("immunohistochemistry", "skimage:immunohistochemistry"),
    ("hubble_deep_field", "skimage:hubble_deep_field"),
    ("retina", "skimage:retina"),
    ("colorwheel", "skimage:colorwheel"),
    ("logo", "skimage:logo"),
    ("motorcycle_left", "skimage:stereo_motorcycle[0]"),
    ("motorcycle_right", "skimage:stereo_motorcycle[1]"),
    ("grace_hopper", "matplotlib:mpl-data/sample_data/grace_hopper.jpg"),
    ("china", "sklearn:datasets/images/china.jpg"),
    ("flower", "sklearn:datasets/images/flower.jpg"),
    ("camera", "skimage:camera"),
    ("brick", "skimage:brick"),
    ("grass", "skimage:grass"),
    ("gravel", "skimage:gravel"),
    ("moon", "skimage:moon"),
    ("text", "skimage:text"),
    ("clock", "skimage:clock"),
    ("coins", "skimage:coins"),
)
#: Held-out photographs: evaluation and the bundled examples only.
HOLDOUT_IMAGES: tuple[tuple[str, str], ...] = (
    ("coffee", "skimage:coffee"),
    ("chelsea", "skimage:chelsea"),
    ("rocket", "skimage:rocket"),
)
#: Bundled examples: (held-out stem, top, left) of a 256 x 256 HR crop (LR 32 x 32).
EXAMPLE_CROPS: tuple[tuple[str, int, int], ...] = (
    ("coffee", 72, 176),
    ("chelsea", 24, 104),
    ("rocket", 96, 256),
)


def package_photo(source: str) -> np.ndarray:
    """The photograph ``source`` names (see :data:`TRAIN_IMAGES`) as RGB uint8 ``HWC``
    (grey -> 3 channels, RGBA over white)."""
    import importlib
    import re

    kind, _, name = source.partition(":")
    if kind == "skimage":
        import skimage.data

        m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", name)
        if m is None:
            raise ValueError(f"bad skimage source {source!r}")
        img = getattr(skimage.data, m[1])()
        if m[2] is not None:
            img = img[int(m[2])]
    else:
        from PIL import Image

        try:
            package = importlib.import_module(kind)
        except ImportError:
            raise ImportError(
                f"the demo photograph {source} ships inside the {kind!r} package: "
                "pip install -e '.[train]'"
            ) from None
        with Image.open(Path(package.__file__).parent / name) as f:
            img = f.convert("RGBA" if f.mode in ("RGBA", "LA", "P") else "RGB")
    return _rgb_u8(np.asarray(img), source)


def is_colour(img: np.ndarray, tolerance: int = 2) -> bool:
    """Whether an RGB uint8 image has colour (some channel differs from another)."""
    a = img.astype(np.int16)
    return (
        int(np.abs(a[..., 0] - a[..., 1]).max()) > tolerance
        or int(np.abs(a[..., 1] - a[..., 2]).max()) > tolerance
    )


def _rgb_u8(img: np.ndarray, source: str) -> np.ndarray:
    if img.dtype != np.uint8:
        raise ValueError(f"{source} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[-1] == 4:  # composite over white (the logo's transparent background)
        alpha = img[..., 3:].astype(np.float64) / 255.0
        img = np.round(img[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(img[..., :3])


def trim_to_multiple(img: np.ndarray, multiple: int = SCALE) -> np.ndarray:
    """Centre-trim ``HWC`` so that H and W are multiples of ``multiple``."""
    h, w = img.shape[:2]
    nh, nw = (h // multiple) * multiple, (w // multiple) * multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return img[top : top + nh, left : left + nw]


def downscale(hr: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """MATLAB-bicubic ``1/scale`` of a uint8 ``HWC`` image (the training data's LR)."""
    from ldm.data.resize import imresize

    h, w = hr.shape[:2]
    return imresize(hr, output_shape=(h // scale, w // scale))


def _shrink(img: np.ndarray, max_side: int) -> np.ndarray:
    """Halve ``img`` (MATLAB bicubic, antialiased) until its longer side is <= ``max_side``."""
    from ldm.data.resize import imresize

    while max(img.shape[:2]) > max_side:
        img = imresize(img, output_shape=(img.shape[0] // 2, img.shape[1] // 2))
    return img


def _write_pairs(folder: Path, images: Mapping[str, np.ndarray]) -> list[Path]:
    """``folder/hr/<stem>.png`` (trimmed to a multiple of 8) and its x1/8 ``folder/lr/<stem>.png``
    for every image; returns the HR paths."""
    from ldm.data.image_io import write_image

    out = []
    for stem, hr in images.items():
        hr = trim_to_multiple(hr)
        out.append(write_image(hr, folder / "hr" / f"{stem}.png"))
        write_image(downscale(hr), folder / "lr" / f"{stem}.png")
    return out


def random_crops(
    images: Mapping[str, np.ndarray], n: int, size: int, seed: int
) -> dict[str, np.ndarray]:
    """``n`` crops ``size x size`` (top/left multiples of 8) spread over ``images`` (seeded)."""
    rng = np.random.default_rng(seed)
    names = sorted(images)
    out = {}
    for i in range(n):
        name = names[i % len(names)]
        img = images[name]
        h, w = img.shape[:2]
        if h < size or w < size:
            raise ValueError(f"{name} ({h}x{w}) is smaller than the crop size {size}")
        top = int(rng.integers(0, (h - size) // SCALE + 1)) * SCALE
        left = int(rng.integers(0, (w - size) // SCALE + 1)) * SCALE
        out[f"{name}_{i:03d}"] = img[top : top + size, left : left + size]
    return out


def prepare_demo_data(
    root: str | os.PathLike = "data/demo",
    *,
    fa_crops: int = 32,
    fa_crop_size: int = 128,
    seed: int = 0,
    max_side: int = 800,
    repeats: int = 16,
) -> dict[str, list[Path]]:
    """Write the demo data under ``root`` (see the module docstring); returns the HR paths.

    Training photographs longer than ``max_side`` are halved (MATLAB bicubic) so that reading
    them stays cheap; ``train/epoch.txt`` lists every training photograph ``repeats`` times and
    ``train/colour.txt`` only the colour ones (the autoencoder's training set: with half of the
    photographs grey, a small autoencoder learns to spend its 3-channel latent on luminance).
    Files are rewritten on every call (the content is deterministic), so a partial earlier run
    is repaired. The held-out photographs never enter ``train`` or ``fa_crops``.
    """
    from ldm.atomic import write_text

    root = Path(root)
    train = {stem: _shrink(package_photo(src), max_side) for stem, src in TRAIN_IMAGES}
    holdout = {stem: package_photo(src) for stem, src in HOLDOUT_IMAGES}
    overlap = set(train) & set(holdout)
    if overlap:  # a guard for edits of the tables above
        raise ValueError(f"images both in training and held out: {sorted(overlap)}")
    out = {
        "train": _write_pairs(root / "train", train),
        "holdout": _write_pairs(root / "holdout", holdout),
        "fa_crops": _write_pairs(
            root / "fa_crops", random_crops(train, fa_crops, fa_crop_size, seed)
        ),
    }
    # One epoch = every training photograph `repeats` times (random crops differ each time):
    # fewer epoch restarts for a dataset of 16 files.
    colour = [p.name for p in out["train"] if is_colour(train[p.stem])]
    for name, files, what in (
        ("epoch.txt", [p.name for p in out["train"]], "every training photograph"),
        ("colour.txt", colour, "the colour training photographs"),
    ):
        write_text(
            root / "train" / name,
            f"# {what}, repeated (see moe_sr.demo_recipe.prepare_demo_data)\n"
            + "".join(f"hr/{f}\n" for f in files * repeats),
        )
    logger.info(
        "demo data in %s: %d train, %d held-out, %d FA crops",
        root, len(out["train"]), len(out["holdout"]), len(out["fa_crops"]),
    )  # fmt: skip
    return out


def make_examples(
    out_dir: str | os.PathLike = "assets/examples",
    crops: Sequence[tuple[str, int, int]] = EXAMPLE_CROPS,
    size: int = 256,
) -> list[Path]:
    """Held-out HR crops (``hr/<name>.png``) and their x1/8 LR images (``lr/<name>.png``)."""
    out_dir = Path(out_dir)
    photos = dict(HOLDOUT_IMAGES)
    cut = {}
    for stem, top, left in crops:
        if stem not in photos:
            raise ValueError(f"{stem} is not a held-out photograph ({sorted(photos)})")
        cut[stem] = package_photo(photos[stem])[top : top + size, left : left + size]
        if cut[stem].shape[:2] != (size, size):
            raise ValueError(f"crop ({top}, {left}, {size}) does not fit {stem}")
    return [out_dir / "lr" / p.name for p in _write_pairs(out_dir, cut)]
