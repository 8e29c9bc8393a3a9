"""Loading autoencoder weights from released files, and naming the preset a file belongs to.

* LDM autoencoder Lightning checkpoints (``vq-f4/model.ckpt``) also hold the
  training loss (``loss.*``: LPIPS + discriminator); they are dropped, with a log line.
* Latent-diffusion / SD checkpoints hold the autoencoder under ``first_stage_model.``.
* Diffusers ``AutoencoderKL`` files are converted through the explicit key map.
* Our own safetensors files rebuild themselves from their metadata.

Importing this module registers :func:`guess_autoencoder_preset` in the
``ldm.checkpoint.PRESET_GUESSERS`` registry, so strict-loading errors name the likely preset.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.checkpoint import (
    CONFIG_KEY,
    PRESET_GUESSERS,
    load_pretrained,
    load_state_dict_strict,
    read_safetensors_metadata,
    read_state_dict,
    select_prefix,
)

logger = logging.getLogger(__name__)

#: Presets a file is compared with, most common first.
KNOWN_PRESETS = (
    "autoencoder/vq_f4",
    "autoencoder/kl_f8",
    "autoencoder/vq_f4_tiny",
    "autoencoder/kl_f8_tiny",
)
#: Prefixes under which released checkpoints keep the autoencoder.
KNOWN_PREFIXES = ("first_stage_model.",)
#: Key groups in LDM autoencoder checkpoints that belong to the training loss, not the model.
LOSS_PREFIX = "loss."


@functools.cache
def preset_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of a preset's state dict (built on the meta device: no memory)."""
    from ldm.config import instantiate, load_config

    with torch.device("meta"):
        model = instantiate(load_config(preset))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _similarity(a: Mapping[str, tuple[int, ...]], b: Mapping[str, tuple[int, ...]]) -> float:
    """Jaccard index of the ``(name, shape)`` pairs."""
    sa, sb = set(a.items()), set(b.items())
    return len(sa & sb) / max(1, len(sa | sb))


def _looks_like_diffusers(keys: list[str]) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys)


@PRESET_GUESSERS.register("autoencoder")
def guess_autoencoder_preset(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The autoencoder preset ``state_dict`` most likely belongs to, or ``None``.

    Looks at the keys as given and under the known prefixes, ignores ``loss.*``,
    and claims a preset only when at least 80% of the ``(name, shape)`` pairs agree.
    """
    for prefix in ("", *KNOWN_PREFIXES):
        sub = {
            k[len(prefix) :]: tuple(v.shape)
            for k, v in state_dict.items()
            if k.startswith(prefix) and not k.startswith(LOSS_PREFIX)
        }
        if not sub:
            continue
        where = f" under prefix {prefix!r}" if prefix else ""
        if _looks_like_diffusers(list(sub)):
            return (
                f"a diffusers AutoencoderKL{where} (convert it: "
                "ldm.autoencoders.diffusers_convert.diffusers_to_ldm)"
            )
        scores = {p: _similarity(sub, preset_shapes(p)) for p in KNOWN_PRESETS}
        best = max(scores, key=scores.__getitem__)
        if scores[best] >= 0.8:
            return f"{best}{where}"
    return None


def autoencoder_state_dict(
    path: str | os.PathLike, *, prefix: str = "", map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The autoencoder weights in ``path`` in our (LDM) naming, ready for strict loading."""
    from ldm.autoencoders.diffusers_convert import diffusers_to_ldm

    sd = read_state_dict(path, map_location=map_location)
    if not prefix:
        loss_keys = [k for k in sd if k.startswith(LOSS_PREFIX)]
        if loss_keys:
            logger.info("%s: ignoring %d training-loss tensors (loss.*)", path, len(loss_keys))
            sd = {k: v for k, v in sd.items() if not k.startswith(LOSS_PREFIX)}
    sd = select_prefix(sd, prefix)
    if _looks_like_diffusers(list(sd)):
        logger.info("%s: diffusers naming, converting with the explicit key map", path)
        sd = diffusers_to_ldm(sd)
    return sd


def is_pretrained_file(path: str | os.PathLike) -> bool:
    """True for one of our safetensors release files (config in the metadata)."""
    p = Path(path)
    return p.suffix == ".safetensors" and CONFIG_KEY in read_safetensors_metadata(p)


def load_autoencoder(
    config: str | os.PathLike | Mapping[str, Any] | None,
    ckpt: str | os.PathLike | None = None,
    *,
    prefix: str = "",
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Build an autoencoder and load its weights, strictly; returns it in eval mode.

    ``config``: a preset name (``autoencoder/vq_f4``), a YAML path, a ``{target, params}``
    mapping, or ``None`` when ``ckpt`` is one of our safetensors files (which carries
    its config). ``ckpt``: ``.ckpt`` / ``.pth`` / ``.pt`` / ``.safetensors``; ``None``
    keeps the random initialisation (tests, benchmarks). ``prefix`` selects e.g.
    ``first_stage_model.`` in a latent-diffusion checkpoint.
    """
    from ldm.config import instantiate, load_config

    if config is None:
        if ckpt is None or not is_pretrained_file(ckpt):
            raise ValueError(
                "give a config (preset name or YAML) unless the checkpoint is a moe-sr "
                "safetensors file that carries its config"
            )
        return load_pretrained(ckpt, kinds=("autoencoder",), map_location=map_location)
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else config
    model = instantiate(cfg)
    if ckpt is not None:
        sd = autoencoder_state_dict(ckpt, prefix=prefix, map_location=map_location)
        load_state_dict_strict(model, sd, what=str(ckpt))
    return model.eval()
