"""moe-sr-reconstruct end to end on tiny random models, and reconstruct_image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.autoencoders.reconstruct import pad_to_multiple, reconstruct_image
from ldm.checkpoint import load_pretrained, save_pretrained
from ldm.cli.reconstruct import main, output_names
from ldm.config import instantiate, load_config
from ldm.data.image_io import read_image


@pytest.fixture(scope="module")
def tiny_vq_file(tmp_path_factory):
    cfg = load_config("autoencoder/vq_f4_tiny")
    model = instantiate(cfg).eval()
    path = tmp_path_factory.mktemp("w") / "vq_tiny.safetensors"
    save_pretrained(model, path, cfg, metadata={"note": "test"})
    return path


def test_pad_to_multiple_reflects_and_keeps_size():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).view(1, 2, 5, 7)
    y, (h, w) = pad_to_multiple(x, 4)
    assert y.shape == (1, 2, 8, 8) and (h, w) == (5, 7)
    assert torch.equal(y[..., :5, :7], x)
    assert torch.equal(y[..., 5, :7], x[..., 3, :])  # reflection, not zeros
    tiny = torch.ones(1, 1, 1, 3)
    assert pad_to_multiple(tiny, 8)[0].shape == (1, 1, 8, 8)  # too small to reflect: replicate


def test_reconstruct_image_matches_manual_pipeline(tiny_vq_file):
    model = load_pretrained(tiny_vq_file)
    x = torch.rand(3, 13, 10)
    y = reconstruct_image(model, x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    with torch.no_grad():
        xp, _ = pad_to_multiple(x[None] * 2 - 1, 4)
        ref = ((model(xp)[..., :13, :10] + 1) / 2).clamp(0, 1)[0]
    torch.testing.assert_close(y, ref)


def test_reconstruct_kl_uses_posterior_mean():
    model = instantiate(load_config("autoencoder/kl_f8_tiny")).eval()
    x = torch.rand(1, 3, 16, 16)
    y1, y2 = reconstruct_image(model, x), reconstruct_image(model, x)
    assert torch.equal(y1, y2)


def test_cli_end_to_end(tmp_path, tiny_vq_file, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)).save(src / "odd.png")
    Image.fromarray(rng.integers(0, 256, (9, 6), dtype=np.uint8)).save(src / "gray.png")
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(src / "alpha.png")
    Image.fromarray(rgba[:, :, :3]).save(src / "alpha.jpg")  # same stem as alpha.png
    (src / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "out"

    with pytest.warns(UserWarning, match="alpha channel dropped"):
        rc = main([str(src), "--ckpt", str(tiny_vq_file), "-o", str(out), "--quiet"])
    assert rc == 1  # broken.png failed, the rest went through
    err = capsys.readouterr().err
    assert "broken.png: not an image file" in err and "1 input(s) failed" in err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["alpha_jpg.png", "alpha_png.png", "gray.png", "odd.png"]
    assert read_image(out / "odd.png").shape == (3, 13, 17)
    assert read_image(out / "gray.png").shape == (3, 9, 6)

    # Same result as the library function on the same model.
    model = load_pretrained(tiny_vq_file)
    ref = reconstruct_image(model, read_image(src / "odd.png"))
    got = read_image(out / "odd.png")
    assert (got - ref).abs().max() <= 0.5 / 255 + 1e-6  # uint8 rounding only

    # Existing outputs are skipped, unless --overwrite.
    stamp = (out / "odd.png").stat().st_mtime_ns
    (out / "odd.png").write_bytes((out / "odd.png").read_bytes())
    marker = (out / "odd.png").stat().st_mtime_ns
    assert main([str(src / "odd.png"), "--ckpt", str(tiny_vq_file), "-o", str(out), "--quiet"]) == 0
    assert (out / "odd.png").stat().st_mtime_ns == marker
    args = [str(src / "odd.png"), "--ckpt", str(tiny_vq_file), "-o", str(out)]
    assert main([*args, "--quiet", "--overwrite"]) == 0
    assert (out / "odd.png").stat().st_mtime_ns >= stamp
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cli_with_preset_and_lightning_ckpt(tmp_path):
    cfg = load_config("autoencoder/kl_f8_tiny")
    model = instantiate(cfg).eval()
    sd = {"first_stage_model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "global_step": 1}, tmp_path / "sd.ckpt")
    Image.fromarray(np.zeros((20, 12, 3), np.uint8)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--quiet", "--device", "cpu"]
    ckpt = ["--ckpt", str(tmp_path / "sd.ckpt")]
    rc = main(
        [*args, "--config", "autoencoder/kl_f8_tiny", *ckpt, "--prefix", "first_stage_model."]
    )
    assert rc == 0 and (tmp_path / "o" / "a.png").is_file()


def test_cli_bad_checkpoint_and_missing_config_exit_2(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_text("nope")
    assert (
        main(["a.png", "--config", "autoencoder/vq_f4_tiny", "--ckpt", str(tmp_path / "x.ckpt")])
        == 2
    )
    assert "x.ckpt is not a PyTorch checkpoint" in capsys.readouterr().err
    assert main(["a.png"]) == 2
    assert main(["a.png", "--config", "autoencoder/nope", "--random-weights"]) == 2
    assert "not found" in capsys.readouterr().err


def test_output_names_disambiguate_collisions(tmp_path):
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "y.jpg"]
    names = output_names(files, ".png")
    assert names[files[2]] == "y.png"
    assert len(set(names.values())) == 3


def _two_inputs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.full((8, 12, 3), 100, np.uint8)).save(folder / name)
    return folder


def test_cli_output_side_checked_before_loading(tmp_path, tiny_vq_file, capsys, monkeypatch):
    """Issue: --suffix .xyz, an -o that is a file and outputs that are the inputs failed (or
    overwrote) only after the work."""
    import ldm.autoencoders.loading as weights

    src = _two_inputs(tmp_path / "in")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    monkeypatch.setattr(weights, "load_autoencoder", lambda *a, **k: pytest.fail("loaded"))
    base = [str(src), "--ckpt", str(tiny_vq_file), "--quiet"]
    assert main([*base, "-o", str(tmp_path / "o"), "--suffix", ".xyz"]) == 2
    assert "cannot write images of type '.xyz'" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main([*base, "-o", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*base, "-o", str(src), "--overwrite"]) == 2
    assert "refusing to write over input files" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert not (tmp_path / "o").exists()


def test_cli_a_failed_write_is_reported_and_the_batch_goes_on(tmp_path, tiny_vq_file, capsys):
    src = _two_inputs(tmp_path / "in")
    out = tmp_path / "o"
    (out / "b.png").mkdir(parents=True)
    assert main([str(src), "--ckpt", str(tiny_vq_file), "-o", str(out), "--quiet",
                 "--overwrite"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "b.png: cannot write" in err and "1 input(s) failed" in err
    assert (out / "a.png").is_file() and (out / "c.png").is_file()


def test_cli_without_weights_is_refused_unless_asked(tmp_path, capsys):
    """Issue: without --ckpt the untrained model reconstructed silently."""
    src = _two_inputs(tmp_path / "in")
    out = tmp_path / "o"
    assert main([str(src), "--config", "autoencoder/vq_f4_tiny", "-o", str(out)]) == 2
    assert "give the weights with --ckpt" in capsys.readouterr().err
    assert not out.exists()
    argv = [str(src), "--config", "autoencoder/vq_f4_tiny", "-o", str(out), "--random-weights"]
    assert main([*argv, "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
