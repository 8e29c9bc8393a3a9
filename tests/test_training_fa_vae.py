"""FA-VAE training: GAN / frequency loss pieces and a tiny run (only the FA parts train)."""

from __future__ import annotations

import pytest
import torch

from ldm.cli.train import main
from ldm.config import CONFIG_ROOT, instantiate, load_config
from ldm.training.gan_losses import (
    FocalFrequencyLoss,
    NLayerDiscriminator,
    adaptive_weight,
    adopt_weight,
    grid_frequency_loss,
    grid_frequency_mask,
    hinge_d_loss,
)

TINY_FA = str(CONFIG_ROOT / "train" / "fa_vae_tiny.yaml")


def test_discriminator_layout():
    d = NLayerDiscriminator(3, 64, 3)
    names = [n for n, _ in d.named_parameters()]
    # taming's PatchGAN: conv, (conv+BN) x 3, conv; biases only where no BatchNorm follows
    assert names == ["main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight",
                     "main.3.bias", "main.5.weight", "main.6.weight", "main.6.bias",
                     "main.8.weight", "main.9.weight", "main.9.bias", "main.11.weight",
                     "main.11.bias"]  # fmt: skip
    assert tuple(d(torch.zeros(1, 3, 64, 64)).shape) == (1, 1, 6, 6)


def test_hinge_and_schedule():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    assert adopt_weight(1.0, 9, threshold=10) == 0.0
    assert adopt_weight(1.0, 10, threshold=10) == 1.0


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    nll = (3.0 * w).sum()  # grad 3 per entry
    g = (0.5 * w).sum()  # grad 0.5 per entry
    d = adaptive_weight(nll, g, w, scale=2.0)
    assert d.item() == pytest.approx(2.0 * 3.0 / (0.5 + 1e-4 / 2**0.5), rel=1e-3)
    assert not d.requires_grad


def test_focal_frequency_loss():
    ffl = FocalFrequencyLoss()
    x = torch.randn(2, 3, 16, 16)
    assert ffl(x, x).item() == 0.0
    y = x + 0.1 * torch.randn_like(x)
    assert ffl(y, x).item() > 0
    y.requires_grad_(True)
    ffl(y, x).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_grid_frequency_loss_sees_a_pattern_at_the_latent_grid_only():
    mask = grid_frequency_mask(64, 48)
    # k/8 cycles per pixel (period 4 is a subset): every 8th row bin of 64, every 6th column bin
    # of 48; 8 x 8 bins, DC excluded
    assert int(mask.sum()) == 8 * 8 - 1 and not mask[0, 0] and mask[8, 6] and not mask[4, 6]
    assert int(grid_frequency_mask(20, 20, periods=(4,)).sum()) == 4 * 4 - 1
    torch.manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 68, 68), 5, 1) * 2 - 1  # smooth, 64 px
    assert grid_frequency_loss(x, x).item() == 0.0

    def pattern(period: int) -> torch.Tensor:
        i = torch.arange(64, dtype=torch.float32)
        wave = torch.cos(2 * torch.pi * i / period)
        return 0.05 * wave[:, None] * wave[None, :]

    at_grid = grid_frequency_loss(x + pattern(4), x).item()
    off_grid = grid_frequency_loss(x + pattern(6), x).item()
    assert at_grid > 20 * off_grid, (at_grid, off_grid)
    y = (x + pattern(8)).requires_grad_(True)
    grid_frequency_loss(y, x).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="differ"):
        grid_frequency_loss(x, x[..., :32])
    with pytest.raises(ValueError, match="no FFT bin"):
        grid_frequency_loss(x[..., :1, :1], x[..., :1, :1])


def test_grid_weight_adds_the_grid_loss_to_the_reconstruction_losses():
    from ldm.training.autoencoder_module import AutoencoderGANModule

    kw = dict(autoencoder=load_config("autoencoder/vq_f4_tiny"), trainable=[""],
              perceptual_weight=0.0)  # fmt: skip
    hr = torch.rand(1, 3, 32, 32) * 2 - 1
    rec = hr + 0.1 * torch.randn_like(hr)
    assert "grid" not in AutoencoderGANModule(**kw).rec_losses(hr, rec)
    losses = AutoencoderGANModule(**kw, grid_weight=2.0).rec_losses(hr, rec)
    assert losses["grid"].item() == pytest.approx(grid_frequency_loss(rec, hr).item())


