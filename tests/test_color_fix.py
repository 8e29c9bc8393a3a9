"""Colour fix (moe_sr.color_fix). The released AdaIN is also checked against the official output
by the resize_and_colorfix fixture checker."""

import pytest
import torch

from ldm.data.resize import imresize_torch
from moe_sr.color_fix import (
    COLOR_FIX_MODES,
    adain_color_fix,
    color_fix,
    to_uint8,
    to_uint8_official,
    wavelet_color_fix,
    wavelet_decomposition,
)


def test_adain_matches_formula():
    g = torch.Generator().manual_seed(0)
    content = torch.randn(2, 3, 16, 12, generator=g) * 0.5 + 0.2
    style = torch.rand(2, 3, 4, 6, generator=g) * 2 - 1
    out = adain_color_fix(content, style)
    assert out.shape == content.shape and out.dtype == content.dtype
    c, s = content.double(), style.double()
    n_c, n_s = 16 * 12, 4 * 6
    c_mean = c.mean((2, 3), keepdim=True)
    s_mean = s.mean((2, 3), keepdim=True)
    c_var = ((c - c_mean) ** 2).sum((2, 3), keepdim=True) / (n_c - 1)  # unbiased
    s_var = ((s - s_mean) ** 2).sum((2, 3), keepdim=True) / (n_s - 1)
    expected = (c - c_mean) / (c_var + 1e-5).sqrt() * (s_var + 1e-5).sqrt() + s_mean
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # the output carries the style's per-channel mean
    torch.testing.assert_close(out.mean((2, 3)), style.mean((2, 3)), atol=1e-5, rtol=0)
    # CHW works too
    torch.testing.assert_close(adain_color_fix(content[0], style[0]), out[0])


def test_adain_errors():
    with pytest.raises(ValueError, match="same batch size and channel count"):
        adain_color_fix(torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="NCHW or CHW"):
        adain_color_fix(torch.zeros(8, 8), torch.zeros(8, 8))


def test_wavelet_decomposition_is_exact_split():
    x = torch.rand(1, 3, 20, 24, dtype=torch.float64)
    high, low = wavelet_decomposition(x)
    torch.testing.assert_close(high + low, x)
    # the low band is smooth: much less total variation than the input
    tv = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert tv(low) < 0.2 * tv(x)


def test_wavelet_keeps_low_frequencies_of_style():
    g = torch.Generator().manual_seed(1)
    style = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    style_up = imresize_torch(style, output_shape=(64, 64))
    # content = the style with a colour shift: the fix must remove the shift exactly
    shift = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)[None, :, None, None]
    out = wavelet_color_fix(style_up + shift, style)
    torch.testing.assert_close(out, style_up, atol=1e-12, rtol=0)
    # and keep the content's fine detail: a checkerboard added to the content survives
    checker = 0.2 * ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2 - 1)
    out2 = wavelet_color_fix(style_up + shift + checker.double(), style)
    diff = out2 - out
    assert (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean() > 0.3  # still alternating


def test_color_fix_dispatch_and_unknown_mode():
    content = torch.rand(1, 3, 16, 16) * 2 - 1
    style = torch.rand(1, 3, 8, 8) * 2 - 1
    assert color_fix(content, style, "none") is content
    torch.testing.assert_close(color_fix(content, style, "adain"), adain_color_fix(content, style))
    torch.testing.assert_close(
        color_fix(content, style, "wavelet"), wavelet_color_fix(content, style)
    )
    assert set(COLOR_FIX_MODES) == {"adain", "wavelet", "none"}
    with pytest.raises(
        ValueError, match="unknown colour-fix mode 'histogram'.*adain, wavelet, none"
    ):
        color_fix(content, style, "histogram")


def test_to_uint8_rounding_vs_release_truncation():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])  # 0.999 -> 254.87
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255]  # 127.5 -> 128 (half to even)
    assert to_uint8_official(x).tolist() == [0, 0, 127, 254, 255, 255]
    assert to_uint8(x).dtype == torch.uint8
    with pytest.raises(ValueError, match="rounding"):
        to_uint8(x, rounding="floor")
