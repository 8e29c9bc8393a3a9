"""Building the frozen first stage (autoencoder) of a latent diffusion training run.

The first stage is given in the training config as one of

* ``{target, params}`` (e.g. ``${preset:autoencoder/vq_f4}``), optionally with weights from
  ``ckpt`` (a latent-diffusion ``model.ckpt``, a plain state dict, or our safetensors);
* a path to one of our safetensors release files (config in the metadata).

Encoding follows LDM's ``LatentDiffusion.get_first_stage_encoding``: for a VQ model the
*pre-quantisation* latent (``encode`` -> ``quant_conv``, not quantised), for a KL model a sample
of the posterior; either multiplied by the autoencoder's ``scale_factor``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.checkpoint import load_pretrained, load_weights
from ldm.config import ConfigError, instantiate, to_plain

logger = logging.getLogger(__name__)

#: Keys an LDM autoencoder ``model.ckpt`` carries besides the model (the training loss).
DEFAULT_IGNORE_PREFIXES = ("loss.",)


def build_first_stage(
    spec: Mapping[str, Any] | str,
    *,
    ckpt: str | None = None,
    ckpt_prefix: str = "",
    ignore_prefixes: Sequence[str] = DEFAULT_IGNORE_PREFIXES,
) -> nn.Module:
    """Instantiate the autoencoder, load its weights if given, and freeze it (eval mode)."""
    spec = to_plain(spec)
    if isinstance(spec, str):
        if ckpt is not None:
            raise ConfigError(
                "first_stage is a release file path; first_stage_ckpt must not be given as well"
            )
        if Path(spec).suffix != ".safetensors":
            raise ConfigError(
                f"first_stage {spec!r} is a string: give a moe-sr .safetensors release file, "
                "or a {target, params} mapping (e.g. ${preset:autoencoder/vq_f4})"
            )
        model = load_pretrained(spec, kinds=("autoencoder",))
    else:
        model = instantiate(spec)
        if ckpt is not None:
            load_weights(model, ckpt, prefix=ckpt_prefix, ignore_prefixes=ignore_prefixes)
            logger.info("first stage: loaded weights from %s", ckpt)
        else:
            logger.warning(
                "first stage has no checkpoint (first_stage_ckpt): it keeps its random "
                "initialisation. Fine for tests, wrong for real training."
            )
    freeze(model)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def encode_to_latent(first_stage: nn.Module, x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """``scale_factor * z`` with ``z`` the VQ pre-quantisation latent or a KL posterior sample
    (``encode_latent(x, sample=True)``)."""
    return scale_factor * first_stage.encode_latent(x, sample=True)


@torch.no_grad()
def decode_latent(first_stage: nn.Module, z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Inverse of :func:`encode_to_latent`: ``decode(z / scale_factor)`` (VQ quantises first)."""
    return first_stage.decode(z / scale_factor)
