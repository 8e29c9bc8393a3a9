"""The artifact checks find what they claim to find (and stay quiet on clean images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.evaluation.artifacts import border_error_ratio, grid_peakiness, mean_delta_e

HR = Path(__file__).resolve().parent.parent / "assets" / "examples" / "hr"


def _photo(name: str = "chelsea") -> torch.Tensor:
    img = np.asarray(Image.open(HR / f"{name}.png").convert("RGB"))
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255


def test_border_ratio_sees_a_dark_frame():
    ref = _photo()
    g = torch.Generator().manual_seed(0)
    noisy = (ref + 0.02 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    assert border_error_ratio(noisy, ref) == pytest.approx(1.0, abs=0.1)
    framed = noisy.clone()
    framed[:, -8:, :] *= 0.8  # a dark band along the bottom edge
    assert border_error_ratio(framed, ref) > 1.5
    with pytest.raises(ValueError, match="differ in size"):
        border_error_ratio(ref[:, :-1], ref)


def test_grid_peakiness_finds_a_latent_grid_pattern():
    img = _photo()
    clean = grid_peakiness(img)
    h, w = img.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = ((yy // 2 + xx // 2) % 2).float() * 2 - 1  # period 4 in both directions
    patterned = (img + 0.02 * checker).clamp(0, 1)
    assert clean < 5
    assert grid_peakiness(patterned) > 10 * clean


def test_delta_e_sees_a_colour_cast_not_noise():
    ref = _photo("coffee")
    g = torch.Generator().manual_seed(0)
    noisy = (ref + 0.05 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    cast = ref.clone()
    cast[0] *= 0.8  # less red: brown turns olive
    assert mean_delta_e(noisy, ref) < 1.5
    assert mean_delta_e(cast, ref) > 4
