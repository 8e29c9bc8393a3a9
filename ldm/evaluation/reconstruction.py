"""Autoencoder reconstruction benchmark (COCO val2017 protocol of the paper's table).

Protocol: every image's short side is resized to 256 (bicubic, antialias), then the centre
256x256 is cropped; the autoencoder reconstructs the crop; psnr / ssim / lpips (and fid when
available) compare the reconstruction (saved as 8-bit PNG) with the crop (also 8-bit PNG).

Models whose reconstruction needs a low-resolution input (the VQ-f4 FA-VAE: its decoder fuses
encoder features of the LR image) are detected generically by a callable ``lr_features``
attribute: their LR input is the crop downscaled x1/8 with MATLAB bicubic, upscaled x8 back to
the crop size as the release's ``load_img`` does, and the model is called as
``model(x, lr_up=lr_up)``. Other models go through
:func:`ldm.autoencoders.reconstruct.reconstruct_image`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.data.image_io import list_images, read_image, to_uint8, to_uint8_hwc, write_image
from ldm.evaluation.evaluate import evaluate
from ldm.evaluation.metrics import metric_spec

log = logging.getLogger(__name__)

PROTOCOL = (
    "short side resized to {size} (bicubic, antialias), centre crop {size}x{size}; "
    "reconstructions and references compared as 8-bit PNG"
)
LR_FACTOR = 8


def center_crop_protocol(img: torch.Tensor, size: int = 256) -> torch.Tensor:
    """``[3, H, W]`` in [0, 1] -> short side ``size`` (bicubic, antialias), centre crop, 8-bit."""
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        img = F.interpolate(img[None], size=(nh, nw), mode="bicubic", antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    img = img[:, top : top + size, left : left + size].clamp(0, 1)
    return to_uint8(img).to(torch.float32) / 255


def needs_lr_input(model: nn.Module) -> bool:
    """True for models that reconstruct with LR features (``lr_features`` method, FA-VAE VQ-f4)."""
    return callable(getattr(model, "lr_features", None))


def lr_up_input(x: torch.Tensor, factor: int = LR_FACTOR) -> torch.Tensor:
    """The LR input of an LR-guided decoder: ``[B, 3, H, W]`` in [0, 1] -> bicubic x1/factor
    (MATLAB, 8-bit) -> x factor (MATLAB bicubic, the release's ``load_img``), in [-1, 1]."""
    from ldm.data.resize import imresize
    from ldm.data.sr_inputs import make_sr_inputs

    outs = []
    for img in x:
        u8 = to_uint8_hwc(img)
        lr = imresize(u8, scale=1 / factor)
        outs.append(make_sr_inputs(lr, factor).vae_enc_input_x8)
    return torch.cat(outs)


@torch.no_grad()
def reconstruct(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction of ``x`` ``[B, 3, H, W]`` in [0, 1] -> [0, 1] (LR-guided models included)."""
    from ldm.autoencoders.reconstruct import reconstruct_image

    if not needs_lr_input(model):
        return reconstruct_image(model, x)
    param = next(model.parameters())
    lr_up = lr_up_input(x).to(param.device, param.dtype)
    if lr_up.shape != x.shape:
        raise ValueError(
            f"image size {tuple(x.shape[-2:])} is not divisible by the LR factor {LR_FACTOR}"
        )
    y = model(x.to(param.device, param.dtype) * 2 - 1, lr_up=lr_up)
    return ((y + 1) / 2).clamp(0, 1)


@dataclass
class ModelSpec:
    """``name=config:ckpt`` from the command line (config may be empty for our safetensors)."""

    name: str
    config: str | None
    ckpt: str | None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        name, sep, rest = text.partition("=")
        if not sep or not name:
            raise ValueError(f"--model wants NAME=CONFIG:CKPT (or NAME=:CKPT), got {text!r}")
        config, sep, ckpt = rest.rpartition(":") if ":" in rest else ("", "", rest)
        if not sep:  # no colon: a bare config preset means random weights, refuse
            raise ValueError(
                f"--model {text!r}: give CONFIG:CKPT (a preset or YAML, then the weights file); "
                "NAME=:CKPT for a moe-sr safetensors file that carries its config"
            )
        return cls(name, config or None, ckpt or None)

    def load(self, device: torch.device | str = "cpu") -> nn.Module:
        from ldm.autoencoders.loading import load_autoencoder

        if self.ckpt is None:
            raise ValueError(f"model {self.name!r}: no checkpoint given")
        if not Path(self.ckpt).is_file():
            raise FileNotFoundError(f"model {self.name!r}: checkpoint not found: {self.ckpt}")
        return load_autoencoder(self.config, self.ckpt).to(device).eval()


def prepare_references(
    image_dir: Path, out_dir: Path, *, size: int = 256, limit: int | None = None
) -> list[Path]:
    """Protocol crops of the first ``limit`` images (sorted names) as PNG in ``out_dir`` (reused)."""
    files = list_images(image_dir)
    if not files:
        raise ValueError(f"no images found in {image_dir}")
    if limit is not None:
        files = files[:limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = []
    for f in files:
        dst = out_dir / f"{f.stem}.png"
        if not dst.is_file():
            write_image(center_crop_protocol(read_image(f), size), dst)
        refs.append(dst)
    return refs


def reconstruct_folder(
    model: nn.Module,
    refs: Sequence[Path],
    out_dir: Path,
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "reconstruct",
) -> list[Path]:
    """Reconstruct ``refs`` into ``out_dir`` (same names); already-present files are reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = [out_dir / r.name for r in refs]
    todo = [i for i, o in enumerate(outs) if not o.is_file()]
    if len(todo) < len(refs):
        log.info("%s: reusing %d existing reconstructions", desc, len(refs) - len(todo))
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    for batch in batches:
        x = torch.stack([read_image(refs[i]) for i in batch])
        y = reconstruct(model, x).cpu()
        for j, i in enumerate(batch):
            write_image(y[j], outs[i])
    return outs


def evaluate_reconstruction(
    models: Mapping[str, nn.Module | ModelSpec],
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    metrics: Sequence[str] = ("psnr", "ssim", "lpips"),
    size: int = 256,
    limit: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    save_recon: bool = False,
    weights_dir=None,
    progress: bool = False,
) -> dict:
    """Run the protocol for every model; returns ``{"protocol", "models": {name: report}, ...}``.

    Reconstructions live in ``out_dir/<name>/recon`` while the run is incomplete (so an
    interrupted run resumes) and are deleted at the end unless ``save_recon``.
    """
    from ldm.evaluation.metrics import check_available

    out_dir, device = Path(out_dir), torch.device(device or "cpu")
    check_available(list(metrics), weights_dir)  # before any work
    refs = prepare_references(
        Path(image_dir), out_dir / f"reference_{size}", size=size, limit=limit
    )
    result = {
        "protocol": PROTOCOL.format(size=size),
        "image_dir": str(image_dir),
        "num_images": len(refs),
        "metrics": list(metrics),
        "directions": {m: metric_spec(m).direction for m in metrics},
        "models": {},
    }
    for name, spec in models.items():
        model = spec.load(device) if isinstance(spec, ModelSpec) else spec.to(device).eval()
        recon_dir = out_dir / name / "recon"
        recons = reconstruct_folder(
            model, refs, recon_dir, batch_size=batch_size, progress=progress, desc=name
        )
        lr_guided = needs_lr_input(model)
        del model
        report = evaluate(recons, refs, metrics, device=device, weights_dir=weights_dir)
        report.options.update(protocol=result["protocol"], lr_guided=lr_guided)
        entry = report.to_dict()
        if isinstance(spec, ModelSpec):
            entry["config"], entry["ckpt"] = spec.config, spec.ckpt
        result["models"][name] = entry
        if not save_recon:
            shutil.rmtree(recon_dir)
            if not any((out_dir / name).iterdir()):
                (out_dir / name).rmdir()
    return result
