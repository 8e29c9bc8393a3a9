"""COCO reconstruction benchmark on a tiny generated folder with tiny random autoencoders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pyiqa")

from ldm.cli.eval_reconstruction import main  # noqa: E402
from ldm.data.image_io import read_image  # noqa: E402
from ldm.evaluation.reconstruction import (  # noqa: E402
    ModelSpec,
    center_crop_protocol,
    needs_lr_input,
    reconstruct,
)
from ldm.evaluation.report import read_csv  # noqa: E402

COCO_NAMES = ["000000000139.jpg", "000000000285.jpg", "000000000632.jpg"]
SIZES = [(80, 100), (96, 64), (70, 70)]


@pytest.fixture
def coco(tmp_path) -> Path:
    folder = tmp_path / "coco" / "val2017"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for name, (h, w) in zip(COCO_NAMES, SIZES, strict=True):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 2 + c * 40) % 256 for c in range(3)], -1) + g.integers(
            0, 20, (h, w, 3)
        )
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name, quality=95)
    return folder


def _tiny(preset: str, path: Path):
    from ldm.autoencoders.loading import load_autoencoder

    torch.manual_seed(0)
    model = load_autoencoder(preset)
    torch.save(model.state_dict(), path)
    return model


def test_center_crop_protocol_shape_and_quantisation():
    img = torch.rand(3, 80, 100)
    out = center_crop_protocol(img, 64)
    assert out.shape == (3, 64, 64)
    assert torch.equal(out, (out * 255).round() / 255)
    # a square image of the right size is left as it is (up to 8-bit rounding)
    sq = (torch.rand(3, 64, 64) * 255).round() / 255
    assert torch.equal(center_crop_protocol(sq, 64), sq)


def test_model_spec_parsing():
    s = ModelSpec.parse("sd=autoencoder/kl_f8:/w/vae.ckpt")
    assert (s.name, s.config, s.ckpt) == ("sd", "autoencoder/kl_f8", "/w/vae.ckpt")
    s = ModelSpec.parse("ours=:/w/fa.safetensors")
    assert (s.config, s.ckpt) == (None, "/w/fa.safetensors")
    with pytest.raises(ValueError, match="CONFIG:CKPT"):
        ModelSpec.parse("sd=autoencoder/kl_f8")
    with pytest.raises(ValueError, match="NAME=CONFIG:CKPT"):
        ModelSpec.parse("autoencoder/kl_f8:x.ckpt")


def test_eval_reconstruction_table_values_and_resume(coco, tmp_path, capsys):
    import fa_vae.targets  # noqa: F401  (registers fa_vae_vq_f4)

    kl = _tiny("autoencoder/kl_f8_tiny", tmp_path / "kl.pth")
    fa = _tiny("fa_vae/vq_f4_fa_tiny", tmp_path / "fa.pth")
    assert needs_lr_input(fa) and not needs_lr_input(kl)
    out = tmp_path / "out"
    argv = [
        "--images", str(coco), "--out", str(out), "--size", "64", "--limit", "2",
        "--metrics", "psnr,ssim", "--no-progress",
        "--model", f"kl-tiny=autoencoder/kl_f8_tiny:{tmp_path / 'kl.pth'}",
        "--model", f"fa-vq-tiny=fa_vae/vq_f4_fa_tiny:{tmp_path / 'fa.pth'}",
    ]  # fmt: skip
    assert main(argv) == 0
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| Model | psnr ↑ | ssim ↑ |"
    assert table[2].startswith("| kl-tiny | ") and table[3].startswith("| fa-vq-tiny | ")
    assert any("short side resized to 64" in line and "2 images" in line for line in table)
    rows = read_csv(out / "per_image.csv")
    assert [(r["model"], r["image"]) for r in rows] == [
        ("kl-tiny", "000000000139.png"), ("kl-tiny", "000000000285.png"),
        ("fa-vq-tiny", "000000000139.png"), ("fa-vq-tiny", "000000000285.png"),
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 2 and summary["directions"]["psnr"] == "higher"
    assert "centre crop 64x64" in summary["protocol"]
    assert not (out / "kl-tiny").exists()  # reconstructions removed without --save-recon

    # values: recompute the first image's PSNR by hand for both models
    ref = center_crop_protocol(read_image(coco / COCO_NAMES[0]), 64)
    for model, row, name in ((kl, rows[0], "kl-tiny"), (fa, rows[2], "fa-vq-tiny")):
        rec = (reconstruct(model, ref[None])[0] * 255).round() / 255
        mse = float(((rec.double() - ref.double()) ** 2).mean())
        assert row["psnr"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-3), name
        assert float(summary["models"][name]["summary"]["psnr"]) == pytest.approx(
            (
                rows[0 if name == "kl-tiny" else 2]["psnr"]
                + rows[1 if name == "kl-tiny" else 3]["psnr"]
            )
            / 2,
            abs=1e-4,
        )
    assert f"{summary['models']['kl-tiny']['summary']['psnr']:.2f}" in table[2]

    # resume: saved reconstructions are reused (a replaced file changes the result)
    assert main([*argv, "--save-recon"]) == 0
    recon = out / "kl-tiny" / "recon" / "000000000139.png"
    assert recon.is_file()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(recon)
    assert main([*argv, "--save-recon"]) == 0
    again = read_csv(out / "per_image.csv")
    mse0 = float((ref.double() ** 2).mean())
    assert again[0]["psnr"] == pytest.approx(10 * math.log10(1 / mse0), abs=1e-3)
    assert again[1]["psnr"] == pytest.approx(rows[1]["psnr"], abs=1e-6)


def test_eval_reconstruction_bad_model_and_missing_ckpt(coco, tmp_path, capsys):
    base = [
        "--images",
        str(coco),
        "--out",
        str(tmp_path / "o"),
        "--metrics",
        "psnr",
        "--no-progress",
    ]
    assert main([*base, "--model", "x=autoencoder/kl_f8_tiny"]) == 2
    assert "CONFIG:CKPT" in capsys.readouterr().err
    assert main([*base, "--model", f"x=autoencoder/kl_f8_tiny:{tmp_path / 'none.pth'}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
