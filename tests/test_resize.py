"""MATLAB-style bicubic imresize (ldm.data.resize).

The golden comparison with the official implementation is the fixture checker
``tests/fixture_checkers/resize_and_colorfix.py`` (run by test_reference_fixtures.py); these
tests pin down the maths and the numpy/torch agreement on other sizes.
"""

import numpy as np
import pytest
import torch

from ldm.data.resize import contributions, imresize, imresize_np, imresize_torch, resize_matrix


def _rand_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_cubic_weights_x2_from_the_math():
    # x2: output pixel x (1-based) samples u = x / 2 + 1 / 4. For x = 4, u = 2.25: taps 1..4
    # (1-based) at distances 1.25, 0.25, -0.75, -1.75 -> Keys (a = -0.5) weights
    m = resize_matrix(4, 8, 2.0)
    np.testing.assert_allclose(m[3], [-0.0703125, 0.8671875, 0.2265625, -0.0234375], atol=1e-15)
    # x = 1, u = 0.75: taps -1, 0 (1-based) mirror onto 1, 0 (0-based, edge repeated)
    np.testing.assert_allclose(m[0], [0.8671875 + 0.2265625, -0.0703125 - 0.0234375, 0, 0])
    w, ind = contributions(4, 8, 2.0)
    assert ind.min() >= 0 and ind.max() <= 3
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


def test_antialias_downscale_kernel_support():
    w, _ = contributions(64, 8, 1 / 8)
    # kernel width 4 / scale = 32 input pixels (+ 2 guard taps, zero columns dropped)
    assert 32 <= w.shape[1] <= 34
    w_plain, _ = contributions(64, 8, 1 / 8, antialias=False)
    assert w_plain.shape[1] <= 6
    m = resize_matrix(64, 8, 1 / 8)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize(
    "in_hw,out_hw",
    [
        ((12, 16), (24, 32)),
        ((12, 16), (96, 128)),
        ((64, 48), (8, 6)),
        ((13, 7), (5, 20)),
        ((5, 9), (17, 3)),
    ],
)
def test_torch_matches_numpy(in_hw, out_hw):
    img = np.random.default_rng(1).random((*in_hw, 3))
    ref = imresize_np(img, output_shape=out_hw)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    got64 = imresize_torch(t, output_shape=out_hw)
    assert got64.shape == (2, 3, *out_hw) and got64.dtype == torch.float64
    np.testing.assert_allclose(got64[1].permute(1, 2, 0).numpy(), ref, atol=1e-12)
    got32 = imresize_torch(t.float(), output_shape=out_hw)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    u8 = _rand_u8((*in_hw, 3), seed=2)
    ref_u8 = imresize_np(u8, output_shape=out_hw)
    got_u8 = imresize_torch(torch.from_numpy(u8).permute(2, 0, 1), output_shape=out_hw)
    assert got_u8.dtype == torch.uint8
    assert np.array_equal(got_u8.permute(1, 2, 0).numpy(), ref_u8)


def test_uint8_rounds_after_each_pass():
    # a smooth image away from 0 / 255, so that no intermediate clipping happens
    yy, xx = np.meshgrid(np.arange(12), np.arange(16), indexing="ij")
    u8 = 128 + 60 * np.sin(yy[..., None] * 1.3 + xx[..., None] * np.array([0.7, 1.1, 2.3]))
    u8 = u8.astype(np.uint8)
    f = imresize_np(u8.astype(np.float64), output_shape=(24, 32))
    q = imresize_np(u8, output_shape=(24, 32))
    assert q.dtype == np.uint8
    direct = np.around(np.clip(f, 0, 255)).astype(np.uint8)
    diff = np.abs(q.astype(int) - direct.astype(int))
    assert diff.max() <= 1 and diff.sum() > 0  # intermediate rounding changes some pixels
    # with only one non-trivial pass (H unchanged, scale 1 is the identity) they agree exactly
    f1 = imresize_np(u8.astype(np.float64), output_shape=(12, 40))
    q1 = imresize_np(u8, output_shape=(12, 40))
    assert np.array_equal(q1, np.around(np.clip(f1, 0, 255)).astype(np.uint8))


@pytest.mark.parametrize("out_hw", [(30, 20), (20, 30)])
def test_pass_order_smaller_scale_first(out_hw):
    u8 = _rand_u8((10, 10, 3), seed=4)
    got = imresize_np(u8, output_shape=out_hw)
    h_first = imresize_np(imresize_np(u8, output_shape=(out_hw[0], 10)), output_shape=out_hw)
    w_first = imresize_np(imresize_np(u8, output_shape=(10, out_hw[1])), output_shape=out_hw)
    expected = h_first if out_hw[0] <= out_hw[1] else w_first
    other = w_first if out_hw[0] <= out_hw[1] else h_first
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, other)  # the order matters on uint8


def test_constant_and_linear_images():
    const = np.full((9, 11, 3), 0.37)
    for shape in [(27, 33), (3, 4), (5, 40)]:
        np.testing.assert_allclose(imresize(const, output_shape=shape), 0.37, atol=1e-12)
    # bicubic reproduces a linear ramp away from the borders when upscaling
    ramp = np.tile(np.arange(16, dtype=np.float64)[None, :, None], (4, 1, 1))
    up = imresize(ramp, output_shape=(4, 64))[:, 8:-8, 0]
    x = (np.arange(64) + 1) / 4 + 0.5 * (1 - 1 / 4) - 1  # 0-based sample positions
    np.testing.assert_allclose(up, np.broadcast_to(x[8:-8], up.shape), atol=1e-12)


def test_down_then_up_keeps_smooth_images():
    yy, xx = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64), indexing="ij")
    img = np.stack([np.sin(2 * yy), np.cos(3 * xx), yy * xx], axis=-1)
    back = imresize(imresize(img, scale=1 / 4), output_shape=(64, 64))
    assert np.abs(back - img)[8:-8, 8:-8].max() < 0.02


def test_shapes_and_scales():
    img = np.zeros((7, 9, 3), np.uint8)
    assert imresize(img, scale=0.5).shape == (4, 5, 3)  # ceil, like MATLAB
    assert imresize(img, scale=(2, 3)).shape == (14, 27, 3)
    assert imresize(np.zeros((30, 30)), scale=0.1).shape == (3, 3)  # no float-noise ceil
    assert imresize(np.zeros((6, 8), np.float32), output_shape=(3, 5)).dtype == np.float32
    assert imresize(torch.zeros(3, 6, 8), scale=2).shape == (3, 12, 16)
    assert imresize(torch.zeros(1, 3, 6, 8, dtype=torch.float16), scale=2).dtype == torch.float16


def test_errors():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img, scale=2, output_shape=(8, 8))
    with pytest.raises(ValueError, match="positive"):
        imresize(img, scale=0)
    with pytest.raises(TypeError, match="unsigned-integer"):
        imresize(img.astype(np.int16), scale=2)
    with pytest.raises(ValueError, match="NCHW"):
        imresize(torch.zeros(4, 4), scale=2)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        imresize([[1, 2]], scale=2)


def test_torch_is_differentiable():
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    imresize_torch(x, scale=2).sum().backward()
    # every output row of the resampling matrix sums to 1 -> each input gets total weight 4
    assert torch.allclose(x.grad.sum(), torch.tensor(4.0 * 3 * 64, dtype=torch.float64))
