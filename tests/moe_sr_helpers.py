"""Shared stand-ins for the moe_sr tests: modules built from key->shape tables, release files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from moe_sr.checkpoints import EMA_EXTRA_KEYS, SCHEDULE_BUFFER_NAMES, ema_key_map

MANIFEST = "moe_stage_ckpt.json"


def module_from_shapes(shapes: Mapping[str, Sequence[int]], *, empty: bool = False) -> nn.Module:
    """An ``nn.Module`` whose ``state_dict`` has exactly these keys and shapes (all parameters).

    ``empty=True`` leaves the memory uninitialised (``torch.empty``), so a full-size model costs no
    resident memory until its weights are written.
    """
    root = nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        data = torch.empty(tuple(shape)) if empty else torch.randn(tuple(shape))
        mod.register_parameter(leaf, nn.Parameter(data, requires_grad=False))
    return root


def manifest_unet_shapes(manifests_dir: Path) -> dict[str, list[int]]:
    """Our UNet's key -> shape table, from the released stage checkpoint manifest."""
    manifest = json.loads((manifests_dir / MANIFEST).read_text())
    pre = "model.diffusion_model."
    return {k[len(pre) :]: shape for k, (shape, _dtype) in manifest.items() if k.startswith(pre)}


def fake_ldm_buffers(num_timesteps: int = 1000) -> dict[str, torch.Tensor]:
    """Twelve distinct [T] float32 vectors standing in for the LDM schedule buffers."""
    g = torch.Generator().manual_seed(7)
    return {n: torch.rand(num_timesteps, generator=g) for n in SCHEDULE_BUFFER_NAMES}


class FakeSchedule:
    def __init__(self, buffers: Mapping[str, torch.Tensor]) -> None:
        self._buffers = dict(buffers)

    def ldm_buffers(self) -> dict[str, torch.Tensor]:
        return dict(self._buffers)


def released_state_dict(
    raw: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    first_stage: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A state dict in the layout of a released ``moe_stage{k}.ckpt``."""
    sd: dict[str, torch.Tensor] = dict(buffers)
    sd.update({"model.diffusion_model." + k: v for k, v in raw.items()})
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    keymap = ema_key_map(ema)
    sd.update({keymap[k]: v for k, v in ema.items()})
    for k, v in (first_stage or {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3)}).items():
        sd["first_stage_model." + k] = v
    assert EMA_EXTRA_KEYS[0] in sd
    return sd
