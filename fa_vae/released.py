"""Loading the released FA-VAE weights (``first_stage_models/{vq-f4,kl-f8}/fa_vae.pth``).

The release ships plain state dicts in the official naming, which is also ours, so loading
is strict with no renaming. :func:`load_released` builds the matching preset, recognises
what a file holds and says which file to pass when it is the wrong one. Our own
safetensors files (``ldm.checkpoint.save_pretrained``) load through the same call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import (
    PRESET_GUESSERS,
    CheckpointMismatchError,
    load_pretrained,
    load_state_dict_strict,
    read_pretrained_config,
    read_state_dict,
)
from ldm.config import instantiate, load_config

#: kind -> (preset, released file, registered target)
RELEASED = {
    "vq_f4": ("fa_vae/vq_f4_fa", "first_stage_models/vq-f4/fa_vae.pth", "fa_vae_vq_f4"),
    "kl_f8": ("fa_vae/kl_f8_fa", "first_stage_models/kl-f8/fa_vae.pth", "fa_vae_kl_f8"),
}

_PREFIX = "first_stage_model."


def identify(state_dict: Mapping[str, torch.Tensor]) -> str:
    """What a state dict holds: ``"vq_f4"`` / ``"kl_f8"`` (FA-VAEs) or a description."""
    keys = set(state_dict)
    has_unet = any(k.startswith("decoder.unet_1.") for k in keys)
    has_fuse = any(k.startswith("decoder.fusion_layer_") for k in keys)
    has_codebook = "quantize.embedding.weight" in keys
    if has_unet and has_codebook and has_fuse:
        return "vq_f4"
    if has_unet and not has_codebook and not has_fuse:
        return "kl_f8"
    if any(k.startswith(("model.diffusion_model.", "model_ema.")) for k in keys):
        return "a diffusion model checkpoint (UNet weights), not an autoencoder"
    if has_codebook:
        return "a plain VQ autoencoder without the FA decoder (e.g. LDM vq-f4 model.ckpt)"
    if "encoder.conv_in.weight" in keys:
        return "a plain KL autoencoder without the FA decoder (e.g. the SD1.5 VAE)"
    return "not an autoencoder state dict"


# priority 1: more specific than the plain autoencoders (an FA-VAE holds one)
@PRESET_GUESSERS.register("fa_vae", priority=1)
def guess_preset(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The :data:`ldm.checkpoint.PRESET_GUESSERS` entry for the FA-VAE presets."""
    kind = identify(state_dict)
    return RELEASED[kind][0] if kind in RELEASED else None


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the weights also under ``first_stage_model.`` (a full LDM checkpoint)."""
    if "encoder.conv_in.weight" in state_dict:
        return state_dict
    inner = {k[len(_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    return inner or state_dict


def load_released(
    path: str | os.PathLike,
    kind: str = "vq_f4",
    *,
    preset: str | None = None,
    overrides: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """The FA-VAE of ``kind`` (``"vq_f4"`` or ``"kl_f8"``) with the weights in ``path``.

    ``path``: the released ``fa_vae.pth`` (plain state dict, official naming) or one of our
    safetensors files. ``preset`` replaces the kind's preset (``fa_vae/vq_f4_fa`` or
    ``fa_vae/kl_f8_fa``, e.g. for other widths); ``overrides`` are dotlist changes to it
    (e.g. ``params.fusion_w=0.5``). Returns the model in eval mode.
    """
    if kind not in RELEASED:
        raise ValueError(f"kind must be one of {sorted(RELEASED)}, got {kind!r}")
    default_preset, expected_file, target = RELEASED[kind]
    path = Path(path)
    if path.suffix == ".safetensors":
        found_target = read_pretrained_config(path).get("target")
        if found_target != target:
            raise CheckpointMismatchError(
                f"{path} holds a {found_target!r} model, not {target!r} (kind={kind!r})"
            )
        return load_pretrained(path, kinds=("autoencoder",), map_location=map_location)

    state_dict = _strip_prefix(read_state_dict(path, map_location=map_location))
    found = identify(state_dict)
    if found != kind:
        what = f"the {found} FA-VAE ({RELEASED[found][1]})" if found in RELEASED else found
        hint = f"; or call load_released(path, kind={found!r})" if found in RELEASED else ""
        raise CheckpointMismatchError(
            f"{path} is {what}. For kind={kind!r} pass the released {expected_file}{hint}"
        )
    model = instantiate(load_config(preset or default_preset, overrides=overrides))
    load_state_dict_strict(model, state_dict, what=str(path))
    return model.eval()
