"""SR training/validation datasets: HR folders (LR made on the fly) and paired LR/HR folders.

Every item is a dict of ``CHW`` float32 tensors in [-1, 1] plus the source path:

- ``hr``      ``[3, H, W]``          the (cropped, flipped) HR image;
- ``lr``      ``[3, H/s, W/s]``      the LR image (``s`` = ``scale``, 8 for the 8x model);
- ``lr_up2``  ``[3, 2H/s, 2W/s]``    LR MATLAB-bicubic x2: the UNet's concat condition at
  latent size for a vq-f4 first stage (``H/4`` for ``s = 8``);
- ``lr_up8``  ``[3, H, W]``          LR MATLAB-bicubic back to HR size: the FA-VAE encoder input;
- ``path``    ``str``.

This mirrors the official training data (``basicsr/data/my_div2k_dataset.py``,
``PAIREDDIV2KDataset``): HR read as uint8, random crop, horizontal flip, LR =
``imresize(hr_u8, output_shape=(H/8, W/8))`` on uint8, and the two upsampled LR images made from
the uint8 LR, also on uint8 (rounding after every 1-D pass, see :mod:`ldm.data.resize`). With
``uint8=False`` everything stays float32 instead (keeps 16-bit HR precision; LR clipped to
[0, 1]).

Unreadable or unusable images (corrupt files, HR smaller than the crop, LR/HR size mismatch) are
skipped with a warning and counted in ``num_skipped`` (per process: each DataLoader worker
counts its own); the next index is served instead. Only when every file fails does
``__getitem__`` raise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.image_io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    list_images,
    read_image,
    to_uint8_hwc,
)
from ldm.data.resize import imresize_np, imresize_torch
from ldm.data.sr_inputs import uint8_to_signed
from ldm.registry import register

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "SRFolderDataset", "PairedFolderDataset", "collect_image_paths"]


PathLike = str | os.PathLike
#: ``degradation(hr, scale, generator) -> lr``: float ``[3,H,W]`` in [0,1] -> ``[3,H/s,W/s]``
Degradation = Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]


class SampleError(ValueError):
    """One image cannot be used (the dataset skips it)."""


# ------------------------------------------------------------------------------ file lists


def collect_image_paths(source: PathLike | Sequence[PathLike]) -> list[Path]:
    """Image paths from a folder (sorted), a ``.txt`` list (one path per line, relative paths
    resolved against the list's folder, ``#`` comments allowed), or a sequence of these."""
    if isinstance(source, (str, os.PathLike)):
        sources = [source]
    else:
        sources = list(source)
    paths: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            paths.extend(list_images(p))
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line).expanduser()
                    paths.append(entry if entry.is_absolute() else p.parent / entry)
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            paths.append(p)
        else:
            raise FileNotFoundError(
                f"{str(src)!r} is neither a folder, an image, nor a .txt list of image paths"
            )
    if not paths:
        raise FileNotFoundError(
            f"no images found in {[str(s) for s in sources]} (extensions {IMAGE_EXTENSIONS})"
        )
    return paths


# ------------------------------------------------------------------------------ image reading


def _u8_to_signed(img_u8: np.ndarray) -> torch.Tensor:
    """uint8 ``HWC`` -> float32 ``CHW`` in [-1, 1] (:func:`ldm.data.sr_inputs.uint8_to_signed`)."""
    return uint8_to_signed(img_u8)[0]


# ------------------------------------------------------------------------------ base


def _check_scale_and_crop(scale: int, crop_size: int | None) -> None:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if crop_size is not None and (crop_size < scale or crop_size % scale):
        raise ValueError(
            f"crop_size {crop_size} must be a positive multiple of scale {scale} "
            f"(e.g. {max(scale, (crop_size // scale) * scale)})"
        )


