"""Reading, listing, converting and writing images: the one place for formats, bit depths,
the float -> uint8 rounding rule, input-folder expansion and atomic writes.

``read_image`` returns a float tensor ``[3, H, W]`` in ``[0, 1]`` for RGB,
grayscale (replicated to 3 channels), RGBA / LA (alpha dropped, with a warning),
palette, 16-bit PNG (full precision) and JPEG files. Anything else raises
:class:`ImageReadError` with the path and the reason.
``write_image`` writes to a temporary file in the target folder and renames it
(:func:`ldm.atomic.atomic_write`), so a crash never leaves a half-written image under the
final name.

Rounding: :func:`to_uint8` is the one float -> 8-bit conversion: ``round(255 * clamp(x, 0,
1))``, computed in float32 (float64 for float64 arrays), rounding half to even (``torch.round``
/ ``np.around``), so the error is at most half a grey level. The one other rule in the code
base is the release's truncation, kept for bit-exact comparisons with its saved outputs
(:func:`moe_sr.color_fix.to_uint8_official`).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.atomic import atomic_write

logger = logging.getLogger(__name__)

#: Extensions ``list_images`` picks up (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(OSError):
    """A file that cannot be read as an image."""


def _to_float(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.int32) or arr.dtype.kind in "iu":
        # PIL opens 16-bit PNGs as mode I / I;16: values 0..65535.
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    raise ImageReadError(f"{path}: unsupported pixel type {arr.dtype}")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


#: Pillow modes whose pixels are read as they are (the others are converted to RGB first).
_DIRECT_MODES = ("1", "L", "RGB", "I", "F", "I;16", "I;16B", "I;16L")


def _reason(err: BaseException) -> str:
    """A decoder's error as a short phrase: its first line, without the C++ source locations
    that native decoders append ("Exception raised from ... at /path/file.cpp:123")."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = re.split(r"\s*Exception raised from", text)[0].strip()
    text = re.sub(r"\s*\(?\S+\.(cpp|cc|c|h|hpp):\d+\)?", "", text).strip(" .:")
    return text or type(err).__name__


def _is_16bit_png(path: Path) -> bool:
    """PNG whose IHDR bit depth is 16 (PIL would reduce 16-bit RGB to 8 bits)."""
    with open(path, "rb") as f:
        head = f.read(25)
    return (
        len(head) == 25 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and head[24] == 16
    )


