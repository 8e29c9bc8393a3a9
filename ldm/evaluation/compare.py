"""Side-by-side comparison pictures, the way SR papers show results.

``make_comparison({"LR": lr, "bicubic": bic, "ours": sr, "reference": hr}, crop=(x, y, w, h))``
returns a PIL image with one labelled column per input: the full image (inputs smaller than the
largest one, e.g. the LR, are nearest-upscaled to its size so pixels stay visible) with the crop
region outlined, and below it that region zoomed (nearest) to the column width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ldm.data.image_io import to_uint8_hwc

Crop = tuple[int, int, int, int]


def parse_crop(text: str) -> Crop:
    """``"x,y,w,h"`` -> tuple of ints (pixels in the largest image's coordinates)."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError as err:
        raise ValueError(f"--crop wants x,y,w,h (four integers), got {text!r}") from err
    return x, y, w, h


def _to_chw(img) -> torch.Tensor:
    if isinstance(img, Image.Image):
        img = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(
            2, 0, 1
        )
    if not isinstance(img, torch.Tensor):
        raise TypeError(
            f"images must be tensors [3, H, W] in [0, 1] or PIL images, got {type(img)}"
        )
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"images must be [3, H, W], got {tuple(img.shape)}")
    return img.detach().float().cpu().expand(3, -1, -1).clamp(0, 1)


def _upscale_nearest(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(img.shape[-2:]) == size:
        return img
    h, w = img.shape[-2:]
    if size[0] % h or size[1] % w or size[0] // h != size[1] // w:
        raise ValueError(
            f"image of size {h}x{w} is not an integer downscale of the largest one "
            f"{size[0]}x{size[1]}: resize it first"
        )
    return F.interpolate(img[None], size=size, mode="nearest")[0]


def _pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8_hwc(img))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def make_comparison(
    images: Mapping[str, torch.Tensor | Image.Image],
    crop: Crop | None = None,
    *,
    column_width: int | None = None,
    gap: int = 4,
    label_height: int = 24,
    outline: tuple[int, int, int] = (255, 0, 0),
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Labelled grid: row 1 the full images, row 2 (with ``crop``) the zoomed crops.

    Args:
        images: label -> image (tensor ``[3, H, W]`` in [0, 1] or PIL). Smaller images must be
            integer downscales of the largest (they are nearest-upscaled).
        crop: ``(x, y, w, h)`` in the largest image's pixels, or ``None`` for no zoom row.
        column_width: width of each column (default: the largest image's width).
    """
    if not images:
        raise ValueError("make_comparison needs at least one image")
    tensors = {k: _to_chw(v) for k, v in images.items()}
    size = max((t.shape[-2:] for t in tensors.values()), key=lambda s: s[0] * s[1])
    size = (int(size[0]), int(size[1]))
    tensors = {k: _upscale_nearest(t, size) for k, t in tensors.items()}
    H, W = size
    col_w = column_width or W
    full_h = round(H * col_w / W)
    zoom_h = 0
    if crop is not None:
        x, y, w, h = crop
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > W or y + h > H:
            raise ValueError(f"crop {crop} (x, y, w, h) is outside the {W}x{H} image")
        zoom_h = round(h * col_w / w)
    n = len(tensors)
    total_w = n * col_w + (n + 1) * gap
    total_h = label_height + full_h + 2 * gap + (zoom_h + gap if crop is not None else 0)
    canvas = Image.new("RGB", (total_w, total_h), background)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, label_height - 8))
    sx = col_w / W
    for i, (label, t) in enumerate(tensors.items()):
        left = gap + i * (col_w + gap)
        draw.text(
            (left + col_w // 2, label_height // 2), label, fill=(0, 0, 0), font=font, anchor="mm"
        )
        full = _pil(t)
        if full.size != (col_w, full_h):
            full = full.resize((col_w, full_h), Image.Resampling.BICUBIC)
        top = label_height + gap
        canvas.paste(full, (left, top))
        if crop is not None:
            x, y, w, h = crop
            box = [left + x * sx, top + y * sx, left + (x + w) * sx - 1, top + (y + h) * sx - 1]
            draw.rectangle(box, outline=outline, width=max(1, col_w // 200))
            zoom = _pil(t[:, y : y + h, x : x + w]).resize(
                (col_w, zoom_h), Image.Resampling.NEAREST
            )
            canvas.paste(zoom, (left, top + full_h + gap))
    return canvas


def comparison_columns(
    lr: torch.Tensor | None, others: Sequence[tuple[str, torch.Tensor]], ref: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The usual SR columns: ``LR (nearest)``, ``bicubic`` (MATLAB, from the LR), the others,
    ``reference``. Sizes come from ``ref`` (or the first other image)."""
    from ldm.data.resize import imresize

    cols: dict[str, torch.Tensor] = {}
    target = ref if ref is not None else (others[0][1] if others else None)
    if lr is not None:
        if target is None:
            raise ValueError("with an LR image, give the reference or another full-size image")
        size = tuple(target.shape[-2:])
        cols["LR (nearest)"] = _upscale_nearest(_to_chw(lr), size)
        cols["bicubic"] = (
            imresize(_to_chw(lr)[None].double(), output_shape=size)[0].float().clamp(0, 1)
        )
    for name, img in others:
        cols[name] = _to_chw(img)
    if ref is not None:
        cols["reference"] = _to_chw(ref)
    return cols