class _SkippingDataset(Dataset):
    """Serves ``_load(index)``; on :class:`SampleError` / read failures tries the next index."""

    paths: list[Path]

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.num_skipped = 0
        self.bad_paths: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _generator(self, index: int) -> torch.Generator | None:
        """Per-item generator when seeded (same crop for an index every epoch), else None."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed * 1_000_003 + index)

    def _load(self, index: int, generator: torch.Generator | None) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        last_error = ""
        for attempt in range(n):
            i = (index + attempt) % n
            key = str(self.paths[i])
            if key in self.bad_paths:
                continue
            try:
                return self._load(i, self._generator(i))
            except Exception as err:
                if not _is_unusable_image_error(err):
                    raise  # a bug, not a bad file
                last_error = f"{key}: {err}"
                self.bad_paths[key] = str(err)
                self.num_skipped += 1
                logger.warning("skipping unusable image %s (%s)", key, err)
        raise RuntimeError(
            f"{type(self).__name__}: all {n} images failed to load; last error: {last_error}"
            if last_error
            else f"{type(self).__name__}: all {n} images were already marked unusable: "
            f"{list(self.bad_paths.items())[:3]} ..."
        )


class _CropDataset(_SkippingDataset):
    """:class:`_SkippingDataset` with the crop and augmentation settings of the SR datasets
    (see :class:`SRFolderDataset` for their meaning)."""

    def __init__(
        self,
        seed: int | None,
        scale: int,
        crop_size: int | None,
        flip: bool,
        rot90: bool,
        random_crop: bool,
        uint8: bool,
    ) -> None:
        super().__init__(seed)
        _check_scale_and_crop(scale, crop_size)
        self.scale = scale
        self.crop_size = crop_size
        self.flip = flip
        self.rot90 = rot90
        self.random_crop = random_crop
        self.uint8 = uint8


def _is_unusable_image_error(err: Exception) -> bool:
    """Errors that mean "this file cannot be used": IO/decoding errors (PIL raises OSError,
    SyntaxError, ValueError, DecompressionBombError; image_io raises ImageReadError) and
    :class:`SampleError`."""
    if isinstance(err, (SampleError, ImageReadError, OSError, ValueError, SyntaxError)):
        return True
    return type(err).__name__ == "DecompressionBombError"


def _crop_flip_params(
    hw: tuple[int, int],
    crop_hw: tuple[int, int],
    flip: bool,
    rot90: bool,
    generator: torch.Generator | None,
    random_crop: bool,
) -> tuple[int, int, bool, bool, bool]:
    """``(top, left, hflip, vflip, transpose)`` for a ``crop_hw`` window of an ``hw`` image."""
    (h, w), (ch, cw) = hw, crop_hw
    if ch > h or cw > w:
        raise SampleError(f"image {h}x{w} is smaller than the crop {ch}x{cw}")

    def rand(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator).item())

    top = rand(h - ch + 1) if random_crop else (h - ch) // 2
    left = rand(w - cw + 1) if random_crop else (w - cw) // 2
    hflip = flip and rand(2) == 1
    vflip = rot90 and rand(2) == 1
    transpose = rot90 and rand(2) == 1
    return top, left, hflip, vflip, transpose


def _apply_flips(x: torch.Tensor, hflip: bool, vflip: bool, transpose: bool) -> torch.Tensor:
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if transpose:
        x = x.transpose(-1, -2)
    return x


def _lr_products(lr: torch.Tensor, hr_hw: tuple[int, int], use_u8: bool) -> dict[str, torch.Tensor]:
    """``lr`` float [3,h,w] in [0,1] -> lr, lr_up2, lr_up8 in [-1,1]."""
    h, w = lr.shape[-2:]
    if use_u8:
        lr_u8 = to_uint8_hwc(lr)
        up2 = imresize_np(lr_u8, output_shape=(2 * h, 2 * w))
        up8 = imresize_np(lr_u8, output_shape=hr_hw)
        return {
            "lr": _u8_to_signed(lr_u8),
            "lr_up2": _u8_to_signed(up2),
            "lr_up8": _u8_to_signed(up8),
        }
    lr = lr.clamp(0, 1)
    up2 = imresize_torch(lr[None], output_shape=(2 * h, 2 * w))[0].clamp(0, 1)
    up8 = imresize_torch(lr[None], output_shape=hr_hw)[0].clamp(0, 1)
    return {"lr": lr * 2 - 1, "lr_up2": up2 * 2 - 1, "lr_up8": up8 * 2 - 1}


def _build_degradation(degradation: Degradation | Mapping[str, Any] | None) -> Degradation | None:
    if degradation is None or callable(degradation):
        return degradation
    if isinstance(degradation, Mapping):
        from ldm.config import instantiate

        return instantiate(degradation)
    raise TypeError(
        f"degradation must be None, a callable or a {{target, params}} mapping, got {degradation!r}"
    )


# ------------------------------------------------------------------------------ datasets


@register("sr_folder")
class SRFolderDataset(_CropDataset):
    """HR images -> (crop, flip) -> LR by MATLAB bicubic ``1/scale`` (or a degradation).

    Args:
        root_or_filelist: folder, ``.txt`` list of paths, image path, or a list of these.
        crop_size: HR crop side (a multiple of ``scale``); ``None`` keeps the whole image,
            center-cropped down to a multiple of ``scale``.
        scale: SR factor (8 for the 8x model).
        flip: random horizontal flip (as the release).
        rot90: also random vertical flip and transpose (basicsr's ``augment(rotation=True)``).
        random_crop: random crop position; ``False`` = center crop (validation).
        uint8: build LR and its upsamplings on uint8 like the release (default), else float32.
        degradation: ``None`` (bicubic), a callable ``(hr, scale, generator) -> lr`` on float
            [0,1] tensors, or a ``{target, params}`` config (see ``ldm.data.degradations``).
        seed: fix the random crop/flip of each index (e.g. for validation); ``None`` draws
            from torch's default generator (seeded per DataLoader worker).
        channel_shuffle: random permutation of the RGB channels of each HR crop (before the
            LR is made): a colour augmentation for small datasets; off as released.
        cache_images: keep every decoded HR image in memory (per worker) instead of decoding
            the file for each crop: for small datasets of big photographs.
    """

    def __init__(
        self,
        root_or_filelist: PathLike | Sequence[PathLike],
        crop_size: int | None = 256,
        scale: int = 8,
        flip: bool = True,
        rot90: bool = False,
        random_crop: bool = True,
        uint8: bool = True,
        degradation: Degradation | Mapping[str, Any] | None = None,
        seed: int | None = None,
        channel_shuffle: bool = False,
        cache_images: bool = False,
    ) -> None:
        super().__init__(seed, scale, crop_size, flip, rot90, random_crop, uint8)
        self.paths = collect_image_paths(root_or_filelist)
        self.degradation = _build_degradation(degradation)
        self.channel_shuffle = channel_shuffle
        self._cache: dict[Path, torch.Tensor] | None = {} if cache_images else None

    def _read(self, path: Path) -> torch.Tensor:
        if self._cache is None:
            return read_image(path)
        if path not in self._cache:
            self._cache[path] = read_image(path)
        return self._cache[path]

    def _load(self, index: int, generator: torch.Generator | None) -> dict[str, Any]:
        path = self.paths[index]
        hr = self._read(path)
        h, w = hr.shape[-2:]
        if self.crop_size is None:  # whole image, center-trimmed to a multiple of the scale
            crop_hw = ((h // self.scale) * self.scale, (w // self.scale) * self.scale)
            if 0 in crop_hw:
                raise SampleError(f"image {h}x{w} is smaller than the scale {self.scale}")
        else:
            crop_hw = (self.crop_size, self.crop_size)
        random_crop = self.random_crop and self.crop_size is not None
        top, left, hflip, vflip, transpose = _crop_flip_params(
            (h, w), crop_hw, self.flip, self.rot90, generator, random_crop
        )
        hr = hr[:, top : top + crop_hw[0], left : left + crop_hw[1]]
        hr = _apply_flips(hr, hflip, vflip, transpose)
        if self.channel_shuffle:
            hr = hr[torch.randperm(3, generator=generator)]
        if self.uint8:  # the release's HR is 8-bit
            hr = torch.from_numpy(to_uint8_hwc(hr)).permute(2, 0, 1).to(torch.float32) / 255.0
        hr_hw = (hr.shape[-2], hr.shape[-1])
        lr_hw = (hr_hw[0] // self.scale, hr_hw[1] // self.scale)
        if self.degradation is not None:
            lr = self.degradation(hr, self.scale, generator)
            if tuple(lr.shape) != (3, *lr_hw):
                raise RuntimeError(  # a broken degradation, not a bad file: do not skip
                    f"degradation returned shape {tuple(lr.shape)}, expected {(3, *lr_hw)}"
                )
        elif self.uint8:
            lr_u8 = imresize_np(to_uint8_hwc(hr), output_shape=lr_hw)
            lr = torch.from_numpy(lr_u8).permute(2, 0, 1).to(torch.float32) / 255.0
        else:
            lr = imresize_torch(hr[None], output_shape=lr_hw)[0]
        return {"hr": hr * 2 - 1, **_lr_products(lr, hr_hw, self.uint8), "path": str(path)}


@register("paired_folder")
class PairedFolderDataset(_CropDataset):
    """LR/HR pairs from two folders (or lists), matched by file stem (``0001.png`` <->
    ``0001.jpg``). The HR must be exactly ``scale`` times the LR.

    ``crop_size`` is the HR crop (a multiple of ``scale``; the LR crop is aligned to it);
    ``None`` uses the whole pair. ``uint8`` as in :class:`SRFolderDataset`.
    """

    def __init__(
        self,
        lr_dir: PathLike | Sequence[PathLike],
        hr_dir: PathLike | Sequence[PathLike],
        scale: int = 8,
        crop_size: int | None = None,
        flip: bool = False,
        rot90: bool = False,
        random_crop: bool = True,
        uint8: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed, scale, crop_size, flip, rot90, random_crop, uint8)
        lr_paths = _by_stem(collect_image_paths(lr_dir), "LR")
        hr_paths = _by_stem(collect_image_paths(hr_dir), "HR")
        only_lr = sorted(set(lr_paths) - set(hr_paths))
        only_hr = sorted(set(hr_paths) - set(lr_paths))
        if only_lr or only_hr:
            raise ValueError(
                "LR and HR file names do not match (paired by name without extension): "
                f"{len(only_lr)} only in LR {_shorten(only_lr)}, "
                f"{len(only_hr)} only in HR {_shorten(only_hr)}"
            )
        names = sorted(lr_paths)
        self.lr_paths = [lr_paths[n] for n in names]
        self.paths = [hr_paths[n] for n in names]

    def _load(self, index: int, generator: torch.Generator | None) -> dict[str, Any]:
        s = self.scale
        hr = read_image(self.paths[index])
        lr = read_image(self.lr_paths[index])
        lh, lw = lr.shape[-2:]
        if tuple(hr.shape[-2:]) != (lh * s, lw * s):
            raise SampleError(
                f"HR {tuple(hr.shape[-2:])} is not {s}x the LR {(lh, lw)} "
                f"({self.lr_paths[index].name})"
            )
        crop_hw = (lh, lw) if self.crop_size is None else (self.crop_size // s,) * 2
        top, left, hflip, vflip, transpose = _crop_flip_params(
            (lh, lw), crop_hw, self.flip, self.rot90, generator, self.random_crop
        )
        ch, cw = crop_hw
        lr = _apply_flips(lr[:, top : top + ch, left : left + cw], hflip, vflip, transpose)
        hr = hr[:, top * s : (top + ch) * s, left * s : (left + cw) * s]
        hr = _apply_flips(hr, hflip, vflip, transpose)
        if self.uint8:
            hr = torch.from_numpy(to_uint8_hwc(hr)).permute(2, 0, 1).to(torch.float32) / 255.0
        hr_hw = (hr.shape[-2], hr.shape[-1])
        return {
            "hr": hr * 2 - 1,
            **_lr_products(lr, hr_hw, self.uint8),
            "path": str(self.paths[index]),
        }


def _by_stem(paths: list[Path], what: str) -> dict[str, Path]:
    table: dict[str, Path] = {}
    for p in paths:
        if p.stem in table:
            raise ValueError(f"two {what} images share the name {p.stem!r}: {table[p.stem]}, {p}")
        table[p.stem] = p
    return table


def _shorten(names: list[str], k: int = 5) -> str:
    return str(names[:k])[:-1] + (", ...]" if len(names) > k else "]")
