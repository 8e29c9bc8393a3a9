"""Converters from CompVis latent-diffusion's autoencoder arguments to our configs.

``ldm.models.autoencoder.VQModel`` / ``VQModelInterface`` (``ddconfig, n_embed,
embed_dim, ...``) become ``vq_model``; ``AutoencoderKL`` (``ddconfig, embed_dim,
...``) becomes ``kl_model``. So the ``model.params`` of an LDM YAML
(``models/first_stage_models/vq-f4/config.yaml``) build our model::

    from ldm.official import model_from_official
    model = model_from_official("VQModel", yaml_cfg["model"]["params"])

Arguments that only matter to LDM's training code (loss config, checkpoint
path, monitor...) are dropped with a log line; anything that would change the
network and that we do not implement raises an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ldm.official import register_official

logger = logging.getLogger(__name__)

#: official ddconfig keys our Encoder/Decoder take unchanged
DDCONFIG_KEYS = (
    "double_z",
    "z_channels",
    "resolution",
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "resamp_with_conv",
    "give_pre_end",
)
#: official ddconfig keys that are accepted at these values only (no effect on the network)
DDCONFIG_FIXED = {"tanh_out": False, "use_linear_attn": False, "attn_type": "vanilla"}
#: constructor arguments of LDM's training code only
TRAINING_ONLY = (
    "lossconfig",
    "ckpt_path",
    "ignore_keys",
    "image_key",
    "colorize_nlabels",
    "monitor",
    "batch_resize_range",
    "scheduler_config",
    "lr_g_factor",
    "use_ema",
    "sane_index_shape",
)


def convert_ddconfig(ddconfig: Mapping[str, Any], cls: str) -> dict[str, Any]:
    """Our ddconfig for an official one (unsupported settings raise ``ValueError``)."""
    ours: dict[str, Any] = {}
    for key, value in ddconfig.items():
        if key in DDCONFIG_KEYS:
            ours[key] = value
        elif key in DDCONFIG_FIXED:
            if value != DDCONFIG_FIXED[key]:
                raise ValueError(
                    f"{cls}: ddconfig {key}={value!r} is not supported "
                    f"(only {DDCONFIG_FIXED[key]!r})"
                )
        else:
            raise ValueError(f"{cls}: unknown ddconfig key {key!r}; known: {sorted(DDCONFIG_KEYS)}")
    return ours


def _split(params: Mapping[str, Any], model_keys: tuple[str, ...], cls: str) -> dict[str, Any]:
    unknown = sorted(set(params) - set(model_keys) - set(TRAINING_ONLY) - {"remap"})
    if unknown:
        raise ValueError(f"{cls}: unsupported constructor argument(s) {unknown}")
    if params.get("remap") is not None:
        raise ValueError(f"{cls}: codebook index remapping (remap=...) is not supported")
    dropped = sorted(k for k in params if k in TRAINING_ONLY)
    if dropped:
        logger.info("%s: training-only arguments not used by the network: %s", cls, dropped)
    return {k: params[k] for k in model_keys if k in params}


@register_official("VQModel")
def vq_model_from_official(params: Mapping[str, Any]) -> dict[str, Any]:
    keep = _split(params, ("ddconfig", "n_embed", "embed_dim"), "VQModel")
    keep["ddconfig"] = convert_ddconfig(keep["ddconfig"], "VQModel")
    return {"target": "vq_model", "params": keep}


register_official("VQModelInterface")(vq_model_from_official)


@register_official("AutoencoderKL")
def kl_model_from_official(params: Mapping[str, Any]) -> dict[str, Any]:
    keep = _split(params, ("ddconfig", "embed_dim"), "AutoencoderKL")
    keep["ddconfig"] = convert_ddconfig(keep["ddconfig"], "AutoencoderKL")
    return {"target": "kl_model", "params": keep}
