"""Checker for ``VQModelResiUnet`` fixtures (e.g. ``fa_vae_vqf4_small``): the VQ-f4 FA-VAE.

Builds our model from the fixture's ``config.json`` through the official-name converter,
loads ``weights.safetensors`` strictly and checks every tensor of ``io.safetensors``:
the encoder input made from the LR image, the pre-quantisation latent, the encoder level
features, quantisation (indices exactly), both decodes and the component goldens (AFNO
filter, frequency U-Net, fuse layer). Works for any widths and ``num_fuse_block``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fixture_checkers.common import assert_close, load_io, load_json

FEATURE = "FA-VAE VQ-f4 decoder (fa_vae, issue 4)"


def build_model(fixture_dir: Path):
    from ldm.checkpoint import load_state_dict_strict
    from ldm.official import model_from_official

    cfg = load_json(fixture_dir, "config.json")
    model = model_from_official(cfg["cls"], cfg["params"])
    weights = load_file(str(fixture_dir / "weights.safetensors"))
    load_state_dict_strict(model, weights, what=str(fixture_dir / "weights.safetensors"))
    return model.eval(), cfg


def check_image_from_lr(io: dict[str, torch.Tensor], checked: set[str]) -> None:
    """``image`` = MATLAB-bicubic resize of the uint8 LR image, /255, *2-1 (exact)."""
    if "lr_image_u8" not in io:
        return
    from ldm.data.resize import imresize

    lr = io["lr_image_u8"].numpy()
    assert np.array_equal(lr, np.round(lr)), "lr_image_u8 must hold integers"
    h, w = io["image"].shape[-2:]
    ups = [imresize(img.astype(np.uint8), output_shape=(h, w)) for img in lr]
    image = torch.from_numpy(np.stack(ups).astype(np.float32) / 255.0 * 2 - 1).permute(0, 3, 1, 2)
    assert_close(image, io["image"], "image (from lr_image_u8)", atol=1e-6, rtol=0)
    checked.update({"lr_image_u8", "image"})


@torch.no_grad()
def check(fixture_dir: Path) -> None:
    model, _ = build_model(fixture_dir)
    io = load_io(fixture_dir)
    checked: set[str] = set()
    check_image_from_lr(io, checked)

    image, latent = io["image"], io["latent"]
    checked.update({"image", "latent"})
    h, feats = model.encode(image, return_features=True)
    assert_close(h, io["h_prequant"], "h_prequant")
    checked.add("h_prequant")
    # The release passes the features of levels 1 .. n-2 (enc_fea[i] = our level i + 1).
    fea_names = sorted(
        (k for k in io if re.fullmatch(r"enc_fea_\d+", k)), key=lambda k: int(k.rsplit("_", 1)[1])
    )
    assert len(fea_names) == len(feats) - 1, (
        f"fixture has {len(fea_names)} encoder features, the model makes {len(feats) - 1}"
    )
    for i, name in enumerate(fea_names):
        assert_close(feats[i + 1], io[name], name)
        checked.add(name)

    z_q, emb_loss, indices = model.quantize(latent)
    assert_close(z_q, io["latent_quantized"], "latent_quantized")
    assert_close(indices.reshape(io["quant_indices"].shape), io["quant_indices"], "quant_indices")
    assert_close(emb_loss.reshape(io["emb_loss"].shape), io["emb_loss"], "emb_loss")
    checked.update({"latent_quantized", "quant_indices", "emb_loss"})

    # decode with the stored official features (level 0 is not fused: any tensor works)
    skips = [feats[0]] + [io[name] for name in fea_names]
    decoded = model.decode(latent, skips=skips)
    assert_close(decoded, io["decoded"], "decoded")
    decoded_noquant = model.decode(latent, skips=skips, quantize=False)
    assert_close(decoded_noquant, io["decoded_noquant"], "decoded_noquant")
    # and end to end from our own features
    assert_close(model.decode(latent, skips=feats), io["decoded"], "decoded (own features)")
    checked.update({"decoded", "decoded_noquant"})

    unet = model.decoder.unet_1
    assert_close(unet.conv1.filter(io["comp_afno_in"]), io["comp_afno_out"], "comp_afno_out")
    assert_close(unet(io["comp_unet1_in"]), io["comp_unet1_out"], "comp_unet1_out")
    fuse = model.decoder.fusion_layer_1
    out = fuse(io["comp_fusion_enc"], io["comp_fusion_dec"], 1.0)
    assert_close(out, io["comp_fusion_out"], "comp_fusion_out")
    checked.update(k for k in io if k.startswith("comp_"))

    unchecked = sorted(set(io) - checked)
    assert not unchecked, f"fixture tensors without a check: {unchecked}"
