"""Converters from the official UNet constructor kwargs to our ``{target: unet, params}``.

Registered for ``UNetModel`` (latent-diffusion / release ``openaimodel.UNetModel``) and
``UNetModelWithFFNMoe`` (the SS-MoE stage experts). Options the official classes accept but that
change nothing for these models are dropped; options we do not implement (class
conditioning, spatial transformers, codebook prediction, 1D/3D) raise a clear error.
"""

from __future__ import annotations

import logging
from typing import Any

from ldm.official import register_official

logger = logging.getLogger(__name__)

#: official kwarg -> our parameter name (same meaning)
_RENAMED = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "model_channels": "model_channels",
    "num_res_blocks": "num_res_blocks",
    "attention_resolutions": "attention_resolutions",
    "channel_mult": "channel_mult",
    "num_heads": "num_heads",
    "num_head_channels": "num_head_channels",
    "dropout": "dropout",
    "conv_resample": "conv_resample",
    "use_scale_shift_norm": "use_scale_shift_norm",
    "resblock_updown": "resblock_updown",
    "use_checkpoint": "use_checkpoint",
}
#: official kwargs that only take their default value here (default, why)
_FIXED = {
    "dims": (2, "only 2D UNets are implemented"),
    "num_classes": (None, "class-conditional UNets are not implemented"),
    "use_fp16": (False, "use model.half() or autocast instead of use_fp16"),
    "use_spatial_transformer": (False, "cross-attention (SpatialTransformer) is not implemented"),
    "context_dim": (None, "cross-attention (SpatialTransformer) is not implemented"),
    "n_embed": (None, "codebook-id prediction is not implemented"),
    "use_new_attention_order": (False, "only the legacy QKV attention order is implemented"),
}
#: official kwargs without effect on these models
_IGNORED = {"image_size", "legacy", "transformer_depth"}
#: UNetModelWithFFNMoe only: accepted but unused by the official code (FeedForwardMoe
#: always builds 16 FFN experts; the FFN expert count comes from ``num_expert_per_ffn_moe_layer``)
_FFN_MOE_IGNORED = {"expert_assign", "num_expert"}


def _convert(params: dict[str, Any], *, ffn_moe_experts: int) -> dict[str, Any]:
    known = set(_RENAMED) | set(_FIXED) | _IGNORED | {"num_heads_upsample"}
    if ffn_moe_experts:
        known |= _FFN_MOE_IGNORED | {"is_inference"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"official UNet kwargs {unknown} are not understood; known: {sorted(known)}"
        )
    for name, (default, why) in _FIXED.items():
        if name in params and params[name] != default:
            raise ValueError(f"official UNet kwarg {name}={params[name]!r} unsupported: {why}")
    num_heads = params.get("num_heads", -1)
    up = params.get("num_heads_upsample", -1)
    if up not in (-1, num_heads) and params.get("num_head_channels", -1) == -1:
        raise ValueError(
            f"num_heads_upsample={up} differs from num_heads={num_heads}: not implemented"
        )
    ours = {_RENAMED[k]: v for k, v in params.items() if k in _RENAMED}
    for key in ("attention_resolutions", "channel_mult"):
        if key in ours:
            ours[key] = [int(v) for v in ours[key]]
    if ffn_moe_experts:
        ours["ffn_moe_experts"] = int(ffn_moe_experts)
        if params.get("is_inference", False):
            logger.warning(
                "official is_inference=True (expert weight averaging) -> ffn_moe_routing="
                "'average'; note the official code averages with factor E-1/E (a typo for "
                "(E-1)/E), we use the plain mean of the FFN experts"
            )
            ours["ffn_moe_routing"] = "average"
        else:
            ours["ffn_moe_routing"] = "random"
    return {"target": "unet", "params": ours}


@register_official("UNetModel")
def unet_from_official(params: dict[str, Any]) -> dict[str, Any]:
    """``openaimodel.UNetModel(**params)`` -> our ``unet`` config (no FFN-MoE)."""
    return _convert(params, ffn_moe_experts=0)


@register_official("UNetModelWithFFNMoe")
def unet_ffnmoe_from_official(
    params: dict[str, Any], *, num_expert_per_ffn_moe_layer: int = 16
) -> dict[str, Any]:
    """``openaimodel.UNetModelWithFFNMoe(**params)`` -> our ``unet`` config with FFN-MoE.

    The official ``FeedForwardMoe`` is built with its default of 16 FFN experts regardless of
    the class's ``num_expert`` kwarg; pass ``num_expert_per_ffn_moe_layer`` for other counts.
    """
    if num_expert_per_ffn_moe_layer < 1:
        raise ValueError("num_expert_per_ffn_moe_layer must be >= 1")
    return _convert(params, ffn_moe_experts=num_expert_per_ffn_moe_layer)
