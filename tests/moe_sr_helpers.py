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


# ----------------------------------------------------------------------------- tiny pipelines


class StandInFAVAE(nn.Module):
    """A cheap module with the FA-VAE interface (x4 down, one skip level) for fast tests.

    Local operations only, so tiled and untiled decoding agree away from tile borders.
    """

    downsample_factor = 4
    latent_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.dec = nn.Conv2d(3 + 8, 3, 3, padding=1)

    def encode(self, x: torch.Tensor, return_features: bool = False):
        f = torch.nn.functional.avg_pool2d(self.enc(x), 2)
        h = torch.nn.functional.avg_pool2d(x, 4)
        return (h, [f]) if return_features else h

    def decode(self, z: torch.Tensor, skips=None, *, quantize: bool = True) -> torch.Tensor:
        up = torch.nn.functional.interpolate(z, scale_factor=4, mode="nearest")
        f = torch.nn.functional.interpolate(skips[0], scale_factor=2, mode="nearest")
        return torch.tanh(self.dec(torch.cat([up, f], 1)))


def perturb_(model: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Add noise to every parameter (zero-initialised output convs would make a UNet inert)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny_unets(n: int = 4, seed: int = 0) -> list[nn.Module]:
    from ldm.config import instantiate, load_config

    cfg = load_config("unet/sr8x_expert_tiny")
    out = []
    for k in range(n):
        torch.manual_seed(seed + k)
        out.append(perturb_(instantiate(cfg), seed=seed + k).eval())
    return out


def tiny_fa_vae(seed: int = 0) -> nn.Module:
    from ldm.config import instantiate, load_config

    torch.manual_seed(seed)
    return perturb_(instantiate(load_config("fa_vae/vq_f4_fa_tiny")), 0.02, seed).eval()
