"""Data section of a training config -> a LightningDataModule; sample training images.

Config layout (``data:``)::

    data:
      batch_size: 8
      num_workers: 4
      train: {target: sr_folder, params: {...}}
      validation: {target: sr_folder, params: {...}}     # optional
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.atomic import atomic_write
from ldm.config import ConfigError, instantiate, to_plain
from ldm.registry import register

logger = logging.getLogger(__name__)

#: Photographs bundled inside the scikit-image wheel (no download needed).
SKIMAGE_SAMPLES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "camera",
)


class DataModuleFromConfig(L.LightningDataModule):
    """Train (and optional validation) datasets from ``{target, params}`` mappings."""

    def __init__(
        self,
        batch_size: int,
        train: Mapping[str, Any],
        validation: Mapping[str, Any] | None = None,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.train_cfg = to_plain(train)
        self.val_cfg = to_plain(validation)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.train_set = None
        self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = instantiate(self.train_cfg)
            if len(self.train_set) < self.batch_size and self.drop_last:
                raise ConfigError(
                    f"the training set has {len(self.train_set)} items, fewer than one batch "
                    f"({self.batch_size}); add images or lower data.batch_size"
                )
        if self.val_cfg is not None and self.val_set is None:
            self.val_set = instantiate(self.val_cfg)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    @property
    def has_validation(self) -> bool:
        return self.val_cfg is not None


def build_datamodule(cfg: Mapping[str, Any]) -> DataModuleFromConfig:
    cfg = dict(to_plain(cfg) or {})
    if "train" not in cfg or "batch_size" not in cfg:
        raise ConfigError("the 'data' section needs at least 'batch_size' and 'train'")
    try:
        return DataModuleFromConfig(**cfg)
    except TypeError as err:
        raise ConfigError(f"bad 'data' section: {err}") from None


def write_sample_images(
    folder: str | os.PathLike, names: tuple[str, ...] = SKIMAGE_SAMPLES
) -> Path:
    """Fill ``folder`` with scikit-image's bundled photographs (PNG) unless it holds images.

    For the tiny training config and demos on a fresh clone; returns the folder.
    """
    import numpy as np
    import skimage.data
    from PIL import Image

    folder = Path(folder)
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
    if folder.is_dir() and any(p.suffix.lower() in exts for p in folder.iterdir()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3].astype(np.uint8)
        with atomic_write(folder / f"{name}.png") as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    logger.info("wrote %d sample images to %s", len(names), folder)
    return folder


@register("sample_image_folder")
def sample_image_folder(folder: str, dataset: Mapping[str, Any]) -> Any:
    """Write the sample photographs into ``folder`` if empty, then build ``dataset`` over it.

    ``dataset`` is a ``{target, params}`` mapping whose folder parameter is filled in by
    interpolation in the config (e.g. ``root: ${data.sample_folder}``).
    """
    write_sample_images(folder)
    return instantiate(dataset)


class LatentFolderDataset(Dataset):
    """Items of ``dataset`` plus ``latent``: ``<latent_dir>/<image stem>.safetensors`` (key
    ``latent``, ``[C, h, w]``), as ``moe-sr --save-latents`` writes them.

    Two uses: the FA-VAE recipe decodes latents that the diffusion model generated for each
    training image; diffusion training reads HR encodings cached by ``moe-sr-cache-latents``.
    Build ``dataset`` over whole images (no random crop, no flip); ``crop_size`` (HR pixels) then
    takes one random crop aligned across every tensor (each cropped at its own scale relative to
    ``hr``) and ``flip`` a random horizontal flip of all of them.
    """

    def __init__(
        self,
        dataset: Mapping[str, Any],
        latent_dir: str | os.PathLike,
        crop_size: int | None = None,
        flip: bool = False,
        hr_key: str = "hr",
        seed: int | None = None,
    ):
        self.base = instantiate(dataset)
        self.flip = flip
        self.latent_dir = Path(latent_dir)
        if not self.latent_dir.is_dir():
            raise ConfigError(f"latent_dir {self.latent_dir} does not exist")
        self.crop_size = crop_size
        self.hr_key = hr_key
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def _latent(self, image_path: str) -> torch.Tensor:
        from safetensors.torch import load_file

        path = self.latent_dir / (Path(image_path).stem + ".safetensors")
        if not path.is_file():
            raise FileNotFoundError(
                f"no latent for {image_path}: expected {path} (generate it with "
                "`moe-sr ... --save-latents` over the LR images of the training set)"
            )
        z = load_file(str(path))["latent"]
        return z[0] if z.ndim == 4 else z

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[index])
        if "path" not in item:
            raise KeyError("the wrapped dataset must return the image 'path' to find its latent")
        z = self._latent(item["path"]).float()
        hr = item[self.hr_key]
        f_h, f_w = hr.shape[-2] / z.shape[-2], hr.shape[-1] / z.shape[-1]
        if f_h != f_w or f_h != int(f_h):
            raise ValueError(
                f"latent {tuple(z.shape)} does not fit the HR image {tuple(hr.shape)} of "
                f"{item['path']} (expected an integer downsampling factor)"
            )
        item["latent"] = z
        g = (
            torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            if self.seed is not None
            else None
        )
        if self.flip and bool(torch.rand((), generator=g) < 0.5):
            for k, t in list(item.items()):
                if torch.is_tensor(t) and t.ndim == 3:
                    item[k] = t.flip(-1)
        if self.crop_size is None:
            return item
        H, W = hr.shape[-2:]
        cs = self.crop_size
        if cs > min(H, W):
            raise ValueError(f"crop_size {cs} is larger than the image {H}x{W} ({item['path']})")
        step = max(int(hr.shape[-2] / t.shape[-2]) for t in item.values() if torch.is_tensor(t))
        top = int(torch.randint(0, (H - cs) // step + 1, (1,), generator=g)) * step
        left = int(torch.randint(0, (W - cs) // step + 1, (1,), generator=g)) * step
        for k, t in list(item.items()):
            if torch.is_tensor(t) and t.ndim == 3:
                s = H // t.shape[-2]
                if cs % s:
                    raise ValueError(f"crop_size {cs} is not a multiple of {k}'s factor {s}")
                item[k] = t[:, top // s : (top + cs) // s, left // s : (left + cs) // s]
        return item


register("latent_folder")(LatentFolderDataset)
