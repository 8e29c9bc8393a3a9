"""Per-stage expert training helpers: the LDM-4x-SR -> stage expert key map (the stage expert
export is :func:`moe_sr.export.export_stage_expert`).

The training itself is ``ldm``'s diffusion training (``configs/train/sr8x_stage.yaml``): the
``stage_timesteps`` sampler (:mod:`moe_sr.stages`) restricts ``t`` to the stage's interval, EWA
averages the FFN-MoE experts, and ``init_from`` starts the UNet from another checkpoint. This
module adds what is specific to the method:

* :class:`LDMSR4xToExpertKeyMap` (config target ``ldm_sr4x_to_expert``): initialise a stage expert
  (UNet with FFN-MoE layers) from latent-diffusion's 4x SR UNet. An FFN-MoE layer is inserted
  after each attention block, at index 2 of its block, so every later layer of that block moves
  up by one (``middle_block.2`` -> ``middle_block.3``, ``output_blocks.2.2`` (upsample) ->
  ``output_blocks.2.3``). The FFN-MoE layers themselves are new and keep their initialisation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from ldm.config import ConfigError
from ldm.registry import register

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