def test_hr_latent_batches_can_have_their_own_perceptual_weight():
    from ldm.config import ConfigError
    from ldm.training.autoencoder_module import AutoencoderGANModule

    kw = dict(autoencoder=load_config("autoencoder/vq_f4_tiny"), trainable=[""],
              perceptual_weight=0.5, lpips_net="alex")  # fmt: skip
    batch = {"hr": torch.zeros(1, 3, 32, 32), "latent": torch.zeros(1, 3, 8, 8)}
    m = AutoencoderGANModule(**kw, hr_latent_prob=1.0, hr_latent_perceptual_weight=0.0).train()
    assert not m.use_stored_latent(batch)  # hr_latent_prob 1: always the HR encoding
    assert not m.use_stored_latent({"hr": batch["hr"]})  # no stored latent at all
    assert m.eval().use_stored_latent(batch)  # validation decodes the stored latent
    assert m.perceptual_weight_for(use_stored=False) == 0.0
    assert m.perceptual_weight_for(use_stored=True) == 0.5
    assert AutoencoderGANModule(**kw).perceptual_weight_for(use_stored=False) == 0.5
    hr = torch.rand(1, 3, 32, 32) * 2 - 1
    rec = (hr + 0.2 * torch.randn_like(hr)).clamp(-1, 1)
    l1 = (hr - rec).abs().mean().item()
    plain = m.rec_losses(hr, rec, perceptual_weight=0.0)
    assert plain["nll"].item() == pytest.approx(l1) and "lpips" not in plain
    full = m.rec_losses(hr, rec)
    assert full["nll"].item() == pytest.approx(l1 + 0.5 * full["lpips"].item(), rel=1e-5)
    assert full["lpips"].item() > 0
    with pytest.raises(KeyError, match="no stored latent"):
        m.reconstruct({"hr": batch["hr"]}, use_stored=True)
    with pytest.raises(ConfigError, match="hr_latent_perceptual_weight must be >= 0"):
        AutoencoderGANModule(**kw, hr_latent_perceptual_weight=-1.0)


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_tiny_fa_vae_training_trains_only_the_fa_parts(tmp_path):
    from test_training_run import make_hr_folder

    hr = make_hr_folder(tmp_path / "hr")
    base = instantiate(load_config("autoencoder/vq_f4_tiny"))  # plain VQ: no FA parts
    torch.save(base.state_dict(), tmp_path / "base.pth")
    logdir = tmp_path / "logs"
    assert main(["--base", TINY_FA, "-l", str(logdir), f"data.train.params.folder={hr}",
                 f"model.params.ckpt={tmp_path / 'base.pth'}", "lightning.trainer.max_steps=8",
                 "lightning.checkpoint.every_n_train_steps=2"]) == 0  # fmt: skip
    (run_dir,) = logdir.iterdir()
    last = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    sd = last["state_dict"]
    assert last["global_step"] == 8  # 4 batches x 2 optimizers
    assert not any("lpips" in k or k.startswith("_lpips") for k in sd)
    assert any(k.startswith("discriminator.main.") for k in sd)
    for k, v in base.state_dict().items():  # the frozen base is untouched
        assert torch.equal(sd["model." + k], v), k
    first = _ckpt(next((run_dir / "checkpoints").glob("best-*.ckpt")))["state_dict"]
    fa = [k for k in sd if k.startswith(("model.decoder.unet_1.", "model.decoder.fusion_layer_1."))]
    assert fa and any(not torch.equal(sd[k], first[k]) for k in fa if k in first)
    assert (run_dir / "images" / "train" / "step-000004.png").is_file()


def test_no_trainable_match_is_an_error():
    from ldm.config import ConfigError
    from ldm.training.autoencoder_module import AutoencoderGANModule

    with pytest.raises(ConfigError, match="no autoencoder parameter starts with"):
        AutoencoderGANModule(
            autoencoder=load_config("autoencoder/vq_f4_tiny"),
            trainable=["decoder.unet_1."],
            perceptual_weight=0.0,
        )


def test_tiny_kl_fa_vae_training_runs(tmp_path):
    from test_training_run import make_hr_folder

    hr = make_hr_folder(tmp_path / "hr")
    logdir = tmp_path / "logs"
    cfg = str(CONFIG_ROOT / "train" / "fa_vae_kl_tiny.yaml")
    assert main(["--base", cfg, "-l", str(logdir), f"data.train.params.folder={hr}",
                 "model.params.perceptual_weight=0.0", "lightning.image_logger=null",
                 "lightning.trainer.max_steps=4"]) == 0  # fmt: skip
    (run_dir,) = logdir.iterdir()
    sd = _ckpt(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(k.startswith("model.decoder.unet_1.") for k in sd)
    assert not any(k.startswith("model.decoder.fusion_layer") for k in sd)
