"""Checker for ``fixtures/resize_and_colorfix``: MATLAB bicubic resize, load_img, AdaIN.

uint8-valued results must match exactly (numpy and torch paths), float64 resizes to 1e-9,
the ``load_img`` tensors exactly (they are k/255*2-1 of exact uint8 values), AdaIN to 1e-5
and the release's uint8 saving of the AdaIN output exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fixture_checkers.common import assert_close, load_io

FEATURE = "MATLAB bicubic resize and colour fix (ldm.data / moe_sr, issue 3)"


def _hwc_u8(t: torch.Tensor) -> np.ndarray:
    arr = t.numpy()
    assert np.array_equal(arr, np.round(arr)) and arr.min() >= 0 and arr.max() <= 255
    return arr.astype(np.uint8)


def _check_resize(io: dict[str, torch.Tensor]) -> None:
    from ldm.data.resize import imresize

    lr = _hwc_u8(io["lr_u8"])
    hr = _hwc_u8(io["hr_u8"])
    cases = [  # (name, source, output shape)
        ("lr_x2_u8", lr, tuple(io["lr_x2_u8"].shape[:2])),
        ("lr_x8_u8", lr, tuple(io["lr_x8_u8"].shape[:2])),
        ("hr_down8_u8", hr, tuple(io["hr_down8_u8"].shape[:2])),
    ]
    for name, src, shape in cases:
        expected = io[name]
        got = imresize(src, output_shape=shape)
        assert got.dtype == np.uint8, f"{name}: numpy uint8 path returned {got.dtype}"
        assert_close(torch.from_numpy(got.astype(np.float32)), expected, f"{name} (numpy)", 0, 0)
        src_t = torch.from_numpy(src).permute(2, 0, 1)[None]
        got_t = imresize(src_t, output_shape=shape)
        assert got_t.dtype == torch.uint8, f"{name}: torch uint8 path returned {got_t.dtype}"
        assert_close(got_t[0].permute(1, 2, 0), expected, f"{name} (torch)", 0, 0)

    for name, src in [("lr_x2_float", lr), ("hr_down8_float", hr)]:
        expected = io[name]
        shape = tuple(expected.shape[:2])
        got = imresize(src.astype(np.float64), output_shape=shape)
        assert got.dtype == np.float64
        assert_close(torch.from_numpy(got), expected, f"{name} (numpy)", 1e-9, 0)
        src_t = torch.from_numpy(src.astype(np.float64)).permute(2, 0, 1)[None]
        got_t = imresize(src_t, output_shape=shape)[0].permute(1, 2, 0)
        assert_close(got_t, expected, f"{name} (torch float64)", 1e-9, 0)
        got_t32 = imresize(src_t.float(), output_shape=shape)[0].permute(1, 2, 0)
        assert_close(got_t32.double(), expected, f"{name} (torch float32)", 1e-3, 0)


def _check_load_img(io: dict[str, torch.Tensor]) -> None:
    from ldm.data.sr_inputs import make_sr_inputs

    lr = _hwc_u8(io["lr_u8"])
    cond, enc = make_sr_inputs(lr, factor=8)
    assert_close(cond, io["load_img_cond_x2"], "load_img_cond_x2", 0, 0)
    assert_close(enc, io["load_img_vae_enc_input_x8"], "load_img_vae_enc_input_x8", 0, 0)
    # the same from a float CHW image in [0, 1] (what read_image returns)
    lr_f = torch.from_numpy(lr).permute(2, 0, 1).float() / 255.0
    cond_f, enc_f = make_sr_inputs(lr_f, factor=8)
    assert_close(cond_f, io["load_img_cond_x2"], "load_img_cond_x2 (float input)", 0, 0)
    assert_close(enc_f, io["load_img_vae_enc_input_x8"], "load_img_vae_enc_input_x8 (float)", 0, 0)


def _check_color_fix(io: dict[str, torch.Tensor]) -> None:
    from moe_sr.color_fix import adain_color_fix, color_fix, to_uint8_official

    out = adain_color_fix(io["adain_content"], io["adain_style"])
    assert_close(out, io["adain_out"], "adain_out", 1e-5, 0)
    assert_close(color_fix(io["adain_content"], io["adain_style"], "adain"), out, "color_fix", 0, 0)
    saved = to_uint8_official(io["adain_out"]).permute(0, 2, 3, 1)
    assert saved.dtype == torch.uint8
    assert_close(saved, io["adain_out_postproc_u8"], "adain_out_postproc_u8", 0, 0)
    # our AdaIN output saved the same way: truncation may flip a level where we differ by 1 ulp
    saved_ours = to_uint8_official(out).permute(0, 2, 3, 1)
    assert_close(saved_ours, io["adain_out_postproc_u8"], "adain_out_postproc_u8 (ours)", 1, 0)


def check(fixture_dir: Path) -> None:
    io = load_io(fixture_dir)
    _check_resize(io)
    _check_load_img(io)
    _check_color_fix(io)
