"""Checker for ``AutoencoderKLAFF`` fixtures (e.g. ``fa_vae_klf8_small``): the KL-f8 FA-VAE.

Builds our model from ``config.json`` via the official-name converter, loads the weights
strictly and checks every tensor of ``io.safetensors``: the moments, the posterior
(mean, clamped logvar, std), the decode (frequency module before ``norm_out``) and the
frequency U-Net component golden.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fixture_checkers.common import assert_close, load_io
from fixture_checkers.fa_vae_vqf4 import build_model

FEATURE = "FA-VAE KL-f8 decoder (fa_vae, issue 4)"


@torch.no_grad()
def check(fixture_dir: Path) -> None:
    model, _ = build_model(fixture_dir)
    io = load_io(fixture_dir)
    checked = {"image", "latent"}

    image = io["image"]
    assert_close(model.quant_conv(model.encoder(image)), io["moments"], "moments")
    posterior = model.encode(image)
    assert_close(posterior.mean, io["posterior_mean"], "posterior_mean")
    assert_close(posterior.logvar, io["posterior_logvar"], "posterior_logvar")
    assert_close(posterior.std, io["posterior_std"], "posterior_std")
    checked.update({"moments", "posterior_mean", "posterior_logvar", "posterior_std"})

    assert_close(model.decode(io["latent"]), io["decoded"], "decoded")
    checked.add("decoded")
    unet = model.decoder.unet_1
    assert_close(unet(io["comp_unet1_in"]), io["comp_unet1_out"], "comp_unet1_out")
    checked.update(k for k in io if k.startswith("comp_"))

    unchecked = sorted(set(io) - checked)
    assert not unchecked, f"fixture tensors without a check: {unchecked}"
