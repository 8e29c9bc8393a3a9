"""ldm.data.image_io: formats, bit depths, alpha, errors, atomic writes."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.image_io import ImageReadError, list_images, read_image, write_image


def _rgb(h=12, w=10, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    color = {1: 0, 2: 4, 3: 2, 4: 6}[1 if arr.ndim == 2 else arr.shape[2]]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
    path.write_bytes(png + chunk(b"IEND", b""))


def test_rgb_png_exact(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png")
    assert x.dtype == torch.float32 and x.shape == (3, 12, 10)
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(a).permute(2, 0, 1))


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = _rgb()[:, :, 0]
    Image.fromarray(g).save(tmp_path / "g.png")
    x = read_image(tmp_path / "g.png")
    assert x.shape == (3, 12, 10)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.allclose(x[0] * 255, torch.from_numpy(g).float())


def test_rgba_drops_alpha_with_warning(tmp_path):
    a = _rgb()
    rgba = np.dstack([a, np.full(a.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="alpha channel dropped"):
        x = read_image(tmp_path / "a.png")
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(a).permute(2, 0, 1))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_keeps_full_precision(tmp_path, channels):
    rng = np.random.default_rng(1)
    shape = (9, 11) if channels == 1 else (9, 11, channels)
    a = rng.integers(0, 65536, shape, dtype=np.uint16)
    _png16(tmp_path / "a.png", a)
    if channels == 4:
        with pytest.warns(UserWarning, match="alpha channel dropped"):
            x = read_image(tmp_path / "a.png")
        a = a[:, :, :3]
    else:
        x = read_image(tmp_path / "a.png")
    assert x.shape == (3, 9, 11)
    ref = np.repeat(a[:, :, None], 3, 2) if channels == 1 else a
    assert np.array_equal(np.round(x.permute(1, 2, 0).numpy() * 65535).astype(np.uint16), ref)


def test_jpeg(tmp_path):
    yy, xx = np.mgrid[0:32, 0:40]
    a = np.stack([yy * 8, xx * 6, (yy + xx) * 3], axis=2).astype(np.uint8)  # smooth: JPEG-friendly
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    x = read_image(tmp_path / "a.jpg")
    assert x.shape == (3, 32, 40)
    decoded = np.asarray(Image.open(tmp_path / "a.jpg"))  # exactly PIL's decoding
    assert np.array_equal(np.round(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8), decoded)
    assert np.abs(decoded.astype(int) - a).mean() < 3.0


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_files_raise_image_read_error(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # a truncated PNG
        Image.fromarray(_rgb(64, 64)).save(path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(path)
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_write_is_atomic_and_round_trips(tmp_path, monkeypatch):
    a = _rgb()
    x = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    out = write_image(x, tmp_path / "sub" / "o.png")
    assert np.array_equal(np.asarray(Image.open(out)), a)
    assert sorted(os.listdir(tmp_path / "sub")) == ["o.png"]  # no temporary left behind

    # A failure while writing leaves the old file intact and no temporary file.
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        write_image(torch.zeros(3, 4, 4), out)
    monkeypatch.undo()
    assert np.array_equal(np.asarray(Image.open(out)), a)
    assert sorted(os.listdir(tmp_path / "sub")) == ["o.png"]


def test_write_accepts_hwc_uint8_and_gray(tmp_path):
    a = _rgb()
    write_image(a, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), a)
    write_image(torch.full((1, 4, 4), 0.5), tmp_path / "g.png")
    assert np.asarray(Image.open(tmp_path / "g.png")).tolist() == [[128] * 4] * 4
    with pytest.raises(ValueError, match="cannot write images of type"):
        write_image(a, tmp_path / "a.xyz")


def test_list_images_sorted_by_name(tmp_path):
    for name in ["b.png", "a.JPG", "c.txt", "d.tiff"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "d.tiff"]
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "b.png")


def test_written_images_get_the_umask_mode_not_0600(tmp_path):
    out = write_image(torch.rand(3, 4, 5), tmp_path / "a.png")
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("cut", [60, 90, -12])
def test_a_truncated_16bit_png_is_one_plain_line(tmp_path, cut):
    """Issue: the message leaked a C++ source path of the decoder; some truncations even
    crashed it (tests/test_fuzz.py)."""
    path = tmp_path / "a.png"
    _png16(path, np.arange(48, dtype=np.uint16).reshape(4, 4, 3) * 1000)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot decode 16-bit PNG: truncated")
    assert len(msg.splitlines()) == 1 and ".cpp" not in msg and "Exception raised" not in msg


def test_odd_modes_read_as_rgb_in_range(tmp_path):
    """Float TIFFs (any value) and colour spaces without RGB are converted, not misread."""
    Image.fromarray(np.array([[-1.0, 0.5], [2.0, np.nan]], np.float32)).save(tmp_path / "f.tif")
    x = read_image(tmp_path / "f.tif")
    assert x.shape == (3, 2, 2) and float(x.min()) == 0.0 and float(x.max()) == 1.0
    Image.fromarray(_rgb(4, 4)).convert("LAB").save(tmp_path / "lab.tif")
    assert read_image(tmp_path / "lab.tif").shape == (3, 4, 4)


def test_to_uint8_one_rule_for_tensors_arrays_and_written_files(tmp_path):
    from ldm.data.image_io import to_uint8, to_uint8_hwc

    x = torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.2])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]  # 127.5 -> 128: half to even
    img = torch.rand(3, 5, 7)
    hwc = to_uint8_hwc(img)
    assert hwc.dtype == np.uint8 and hwc.shape == (5, 7, 3)
    assert np.array_equal(hwc, to_uint8(img.permute(1, 2, 0).numpy()))
    assert np.array_equal(hwc, to_uint8(img).permute(1, 2, 0).numpy())
    write_image(img, tmp_path / "r.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r.png")), hwc)
    u8 = torch.randint(0, 256, (3, 2, 2), dtype=torch.uint8)
    assert to_uint8(u8) is u8


def test_collect_inputs_expands_folders_and_reports_bad_paths(tmp_path):
    from ldm.data.image_io import collect_inputs

    (tmp_path / "imgs").mkdir()
    (tmp_path / "empty").mkdir()
    write_image(torch.rand(3, 4, 4), tmp_path / "imgs" / "b.png")
    write_image(torch.rand(3, 4, 4), tmp_path / "imgs" / "a.png")
    items = [tmp_path / "imgs", tmp_path / "empty", tmp_path / "missing.png"]
    files, errors = collect_inputs(items)
    assert [f.name for f in files] == ["a.png", "b.png"]
    assert errors == [
        f"{tmp_path / 'empty'}: folder holds no images",
        f"{tmp_path / 'missing.png'}: no such file or folder",
    ]
    _, errors = collect_inputs(items, empty_folders_ok=True)
    assert errors == [f"{tmp_path / 'missing.png'}: no such file or folder"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nowhere")
