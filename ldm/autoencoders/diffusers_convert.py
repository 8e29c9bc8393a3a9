"""Explicit key map between our (LDM) ``AutoencoderKL`` naming and diffusers' ``AutoencoderKL``.

The map is built from the architecture (number of levels), rule by rule, the way
diffusers' ``convert_ldm_vae_checkpoint`` renames keys:

===================================  ==============================================
LDM                                  diffusers
===================================  ==============================================
``encoder.down.{i}.block.{j}.*``     ``encoder.down_blocks.{i}.resnets.{j}.*``
``encoder.down.{i}.downsample.conv`` ``encoder.down_blocks.{i}.downsamplers.0.conv``
``decoder.up.{i}.block.{j}.*``       ``decoder.up_blocks.{L-1-i}.resnets.{j}.*``
``decoder.up.{i}.upsample.conv``     ``decoder.up_blocks.{L-1-i}.upsamplers.0.conv``
``*.mid.block_{1,2}.*``              ``*.mid_block.resnets.{0,1}.*``
``*.mid.attn_1.{norm,q,k,v,proj_out}`` ``*.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``
``*.nin_shortcut``                   ``*.conv_shortcut``
``*.norm_out``                       ``*.conv_norm_out``
===================================  ==============================================

Everything else keeps its name. The attention projections are 1x1 convolutions
``[C, C, 1, 1]`` in LDM and linear layers ``[C, C]`` in diffusers. Conversion
asserts that every key is mapped exactly once and that every shape fits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ldm.checkpoint import CheckpointMismatchError, mismatch_message

Tensors = dict[str, torch.Tensor]

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET = {"nin_shortcut": "conv_shortcut"}


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return f"{_RESNET.get(head, head)}.{rest}"


def ldm_key_to_diffusers(key: str, num_levels: int) -> str:
    """The diffusers name of LDM ``AutoencoderKL`` key ``key`` (``num_levels = len(ch_mult)``)."""
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_tail(m[3])}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_tail(m[3])}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_tail(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)", key):
        return f"{m[1]}.mid_block.attentions.0.{_ATTN[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)", key) or re.fullmatch(
        r"(post_)?quant_conv\.(weight|bias)", key
    ):
        return key
    raise KeyError(
        f"no diffusers name for LDM key {key!r} (attention inside levels is not supported)"
    )


def is_attention_projection(ldm_key: str) -> bool:
    """True for the mid-block q/k/v/proj_out weights (conv ``[C,C,1,1]`` <-> linear ``[C,C]``)."""
    return (
        re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", ldm_key)
        is not None
    )


def build_keymap(ldm_keys: list[str], num_levels: int) -> dict[str, str]:
    """``{ldm_key: diffusers_key}`` for ``ldm_keys``; asserts the map is one-to-one."""
    keymap = {k: ldm_key_to_diffusers(k, num_levels) for k in ldm_keys}
    if len(set(keymap.values())) != len(keymap):
        raise AssertionError("LDM -> diffusers key map is not one-to-one")
    return keymap


def _num_levels(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    levels = {int(m[1]) for k in state_dict if (m := re.match(pattern, k))}
    if not levels:
        raise CheckpointMismatchError("cannot find the decoder levels in the state dict")
    return max(levels) + 1


def _check_complete(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str
) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(mismatch_message(missing, unexpected, [], what=what))


def ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """Our / LDM ``AutoencoderKL`` state dict -> diffusers ``AutoencoderKL`` state dict."""
    num_levels = _num_levels(state_dict, r"decoder\.up\.(\d+)\.")
    keymap = build_keymap(list(state_dict), num_levels)
    out: Tensors = {}
    for src, dst in keymap.items():
        t = state_dict[src]
        if is_attention_projection(src):
            if t.ndim != 4 or t.shape[2:] != (1, 1):
                raise CheckpointMismatchError(
                    f"{src}: expected a 1x1 conv weight, got {tuple(t.shape)}"
                )
            t = t[:, :, 0, 0]
        out[dst] = t
    if len(out) != len(state_dict):
        raise AssertionError(f"converted {len(out)} of {len(state_dict)} tensors")
    return out


def diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """Diffusers ``AutoencoderKL`` state dict -> our / LDM ``AutoencoderKL`` state dict.

    Raises :class:`CheckpointMismatchError` naming the keys that have no LDM counterpart.
    """
    num_levels = _num_levels(state_dict, r"decoder\.up_blocks\.(\d+)\.")
    # Inverse map: derive the LDM keys the diffusers file should come from.
    inverse: dict[str, str] = {}
    for k in state_dict:
        ldm = _diffusers_key_to_ldm(k, num_levels)
        if ldm is not None:
            inverse[k] = ldm
    unmapped = sorted(set(state_dict) - set(inverse))
    if unmapped:
        raise CheckpointMismatchError(
            mismatch_message([], unmapped, [], what="diffusers AutoencoderKL state dict")
            + "\n  (these keys have no LDM counterpart; attention inside levels is not supported)"
        )
    out: Tensors = {}
    for src, dst in inverse.items():
        t = state_dict[src]
        if is_attention_projection(dst):
            if t.ndim != 2:
                raise CheckpointMismatchError(
                    f"{src}: expected a linear weight, got {tuple(t.shape)}"
                )
            t = t[:, :, None, None]
        out[dst] = t
    if len(out) != len(state_dict):
        raise AssertionError(f"converted {len(out)} of {len(state_dict)} tensors")
    return out


def _diffusers_key_to_ldm(key: str, num_levels: int) -> str | None:
    """Inverse of :func:`ldm_key_to_diffusers` (``None`` when ``key`` has no LDM name)."""
    inv_attn = {v: k for k, v in _ATTN.items()}
    inv_res = {v: k for k, v in _RESNET.items()}

    def res_tail(tail: str) -> str:
        head, _, rest = tail.partition(".")
        return f"{inv_res.get(head, head)}.{rest}"

    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        cand = f"encoder.down.{m[1]}.block.{m[2]}.{res_tail(m[3])}"
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        cand = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        cand = f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{res_tail(m[3])}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        cand = f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        cand = f"{m[1]}.mid.block_{int(m[2]) + 1}.{res_tail(m[3])}"
    elif m := re.fullmatch(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
        key,
    ):
        cand = f"{m[1]}.mid.attn_1.{inv_attn[m[2]]}.{m[3]}"
    elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        cand = f"{m[1]}.norm_out.{m[2]}"
    else:
        cand = key
    try:  # accept only names the forward map sends back to ``key``
        return cand if ldm_key_to_diffusers(cand, num_levels) == key else None
    except KeyError:
        return None


# --------------------------------------------------------------------------- configs


def diffusers_kwargs(ddconfig: Mapping[str, Any], embed_dim: int, scale_factor: float) -> dict:
    """Constructor kwargs of ``diffusers.AutoencoderKL`` for our ``kl_model`` params."""
    if list(ddconfig.get("attn_resolutions", [])):
        raise ValueError("diffusers conversion supports attn_resolutions: [] only")
    if embed_dim != ddconfig["z_channels"]:
        raise ValueError("diffusers AutoencoderKL needs embed_dim == z_channels")
    if not ddconfig.get("double_z", True) or not ddconfig.get("resamp_with_conv", True):
        raise ValueError("diffusers AutoencoderKL needs double_z and resamp_with_conv true")
    levels = len(ddconfig["ch_mult"])
    return {
        "in_channels": ddconfig["in_channels"],
        "out_channels": ddconfig["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
        "layers_per_block": ddconfig["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": embed_dim,
        "norm_num_groups": 32,
        "sample_size": ddconfig["resolution"],
        "scaling_factor": scale_factor,
    }


def kl_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``{target: kl_model, params}`` config for a diffusers ``AutoencoderKL`` config."""
    blocks = list(config["block_out_channels"])
    ch = blocks[0]
    if any(b % ch for b in blocks) or config.get("norm_num_groups", 32) != 32:
        raise ValueError(f"unsupported diffusers AutoencoderKL config: {dict(config)}")
    bad_blocks = {
        *[t for t in config["down_block_types"] if t != "DownEncoderBlock2D"],
        *[t for t in config["up_block_types"] if t != "UpDecoderBlock2D"],
    }
    if bad_blocks or config.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported diffusers block types / activation: {sorted(bad_blocks)}")
    if config.get("mid_block_add_attention", True) is False:
        raise ValueError("diffusers AutoencoderKL without mid-block attention is not supported")
    sample_size = config.get("sample_size", 256)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    z = config["latent_channels"]
    return {
        "target": "kl_model",
        "params": {
            "embed_dim": z,
            "scale_factor": float(config.get("scaling_factor", 0.18215)),
            "ddconfig": {
                "double_z": True,
                "z_channels": z,
                "resolution": int(sample_size),
                "in_channels": config["in_channels"],
                "out_ch": config["out_channels"],
                "ch": ch,
                "ch_mult": [b // ch for b in blocks],
                "num_res_blocks": config["layers_per_block"],
                "attn_resolutions": [],
                "dropout": 0.0,
            },
        },
    }


def from_diffusers(vae: Any):
    """Our ``AutoencoderKL`` holding the weights of a ``diffusers.AutoencoderKL`` instance."""
    from ldm.checkpoint import load_state_dict_strict
    from ldm.config import instantiate

    model = instantiate(kl_config_from_diffusers(dict(vae.config)))
    load_state_dict_strict(
        model, diffusers_to_ldm(vae.state_dict()), what="converted diffusers VAE"
    )
    return model


def to_diffusers(model: Any):
    """A ``diffusers.AutoencoderKL`` holding the weights of our ``AutoencoderKL``."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    kwargs = diffusers_kwargs(model.ddconfig, model.latent_channels, model.scale_factor)
    vae = DiffusersAutoencoderKL(**kwargs)
    sd = ldm_to_diffusers(model.state_dict())
    _check_complete(sd, vae.state_dict(), "exported diffusers state dict")
    vae.load_state_dict(sd, strict=True)
    return vae.eval()
