"""moe-sr-reconstruct with the FA-VAE presets: LR-guided VQ-f4 (--lr / --lr-from-hr) and the
KL-f8 drop-in, on tiny random weights; reconstruct_image_with_lr padding and alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ldm.autoencoders.lr_guided import lr_from_hr, needs_lr_input, reconstruct_image_with_lr
from ldm.autoencoders.reconstruct import reconstruct_image
from ldm.checkpoint import load_pretrained, save_pretrained
from ldm.cli.reconstruct import main
from ldm.config import instantiate, load_config
from ldm.data.image_io import read_image
from ldm.data.sr_inputs import make_sr_inputs
from ldm.evaluation.reconstruction import reconstruct as protocol_reconstruct


def _save(tmp_path_factory, preset: str, name: str):
    cfg = load_config(preset)
    torch.manual_seed(0)
    model = instantiate(cfg).eval()
    path = tmp_path_factory.mktemp("w") / f"{name}.safetensors"
    save_pretrained(model, path, cfg)
    return path


@pytest.fixture(scope="module")
def fa_vq_file(tmp_path_factory):
    return _save(tmp_path_factory, "fa_vae/vq_f4_fa_tiny", "fa_vq_tiny")


@pytest.fixture(scope="module")
def fa_kl_file(tmp_path_factory):
    return _save(tmp_path_factory, "fa_vae/kl_f8_fa_tiny", "fa_kl_tiny")


def _png(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _close_u8(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 0.5 / 255 + 1e-6  # uint8 rounding of the written file only


def test_detection_is_duck_typed(fa_vq_file, fa_kl_file):
    assert needs_lr_input(load_pretrained(fa_vq_file))
    assert not needs_lr_input(load_pretrained(fa_kl_file))


def test_lr_from_hr_equals_the_evaluation_protocol(fa_vq_file):
    model = load_pretrained(fa_vq_file)
    x = (torch.randint(0, 256, (3, 16, 24)) / 255).float()
    y = reconstruct_image_with_lr(model, x)
    torch.testing.assert_close(y, protocol_reconstruct(model, x[None])[0])
    # the LR given explicitly (the same bicubic x1/8) gives the same result
    lr = lr_from_hr(x)
    assert lr.shape == (3, 2, 3)
    torch.testing.assert_close(reconstruct_image_with_lr(model, x, lr), y)
    # and the LR matters: another LR gives another reconstruction
    assert not torch.allclose(reconstruct_image_with_lr(model, x, 1 - lr), y)


class EchoLR(nn.Module):
    """LR-guided stand-in with a x16 down-sampling: returns the LR input it was given."""

    downsample_factor = 16

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def lr_features(self, lr_up):
        return [lr_up]

    def forward(self, x, lr_up=None):
        assert x.shape == lr_up.shape and x.shape[-1] % 16 == 0 and x.shape[-2] % 16 == 0
        return lr_up + self.w


def test_padding_keeps_hr_and_lr_aligned():
    # HR 48x56 -> padded to 48x64 (lcm(8, 16) = 16); the LR 6x7 -> 6x8, upsampled x8 = 48x64.
    lr = (torch.randint(0, 256, (3, 6, 7)) / 255).float()
    x = torch.rand(3, 48, 56)
    y = reconstruct_image_with_lr(EchoLR(), x, lr)
    assert y.shape == x.shape
    ref = (make_sr_inputs(lr).vae_enc_input_x8[0] + 1) / 2  # the LR upsampled without padding
    # identical (so aligned) away from the padded right border (bicubic: 2 LR px = 16 HR px)
    torch.testing.assert_close(y[:, :, :40], ref[:, :, :40], atol=1e-6, rtol=0)


def test_wrong_lr_size_is_refused(fa_vq_file):
    model = load_pretrained(fa_vq_file)
    with pytest.raises(ValueError, match=r"exactly 1/8 of the HR size \(2x3\)"):
        reconstruct_image_with_lr(model, torch.rand(3, 16, 24), torch.rand(3, 2, 4))


def test_cli_lr_from_hr_odd_sizes(tmp_path, fa_vq_file):
    src = tmp_path / "hr"
    _png(src / "odd.png", 13, 21)
    _png(src / "tiny.png", 5, 3, seed=1)
    out = tmp_path / "out"
    argv = [str(src), "--ckpt", str(fa_vq_file), "-o", str(out), "--quiet", "--lr-from-hr"]
    assert main(argv) == 0
    model = load_pretrained(fa_vq_file)
    for name, size in (("odd.png", (13, 21)), ("tiny.png", (5, 3))):
        got = read_image(out / name)
        assert got.shape[-2:] == size
        _close_u8(got, reconstruct_image_with_lr(model, read_image(src / name)))


def test_cli_lr_folder_matched_by_name(tmp_path, fa_vq_file, capsys):
    hr, lr = tmp_path / "hr", tmp_path / "lr"
    _png(hr / "a.png", 24, 40)
    _png(lr / "a.jpg", 3, 5, seed=2)  # same stem, another extension
    _png(hr / "b.png", 16, 16, seed=3)
    _png(lr / "b.png", 3, 3, seed=4)  # not 1/8: refused
    _png(hr / "c.png", 8, 8, seed=5)  # no LR
    out = tmp_path / "out"
    assert (
        main([str(hr), "--ckpt", str(fa_vq_file), "-o", str(out), "--quiet", "--lr", str(lr)]) == 1
    )
    err = capsys.readouterr().err
    assert "2 input(s) failed" in err
    assert "b.png: LR image is 3x3 (HxW) but the HR image is 16x16" in err
    assert "exactly 1/8 of the HR size (2x2)" in err
    assert "c.png: no LR image named c.* in" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    model = load_pretrained(fa_vq_file)
    ref = reconstruct_image_with_lr(model, read_image(hr / "a.png"), read_image(lr / "a.jpg"))
    _close_u8(read_image(out / "a.png"), ref)
    # one LR file for one input
    out2 = tmp_path / "out2"
    argv = [str(hr / "a.png"), "--ckpt", str(fa_vq_file), "-o", str(out2), "--quiet",
            "--lr", str(lr / "a.jpg")]  # fmt: skip
    assert main(argv) == 0
    assert torch.equal(read_image(out2 / "a.png"), read_image(out / "a.png"))


def test_cli_lr_option_errors(tmp_path, fa_vq_file, fa_kl_file, capsys):
    hr = tmp_path / "hr"
    _png(hr / "a.png", 16, 16)
    _png(hr / "b.png", 16, 16, seed=1)
    base = [str(hr), "-o", str(tmp_path / "out"), "--quiet"]
    assert main([*base, "--ckpt", str(fa_vq_file)]) == 2
    err = capsys.readouterr().err
    assert "FAVQModel is LR-guided" in err and "--lr PATH_OR_DIR" in err and "--lr-from-hr" in err
    assert main([*base, "--ckpt", str(fa_kl_file), "--lr-from-hr"]) == 2
    assert "--lr-from-hr is for LR-guided models" in capsys.readouterr().err
    assert main([*base, "--ckpt", str(fa_kl_file), "--lr", str(hr)]) == 2
    assert "FAKLModel takes no LR image: drop --lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--ckpt", str(fa_vq_file), "--lr", str(hr), "--lr-from-hr"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main([*base, "--ckpt", str(fa_vq_file), "--lr", str(hr / "a.png")]) == 1
    assert "a.png is one file but there are 2 inputs: give a folder" in capsys.readouterr().err
    assert main([*base, "--ckpt", str(fa_vq_file), "--lr", str(tmp_path / "nope")]) == 1
    assert "nope: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_kl_f8_fa_is_a_drop_in(tmp_path, fa_kl_file):
    src = tmp_path / "in"
    _png(src / "odd.png", 13, 19)
    out = tmp_path / "out"
    assert main([str(src), "--ckpt", str(fa_kl_file), "-o", str(out), "--quiet"]) == 0
    model = load_pretrained(fa_kl_file)
    _close_u8(read_image(out / "odd.png"), reconstruct_image(model, read_image(src / "odd.png")))
    # the preset name + weights file works the same way
    out2 = tmp_path / "out2"
    argv = [str(src), "--config", "fa_vae/kl_f8_fa_tiny", "--ckpt", str(fa_kl_file),
            "-o", str(out2), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert torch.equal(read_image(out2 / "odd.png"), read_image(out / "odd.png"))
