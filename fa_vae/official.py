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

from ldm.autoencoders.official import TRAINING_ONLY, convert_ddconfig
from ldm.official import register_official

#: FA-specific official ddconfig keys (fuse layer settings), passed on as model parameters
_FA_DDCONFIG_KEYS = ("num_fuse_block", "fusion_w")
#: official constructor arguments of the training code only (LDM's, with the FA fine-tuning
#: ones; ``sane_index_shape`` is a model argument here)
_TRAINING_ONLY = (set(TRAINING_ONLY) - {"sane_index_shape"}) | {
    "freeze_dec",
    "ema_decay",
    "learn_logvar",
}


def _convert_ddconfig(ddconfig: Mapping[str, Any], cls: str) -> tuple[dict[str, Any], dict]:
    """Our ddconfig (LDM's keys and checks) and the FA-specific extras of the official one."""
    extras = {k: v for k, v in ddconfig.items() if k in _FA_DDCONFIG_KEYS}
    rest = {k: v for k, v in ddconfig.items() if k not in _FA_DDCONFIG_KEYS}
    return convert_ddconfig(rest, cls), extras


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
