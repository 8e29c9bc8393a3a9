"""Swapping a diffusers SD VAE decoder for the KL-f8 FA-VAE decoder (no download)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ldm.config import instantiate, load_config

diffusers = pytest.importorskip("diffusers")


def _tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()


def test_swap_decoder_of_autoencoder_and_pipeline(tmp_path):
    from fa_vae.diffusers_swap import swap_vae_decoder

    fa = instantiate(load_config("fa_vae/kl_f8_fa_tiny"))
    vae = _tiny_vae()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latent_before = vae.encode(x).latent_dist.mean
        plain = vae.decode(latent_before).sample
        pipe = SimpleNamespace(vae=vae)  # anything with a diffusers AutoencoderKL as .vae
        assert swap_vae_decoder(pipe, fa) is pipe
        z = torch.randn(2, 4, 4, 4)
        got = vae.decode(z).sample
        assert torch.equal(got, fa.decode(z))
        assert not torch.allclose(vae.decode(latent_before).sample, plain)
        # encoder and scaling factor untouched
        assert torch.equal(vae.encode(x).latent_dist.mean, latent_before)
        assert vae.config.scaling_factor == 0.18215
        vae.enable_slicing()  # diffusers' per-sample path still works
        torch.testing.assert_close(vae.decode(z).sample, got, atol=1e-5, rtol=1e-5)

    # from a weights file
    path = tmp_path / "fa.pth"
    torch.save(fa.state_dict(), path)
    with pytest.raises(Exception, match="wrong shape|does not match"):
        swap_vae_decoder(_tiny_vae(), path)  # the released preset is full size
    with pytest.raises(TypeError, match="AutoencoderKL"):
        swap_vae_decoder(SimpleNamespace(vae=None), fa)
