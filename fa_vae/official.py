"""Converters from the official FA-VAE constructor arguments to our ``{target, params}``.

``VQModelResiUnet(ddconfig, n_embed, embed_dim, ...)`` (``sr_8x_inf/ldm/models/vqmodel.py``)
and ``AutoencoderKLAFF(ddconfig, embed_dim, ...)`` (``vae_txt2img_inf/models/autoencoder.py``)
become ``fa_vae_vq_f4`` / ``fa_vae_kl_f8``. The official ``ddconfig`` carries
``num_fuse_block`` (a ``Decoder_Mix_Unet`` argument, default 2); ours has it next to
``ddconfig``. Arguments that only matter to the official training code (checkpoint paths,
monitors, image keys...) are dropped; anything that would change the network and that we
do not implement raises an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm.autoencoders.official import DDCONFIG_FIXED, DDCONFIG_KEYS
from ldm.official import register_official

#: official ddconfig keys shared with LDM's autoencoders (same meaning, same checks)
_DDCONFIG_KEYS = DDCONFIG_KEYS
_DDCONFIG_DEFAULTS = DDCONFIG_FIXED
#: official constructor arguments of the training code only
_TRAINING_ONLY = {
    "ckpt_path",
    "ignore_keys",
    "image_key",
    "colorize_nlabels",
    "monitor",
    "batch_resize_range",
    "scheduler_config",
    "lr_g_factor",
    "use_ema",
    "freeze_dec",
    "ema_decay",
    "learn_logvar",
    "lossconfig",
}


def _convert_ddconfig(ddconfig: Mapping[str, Any], cls: str) -> tuple[dict[str, Any], dict]:
    """Our ddconfig and the FA-specific extras found in the official one."""
    ours, extras = {}, {}
    for key, value in ddconfig.items():
        if key in _DDCONFIG_KEYS:
            ours[key] = value
        elif key in _DDCONFIG_DEFAULTS:
            if value != _DDCONFIG_DEFAULTS[key]:
                raise ValueError(
                    f"{cls}: ddconfig {key}={value!r} is not supported "
                    f"(only {_DDCONFIG_DEFAULTS[key]!r})"
                )
        elif key in ("num_fuse_block", "fusion_w"):
            extras[key] = value
        else:
            raise ValueError(f"{cls}: unknown ddconfig key {key!r}")
    return ours, extras


def _check_rest(params: Mapping[str, Any], known: set[str], cls: str) -> None:
    unknown = sorted(set(params) - known - _TRAINING_ONLY)
    if unknown:
        raise ValueError(f"{cls}: unsupported constructor argument(s) {unknown}")
    for key in ("remap",):
        if params.get(key) is not None:
            raise ValueError(f"{cls}: {key}={params[key]!r} is not supported")


@register_official("VQModelResiUnet")
def vq_model_resi_unet(params: Mapping[str, Any]) -> dict[str, Any]:
    """``VQModelResiUnet`` kwargs -> ``fa_vae_vq_f4``.

    The model-level ``fusion_w`` (default 1.0) overrides the decoder's, as in the release.
    """
    cls = "VQModelResiUnet"
    _check_rest(
        params,
        {
            "ddconfig",
            "n_embed",
            "embed_dim",
            "remap",
            "sane_index_shape",
            "fusion_w",
            "latent_scale_factor",
        },
        cls,
    )
    ddconfig, extras = _convert_ddconfig(params["ddconfig"], cls)
    return {
        "target": "fa_vae_vq_f4",
        "params": {
            "ddconfig": ddconfig,
            "n_embed": int(params["n_embed"]),
            "embed_dim": int(params["embed_dim"]),
            "scale_factor": float(params.get("latent_scale_factor", 1.0)),
            "num_fuse_block": int(extras.get("num_fuse_block", 2)),
            "fusion_w": float(params.get("fusion_w", 1.0)),
        },
    }


@register_official("AutoencoderKLAFF")
def autoencoder_kl_aff(params: Mapping[str, Any]) -> dict[str, Any]:
    """``AutoencoderKLAFF`` kwargs -> ``fa_vae_kl_f8`` (SD's latent scale 0.18215)."""
    cls = "AutoencoderKLAFF"
    _check_rest(params, {"ddconfig", "embed_dim"}, cls)
    ddconfig, extras = _convert_ddconfig(params["ddconfig"], cls)
    if extras:
        raise ValueError(f"{cls}: ddconfig {sorted(extras)} belong to the VQ FA-VAE only")
    return {
        "target": "fa_vae_kl_f8",
        "params": {"ddconfig": ddconfig, "embed_dim": int(params["embed_dim"])},
    }
