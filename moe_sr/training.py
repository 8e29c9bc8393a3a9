"""Per-stage expert training helpers: the LDM-4x-SR -> stage expert key map and the stage expert
export.

The training itself is ``ldm``'s diffusion training (``configs/train/sr8x_stage.yaml``): the
``stage_timesteps`` sampler (:mod:`moe_sr.stages`) restricts ``t`` to the stage's interval, EWA
averages the FFN-MoE experts, and ``init_from`` starts the UNet from another checkpoint. This
module adds what is specific to the method:

* :class:`LDMSR4xToExpertKeyMap` (config target ``ldm_sr4x_to_expert``): initialise a stage expert
  (UNet with FFN-MoE layers) from latent-diffusion's 4x SR UNet. An FFN-MoE layer is inserted
  after each attention block, at index 2 of its block, so every later layer of that block moves
  up by one (``middle_block.2`` -> ``middle_block.3``, ``output_blocks.2.2`` (upsample) ->
  ``output_blocks.2.3``). The FFN-MoE layers themselves are new and keep their initialisation.
* :func:`export_stage_expert`: a Lightning checkpoint of a stage run -> one safetensors file with
  the EMA UNet weights, the UNet config, the stage index and the timestep interval
  (``moe_sr.checkpoints.save_expert`` format, loadable by the SR pipeline).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import CheckpointError, load_state_dict_strict, load_torch_file
from ldm.config import ConfigError, instantiate
from ldm.registry import register
from moe_sr.checkpoints import save_expert
from moe_sr.stages import StageTimestepSampler

logger = logging.getLogger(__name__)

_MOE_KEY = re.compile(r"^((?:input_blocks|output_blocks)\.\d+|middle_block)\.(\d+)\.moe_")
_LAYER_KEY = re.compile(r"^((?:input_blocks|output_blocks)\.\d+|middle_block)\.(\d+)\.(.+)$")


def ffn_moe_positions(target_keys) -> dict[str, int]:
    """``{block prefix: index of its FFN-MoE layer}`` from a UNet's state-dict keys."""
    out: dict[str, int] = {}
    for k in target_keys:
        m = _MOE_KEY.match(k)
        if m:
            prev = out.setdefault(m.group(1), int(m.group(2)))
            if prev != int(m.group(2)):
                raise ValueError(f"two FFN-MoE layers in block {m.group(1)}")
    return out


@register("ldm_sr4x_to_expert")
class LDMSR4xToExpertKeyMap:
    """Key map latent-diffusion 4x SR UNet -> FFN-MoE expert UNet (see the module docstring).

    Called as ``key_map(source_sd, target_sd) -> (mapped_sd, new_keys)`` by
    :func:`ldm.training.init_weights.init_from_checkpoint`; every source key must land on a
    target key and all target keys except the new FFN-MoE ones must be covered (checked there,
    with shapes).
    """

    def __call__(
        self, source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        positions = ffn_moe_positions(target)
        if not positions:
            raise ConfigError(
                "key map ldm_sr4x_to_expert: the target UNet has no FFN-MoE layer; "
                "load the 4x SR weights without a key map"
            )
        if ffn_moe_positions(source):
            raise ConfigError(
                "key map ldm_sr4x_to_expert: the source already has FFN-MoE layers (a stage expert "
                "checkpoint?); load it without a key map"
            )
        mapped = {}
        for k, v in source.items():
            m = _LAYER_KEY.match(k)
            if m and m.group(1) in positions and int(m.group(2)) >= positions[m.group(1)]:
                k = f"{m.group(1)}.{int(m.group(2)) + 1}.{m.group(3)}"
            mapped[k] = v
        new_keys = [k for k in target if (m := _MOE_KEY.match(k)) and m.group(1) in positions]
        logger.info(
            "ldm_sr4x_to_expert: %d tensors mapped, %d FFN-MoE tensors in %d layers are new",
            len(mapped),
            len(new_keys),
            len(positions),
        )
        return mapped, new_keys


def _load_lightning_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return load_torch_file(path, map_location="cpu")


def export_stage_expert(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    weights: str = "ema",
) -> Path:
    """Write the EMA UNet of a stage-expert training checkpoint as our stage expert safetensors.

    The UNet config and the stage come from the checkpoint's hyper-parameters (the
    ``diffusion_sr`` module's ``unet`` and ``timestep_sampler``), so the metadata cannot
    disagree with what was trained.
    """
    from ldm.training.init_weights import unet_weights_from_state_dict

    ckpt = Path(ckpt)
    obj = _load_lightning_checkpoint(ckpt)
    hp = obj.get("hyper_parameters") or {}
    if not isinstance(hp, Mapping) or "unet" not in hp or "state_dict" not in obj:
        raise CheckpointError(
            f"{ckpt} is not a diffusion_sr training checkpoint (no hyper_parameters.unet / "
            "state_dict)"
        )
    sampler_cfg = hp.get("timestep_sampler")
    if not sampler_cfg or sampler_cfg.get("target") != "stage_timesteps":
        raise ConfigError(
            f"{ckpt} was not trained as a stage expert (timestep_sampler is {sampler_cfg!r}, "
            "not stage_timesteps): nothing says which stage it serves"
        )
    sampler = instantiate(sampler_cfg)
    assert isinstance(sampler, StageTimestepSampler)
    unet_cfg = hp["unet"]
    unet = instantiate(unet_cfg)
    sd = unet_weights_from_state_dict(obj["state_dict"], weights=weights)
    load_state_dict_strict(unet, sd, what=f"{ckpt} ({weights} UNet)")
    path = save_expert(
        unet,
        out,
        config=unet_cfg,
        stage=sampler.stage,
        num_stages=sampler.stages.num_stages,
        t_range=sampler.interval,
        metadata={
            "moe_sr.boundaries": list(sampler.stages.boundaries),
            "moe_sr.global_step": int(obj.get("global_step", -1)),
            "moe_sr.weights": weights,
        },
    )
    logger.info(
        "exported stage %d expert (t in [%d, %d), %s weights, step %s) to %s",
        sampler.stage,
        *sampler.interval,
        weights,
        obj.get("global_step"),
        path,
    )
    return path