def _read_png16(path: Path) -> torch.Tensor:
    from ldm.data.png16 import Png16Error, decode_png16

    try:
        t = decode_png16(path.read_bytes())
    except Png16Error as err:
        raise ImageReadError(f"{path}: cannot decode 16-bit PNG: {err}") from None
    except Exception as err:  # noqa: BLE001 - a native decoder: any failure is a bad file
        raise ImageReadError(
            f"{path}: cannot decode 16-bit PNG (truncated or corrupt: {_reason(err)})"
        ) from None
    x = t.to(torch.float32) / 65535.0
    if x.shape[0] in (2, 4):
        warnings.warn(f"{path}: alpha channel dropped (16-bit PNG)", UserWarning, stacklevel=3)
        x = x[:-1]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.contiguous()


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """The image at ``path`` as a float32 tensor ``[3, H, W]`` in ``[0, 1]``."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if _is_16bit_png(path):
        return _read_png16(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA")
            if alpha or (mode == "P" and "transparency" in img.info):
                warnings.warn(
                    f"{path}: alpha channel dropped (image mode {mode})", UserWarning, stacklevel=2
                )
                img = img.convert("LA" if mode in ("LA", "La") else "RGBA")
                mode = img.mode
            elif mode not in _DIRECT_MODES:  # palette, CMYK, YCbCr, LAB, HSV, RGBX, ...
                img = img.convert("RGB")
                mode = "RGB"
            arr = np.asarray(img)
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{path}: not an image file PIL can read (corrupt, or an unsupported format)"
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"{path}: {_reason(err)}") from None
    except MemoryError:
        raise ImageReadError(f"{path}: too large to decode in the available memory") from None
    except Exception as err:  # noqa: BLE001 - Pillow's decoders fail in many ways on bad files
        raise ImageReadError(f"{path}: cannot decode image ({_reason(err)})") from None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = arr.astype(np.uint16) if arr.dtype != np.uint16 else arr
    arr = _to_float(arr, path)
    if mode == "F":  # 32-bit float pixels: any value; keep the documented range
        arr = np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 2:  # LA
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageReadError(f"{path}: unsupported image layout {arr.shape} (mode {mode})")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def to_uint8(image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Floats in [0, 1] -> uint8 in [0, 255], same type, layout and device (uint8 input is
    returned as it is): ``round(255 * clamp(x, 0, 1))``, half to even (see the module note)."""
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return image
        if not image.is_floating_point():
            raise ValueError(f"expected float pixels in [0, 1] or uint8, got {image.dtype}")
        return (image.detach().to(torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind != "f":
        raise ValueError(f"expected float pixels in [0, 1] or uint8, got {arr.dtype}")
    return np.around(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_uint8_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[3, H, W]`` / ``[1, 3, H, W]`` / ``[H, W, 3]`` / ``[H, W]`` floats in [0, 1] (or uint8)
    -> a uint8 ``[H, W, 3]`` / ``[H, W]`` array on the CPU (:func:`to_uint8`'s rounding)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        if image.dtype not in (torch.uint8,) and not image.is_floating_point():
            raise ValueError(f"expected float pixels in [0, 1] or uint8, got {image.dtype}")
        arr = to_uint8(image).numpy()
    else:
        arr = to_uint8(np.asarray(image))
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"expected an image [3,H,W], [H,W,3] or [H,W], got shape {arr.shape}")
    return arr


#: What :func:`write_image` writes, by extension: the Pillow format and its save options.
#: PNG, TIFF, BMP and WebP (lossless) keep every 8-bit value; JPEG is lossy (quality 95, no
#: chroma subsampling).
WRITE_FORMATS: dict[str, tuple[str, dict]] = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".bmp": ("BMP", {}),
    ".tif": ("TIFF", {}),
    ".tiff": ("TIFF", {}),
    ".webp": ("WEBP", {"lossless": True}),
}
#: Extensions of :data:`WRITE_FORMATS` whose files lose detail.
LOSSY_EXTENSIONS = (".jpg", ".jpeg")


def check_write_suffix(suffix: str, *, what: str = "output") -> str:
    """``suffix`` (``.png``; ``png`` is accepted) in lower case if :func:`write_image` can write
    it, else a ``ValueError`` listing the ones it can."""
    if not suffix:
        raise ValueError(f"{what}: no file extension to tell the image type; use one of "
                         f"{', '.join(WRITE_FORMATS)}")  # fmt: skip
    ext = suffix.lower() if suffix.startswith(".") else "." + suffix.lower()
    if ext not in WRITE_FORMATS:
        raise ValueError(
            f"{what}: cannot write images of type {suffix!r}; use one of {', '.join(WRITE_FORMATS)}"
        )
    return ext


def write_image(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``image`` (floats in [0, 1] or uint8; CHW or HWC) atomically; the format comes
    from the suffix (:data:`WRITE_FORMATS`)."""
    path = Path(path)
    fmt, options = WRITE_FORMATS[check_write_suffix(path.suffix, what=str(path))]
    arr = to_uint8_hwc(image)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        Image.fromarray(arr).save(f, format=fmt, **options)
    return path


def broken_links(folder: str | os.PathLike) -> list[Path]:
    """Symbolic links directly in ``folder`` with an image extension whose target is missing
    (:func:`list_images` cannot return them; callers report them instead of skipping them
    silently)."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_symlink() and not p.exists()
    )


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` (by extension), sorted by name.

    Raises ``FileNotFoundError`` for a missing folder, ``NotADirectoryError`` for a file."""
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(f"{folder}: not a folder")
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def collect_inputs(
    inputs: list[str | os.PathLike], *, empty_folders_ok: bool = False
) -> tuple[list[Path], list[str]]:
    """The input images named on a command line: files as given, folders expanded
    (:func:`list_images`), in order; and one error line per missing path, broken symbolic
    link or (unless ``empty_folders_ok``) folder without images."""
    files: list[Path] = []
    errors: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            broken = broken_links(p)
            errors += [f"{b}: broken symbolic link (its target is missing)" for b in broken]
            if not found and not broken and not empty_folders_ok:
                errors.append(f"{p}: folder holds no images")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.is_symlink():
            errors.append(f"{p}: broken symbolic link (its target is missing)")
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors
