"""Initialise a UNet from another checkpoint (a previous stage, a shared base, a foreign layout).

Sources understood:

* a latent-diffusion / moe-sr Lightning checkpoint: raw weights under ``model.diffusion_model.``
  or, with ``weights="ema"``, the EMA copies ``model_ema.diffusion_model<name without dots>``;
* a plain UNet state dict or one of our safetensors files (``prefix=""``).

A ``key_map`` (``{target, params}`` naming a callable) rewrites the source names into the
target's, e.g. latent-diffusion's 4x SR UNet -> an FFN-MoE expert (block-index shift). It
returns ``(mapped_state_dict, new_keys)``: ``new_keys`` are target keys the source cannot
provide (the new FFN-MoE layers) and that keep their initial values. Everything else is
strict: a key missing that is not declared new, an unexpected key, or a wrong shape is an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.checkpoint import (
    CheckpointMismatchError,
    diff_state_dict,
    mismatch_message,
    read_state_dict,
    select_prefix,
)
from ldm.config import ConfigError, instantiate
from ldm.training.ema import shadow_name

logger = logging.getLogger(__name__)

RAW_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."


def unet_weights_from_state_dict(
    sd: Mapping[str, torch.Tensor], *, weights: str = "raw", prefix: str = "auto"
) -> dict[str, torch.Tensor]:
    """The UNet tensors of a checkpoint, named as the UNet's own ``state_dict``."""
    if weights not in ("raw", "ema"):
        raise ConfigError(f"weights must be 'raw' or 'ema', got {weights!r}")
    if prefix == "auto":
        prefix = RAW_PREFIX if any(k.startswith(RAW_PREFIX) for k in sd) else ""
    if weights == "raw":
        return select_prefix(sd, prefix)
    if prefix != RAW_PREFIX:
        raise ConfigError(
            "weights='ema' needs a latent-diffusion style checkpoint (model.diffusion_model.* "
            "and model_ema.*); a plain state dict or safetensors export holds one set only: "
            "use weights='raw'"
        )
    names = list(select_prefix(sd, prefix))
    out, missing = {}, []
    for n in names:
        key = EMA_PREFIX + shadow_name("diffusion_model." + n)
        if key in sd:
            out[n] = sd[key]
        else:
            missing.append(key)
    if missing:
        raise CheckpointMismatchError(
            f"the checkpoint has no EMA copy for {len(missing)} UNet tensors "
            f"(e.g. {missing[:3]}); was it trained without EMA? Use weights='raw'"
        )
    return out


def init_from_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    weights: str = "raw",
    prefix: str = "auto",
    key_map: Mapping[str, Any] | None = None,
) -> list[str]:
    """Load ``path`` into ``model`` strictly (modulo the key map's declared new keys).

    Returns the target keys that kept their initial values (empty without a key map).
    """
    sd = unet_weights_from_state_dict(read_state_dict(path), weights=weights, prefix=prefix)
    target_sd = model.state_dict()
    new_keys: list[str] = []
    if key_map is not None:
        mapper = instantiate(key_map)
        sd, new_keys = mapper(sd, target_sd)
        new_keys = list(new_keys)
    missing, unexpected, wrong = diff_state_dict(target_sd, sd)
    undeclared = sorted(set(missing) - set(new_keys))
    overlap = sorted(set(new_keys) & set(sd))
    if undeclared or unexpected or wrong or overlap:
        extra = f"key map declared new keys that it also provides: {overlap[:3]}" if overlap else ""
        raise CheckpointMismatchError(
            mismatch_message(undeclared, unexpected, wrong, what=f"init_from {path}", hint=extra)
        )
    full = dict(target_sd)
    full.update(sd)
    model.load_state_dict(full, strict=True)
    logger.info(
        "initialised the UNet from %s (%s weights, %d tensors; %d new tensors keep their init)",
        path,
        weights,
        len(sd),
        len(new_keys),
    )
    return new_keys
