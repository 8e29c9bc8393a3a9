"""SR evaluation command (paired folders) and the comparison picture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.evaluation.compare import comparison_columns, make_comparison, parse_crop


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _hr_sr(tmp_path: Path):
    g = np.random.default_rng(0)
    hr = {n: g.integers(0, 256, (32, 40, 3)) for n in ("0801", "0802")}
    for n, a in hr.items():
        _save(tmp_path / "hr" / f"{n}.png", a)
        _save(tmp_path / "good" / f"{n}.png", np.clip(a + g.integers(-3, 4, a.shape), 0, 255))
        _save(tmp_path / "bad" / f"{n}.png", np.clip(a + g.integers(-40, 41, a.shape), 0, 255))
    return hr


def test_eval_sr_two_methods(tmp_path):
    pytest.importorskip("pyiqa")
    from ldm.cli.eval_sr import main
    from ldm.evaluation.report import read_csv

    _hr_sr(tmp_path)
    out = tmp_path / "out"
    rc = main([
        "--hr", str(tmp_path / "hr"), "--sr", f"good={tmp_path / 'good'}", "--sr", str(tmp_path / "bad"),
        "--metrics", "psnr,ssim", "--y-channel", "--crop-border", "4", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| Model | psnr ↑ | ssim ↑ |"
    assert table[2].startswith("| good |") and table[3].startswith("| bad |")
    assert "Y (BT.601), crop border 4" in (out / "table.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    good, bad = (summary["models"][k]["summary"]["psnr"] for k in ("good", "bad"))
    assert good > bad + 10
    assert summary["options"] == {"crop_border": 4, "y_channel": True}
    rows = read_csv(out / "per_image.csv")
    assert [(r["model"], r["image"]) for r in rows] == [
        ("good", "0801.png"), ("good", "0802.png"), ("bad", "0801.png"), ("bad", "0802.png"),
    ]  # fmt: skip


def test_eval_sr_unmatched_names(tmp_path, capsys):
    pytest.importorskip("pyiqa")
    from ldm.cli.eval_sr import main

    _hr_sr(tmp_path)
    (tmp_path / "good" / "0802.png").rename(tmp_path / "good" / "0802_x4.png")
    rc = main([
        "--hr", str(tmp_path / "hr"), "--sr", str(tmp_path / "good"), "--metrics", "psnr",
        "--out", str(tmp_path / "o"), "--no-progress",
    ])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "0802_x4" in err and "only in" in err and f"{tmp_path / 'hr'}: 0802" in err


def test_make_comparison_layout_and_zoom():
    g = torch.Generator().manual_seed(0)
    hr = (torch.rand(3, 32, 48, generator=g) * 255).round() / 255
    lr = hr[:, ::4, ::4].clone()
    sr = hr.flip(-1)
    pic = make_comparison(
        {"LR": lr, "ours": sr, "reference": hr}, crop=(8, 4, 16, 8), gap=4, label_height=20
    )
    # 3 columns of width 48 + 4 gaps; height: label + full (32) + zoom (8 * 48 / 16 = 24) + gaps
    assert pic.size == (3 * 48 + 4 * 4, 20 + 32 + 2 * 4 + 24 + 4)
    arr = np.asarray(pic)
    top, zoom_top = 20 + 4, 20 + 4 + 32 + 4
    # reference column: the full image is pasted as is (outside the outline)
    left = 4 + 2 * (48 + 4)
    ref_u8 = (hr * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(arr[top + 20 : top + 32, left : left + 48], ref_u8[20:32])
    # outline drawn in red at the crop's top-left corner
    assert tuple(arr[top + 4, left + 8]) == (255, 0, 0)
    # zoom row: nearest x3 of the crop
    zoom = arr[zoom_top : zoom_top + 24, left : left + 48]
    assert np.array_equal(zoom, ref_u8[4:12, 8:24].repeat(3, 0).repeat(3, 1))
    # LR column is nearest-upscaled: 4x4 blocks
    lr_u8 = (lr * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(
        arr[top + 16 : top + 20, 4 + 40 : 4 + 44], np.broadcast_to(lr_u8[4, 10], (4, 4, 3))
    )
    # labels are drawn (dark pixels in the label band of every column)
    for i in range(3):
        band = arr[:20, 4 + i * 52 : 4 + i * 52 + 48]
        assert (band.sum(-1) < 200).any()


def test_make_comparison_errors_and_columns():
    hr = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match="outside"):
        make_comparison({"a": hr}, crop=(20, 20, 16, 16))
    with pytest.raises(ValueError, match="integer downscale"):
        make_comparison({"a": hr, "b": torch.rand(3, 10, 10)})
    with pytest.raises(ValueError, match="x,y,w,h"):
        parse_crop("1,2,3")
    cols = comparison_columns(hr[:, ::8, ::8], [("ours", hr)], hr)
    assert list(cols) == ["LR (nearest)", "bicubic", "ours", "reference"]
    assert all(c.shape == (3, 32, 32) for c in cols.values())
    assert make_comparison(cols).size == (4 * 32 + 5 * 4, 24 + 32 + 8)


def test_compare_cli(tmp_path):
    from ldm.cli.compare import main

    g = np.random.default_rng(1)
    hr = g.integers(0, 256, (32, 32, 3))
    _save(tmp_path / "hr.png", hr)
    _save(tmp_path / "lr.png", hr[::4, ::4])
    _save(tmp_path / "sr.png", hr)
    out = tmp_path / "fig" / "cmp.png"
    rc = main([
        "--lr", str(tmp_path / "lr.png"), "--image", f"ours={tmp_path / 'sr.png'}",
        "--ref", str(tmp_path / "hr.png"), "--crop", "0,0,16,16", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0 and Image.open(out).size == (4 * 32 + 5 * 4, 24 + 32 + 8 + 32 + 4)
    assert main(["--image", "nolabel", "--out", str(out)]) == 2
