"""Exports: training checkpoints -> the safetensors files that the pipeline and the demo load.

* :func:`export_stage_expert`: a Lightning checkpoint of a stage run -> one safetensors file with
  the EMA UNet weights, the UNet config, the stage index and the timestep interval
  (:func:`moe_sr.checkpoints.save_expert` format, loadable by the SR pipeline;
  ``moe-sr-export-expert``);
* :func:`export_autoencoder`: an ``autoencoder_gan`` training checkpoint (plain or FA-VAE) -> our
  autoencoder safetensors (config in the metadata);
* :func:`release_copy`: one of our safetensors files with its floating-point tensors cast to
  float16 (the demo release in ``assets/demo``).

Training checkpoints are read with :func:`ldm.checkpoint.load_torch_file` (``weights_only``);
every file is written atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import CheckpointError, load_state_dict_strict, load_torch_file
from ldm.config import ConfigError, instantiate
from moe_sr.checkpoints import save_expert
from moe_sr.stages import StageTimestepSampler

logger = logging.getLogger(__name__)


def _training_checkpoint(path: Path, module: str, key: str) -> tuple[dict[str, Any], Mapping]:
    """``(checkpoint, hyper_parameters)`` of a Lightning checkpoint of a ``module`` run, whose
    hyper-parameters must hold ``key`` (the config of the model to export)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    obj = load_torch_file(path, map_location="cpu")
    hp = (obj.get("hyper_parameters") or {}) if isinstance(obj, Mapping) else {}
    if not isinstance(hp, Mapping) or key not in hp or "state_dict" not in obj:
        raise CheckpointError(
            f"{path} is not a training checkpoint of {module} (no hyper_parameters.{key} / "
            "state_dict); give <run>/checkpoints/last.ckpt of such a run"
        )
    return obj, hp


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
    obj, hp = _training_checkpoint(ckpt, "diffusion_sr", "unet")
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


def export_autoencoder(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``autoencoder_gan`` Lightning checkpoint -> our safetensors (``model.*``, config inside)."""
    from ldm.checkpoint import save_pretrained, select_prefix
    from ldm.config import to_plain

    ckpt = Path(ckpt)
    obj, hp = _training_checkpoint(ckpt, "autoencoder_gan", "autoencoder")
    config = to_plain(hp["autoencoder"])
    model = instantiate(config)
    load_state_dict_strict(model, select_prefix(obj["state_dict"], "model."), what=str(ckpt))
    return save_pretrained(model.eval(), out, config)


def release_copy(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "float16") -> Path:
    """Copy one of our safetensors files with its floating-point tensors cast to ``dtype``
    (metadata kept; loaders cast back to the model's dtype). Halves the size of a release."""
    from safetensors.torch import load_file, save_file

    from ldm.atomic import atomic_write
    from ldm.checkpoint import read_safetensors_metadata

    target = getattr(torch, dtype)
    tensors = {
        k: (v.to(target) if v.is_floating_point() else v).contiguous()
        for k, v in load_file(str(src)).items()
    }
    meta = read_safetensors_metadata(src)
    dst = Path(dst)
    with atomic_write(dst) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return dst
