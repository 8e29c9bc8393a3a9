"""Latent cache: encode every training image once with the frozen first stage.

Diffusion training then reads ``latent`` from the cache (``latent_folder`` dataset, aligned random
crops of image and latent) instead of running the encoder every step. The cache holds the
*unscaled* latent of each whole image: for a VQ model the pre-quantisation latent (exactly what
training would compute), for a KL model the posterior mean (a cache cannot re-sample the posterior;
say so in your experiment notes). ``DiffusionSRModule`` multiplies by ``scale_factor``.

Cropping a whole-image latent is close to, not equal to, encoding the crop (the encoder's
receptive field sees past the crop border); that is the usual trade of latent caching.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.atomic import atomic_write
from ldm.config import instantiate

logger = logging.getLogger(__name__)


@torch.no_grad()
def cache_latents(
    first_stage: torch.nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    hr_key: str = "hr",
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> int:
    """Write ``<out_dir>/<stem>.safetensors`` (key ``latent``, ``[C, h, w]``) per item.

    ``dataset`` items need ``hr`` (in [-1, 1]) and ``path``; build it over whole images without
    random crops or flips (e.g. ``sr_folder`` with ``crop_size: null, flip: false``), so the
    cache matches what the ``latent_folder`` dataset pairs it with. Returns the number written.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first_stage = first_stage.to(device).eval()
    written = 0
    for i in range(len(dataset)):
        item = dataset[i]
        path = out / (Path(item["path"]).stem + ".safetensors")
        if path.exists() and not overwrite:
            continue
        z = first_stage.encode_latent(item[hr_key][None].float().to(device))  # KL: the mean
        with atomic_write(path) as tmp:
            save_file(
                {"latent": z[0].float().cpu().contiguous()},
                str(tmp),
                metadata={"source": Path(item["path"]).name, "layout": "CHW unscaled latent"},
            )
        written += 1
    logger.info("cached %d latents in %s", written, out)
    return written


def cache_latents_from_config(
    first_stage: Mapping[str, Any] | str,
    dataset: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    ckpt: str | None = None,
    ckpt_prefix: str = "",
    device: str = "cpu",
    overwrite: bool = False,
) -> int:
    from ldm.training.first_stage import build_first_stage

    model = build_first_stage(first_stage, ckpt=ckpt, ckpt_prefix=ckpt_prefix)
    return cache_latents(model, instantiate(dataset), out_dir, device=device, overwrite=overwrite)
