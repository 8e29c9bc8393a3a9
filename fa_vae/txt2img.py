"""Text-to-image with the KL-f8 FA-VAE as the decoder of a Stable Diffusion 1.5 pipeline.

The release's two-step workflow (``vae_txt2img_inf/get_latent.py`` then ``decode.py``):

1. :func:`generate_latents`: run a diffusers ``StableDiffusionPipeline`` with
   ``output_type="latent"`` and keep the *unscaled* latents, i.e. the pipeline's latents
   divided by the VAE's own ``scaling_factor`` (0.18215 for SD1.5), which is exactly what
   the pipeline itself hands to ``vae.decode``.
2. :func:`decode_latents`: decode them with the FA-VAE (or any KL autoencoder).

The latent files (:func:`save_latent` / :func:`read_latent`) are safetensors holding one
``latent`` tensor ``[C, h, w]`` with the prompt and generation settings in the metadata,
named by prompt index and seed (:func:`latent_name`, e.g. ``00003_s42``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.atomic import atomic_write, write_text

logger = logging.getLogger(__name__)

#: key of the latent tensor in a latent file
LATENT_KEY = "latent"
#: SD1.5 VAE ``scaling_factor``; the release divided by 0.1825 instead (a typo, 0.2% off)
SD15_SCALING_FACTOR = 0.18215
#: hub id suggested in error messages
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class PipelineLoadError(RuntimeError):
    """A Stable Diffusion pipeline or VAE could not be loaded (offline, wrong folder...)."""


class TokenizerError(RuntimeError):
    """The pipeline cannot tokenize prompts (missing or broken tokenizer)."""


# --------------------------------------------------------------------------- loading


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _offline_hint(name: str, what: str) -> str:
    return (
        f"cannot load the {what} {name!r} from the Hugging Face hub (offline or not cached). "
        f"Download it where there is internet, e.g. `huggingface-cli download {name} "
        f"--local-dir sd15`, copy the folder here and pass its path instead of the hub id"
    )


def load_sd_pipeline(
    name_or_path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """A diffusers ``StableDiffusionPipeline`` from a local folder or a hub id.

    The safety checker is not loaded (latents do not need it). Raises
    :class:`PipelineLoadError` with what to do when the folder is wrong or the hub is
    unreachable.
    """
    from diffusers import StableDiffusionPipeline

    name = str(name_or_path)
    local = Path(name).expanduser()
    if not local.exists() and _looks_like_path(name):
        raise PipelineLoadError(f"{name}: no such folder (expected a diffusers pipeline folder)")
    if local.is_file():
        raise PipelineLoadError(
            f"{local} is a file; pass a diffusers pipeline folder (convert a single-file SD "
            "checkpoint once with StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR))"
        )
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise PipelineLoadError(
            f"{local} is not a diffusers pipeline folder (no model_index.json); pass the folder "
            "that pipe.save_pretrained() / huggingface-cli download created"
        )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if local.exists() else name,
            torch_dtype=torch_dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:
        if local.exists():
            raise PipelineLoadError(f"cannot load the pipeline in {local}: {err}") from err
        raise PipelineLoadError(_offline_hint(name, "pipeline") + f" ({err})") from err
    return pipe.to(device)


def load_diffusers_vae(
    name_or_path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """A diffusers ``AutoencoderKL`` from a VAE folder, a pipeline folder (its ``vae/``) or a
    hub id (a VAE repo such as ``stabilityai/sd-vae-ft-mse`` or a pipeline repo)."""
    from diffusers import AutoencoderKL

    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        if (local / "vae" / "config.json").is_file():
            local = local / "vae"
        if not (local / "config.json").is_file():
            raise PipelineLoadError(
                f"{name}: neither a diffusers VAE folder (config.json) nor a pipeline folder "
                "(vae/config.json)"
            )
        try:
            vae = AutoencoderKL.from_pretrained(str(local), torch_dtype=torch_dtype)
        except (OSError, ValueError) as err:
            raise PipelineLoadError(f"cannot load the VAE in {local}: {err}") from err
        return vae.to(device).eval()
    if _looks_like_path(name):
        raise PipelineLoadError(f"{name}: no such folder (expected a diffusers VAE folder)")
    errors = []
    for subfolder in (None, "vae"):
        try:
            vae = AutoencoderKL.from_pretrained(name, subfolder=subfolder, torch_dtype=torch_dtype)
            return vae.to(device).eval()
        except (OSError, ValueError) as err:
            errors.append(str(err))
    raise PipelineLoadError(_offline_hint(name, "VAE") + f" ({errors[-1]})")


def check_tokenizer(pipe: Any) -> None:
    """Raise :class:`TokenizerError` unless ``pipe`` can tokenize text prompts.

    Offline, ``CLIPTokenizer.from_pretrained`` does not fail: it returns a tokenizer with
    only its two special tokens (``vocab_size == 2``), which would turn every prompt into
    the same empty sequence. That is detected here.
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        raise TokenizerError(
            "the pipeline has no tokenizer: pass prompt_embeds (and negative_prompt_embeds "
            "when guidance > 1), or load a pipeline folder that has tokenizer/"
        )
    vocab = len(tokenizer)
    if vocab <= 2:
        raise TokenizerError(
            f"the pipeline's tokenizer is broken (vocabulary of {vocab} tokens): "
            "transformers returns such a tokenizer when its vocabulary files could not be "
            "downloaded. Load the pipeline from a complete local folder (with tokenizer/"
            "vocab.json and merges.txt, or tokenizer.json), or pass prompt_embeds"
        )
    text_vocab = getattr(getattr(pipe, "text_encoder", None), "config", None)
    text_vocab = getattr(text_vocab, "vocab_size", None)
    if text_vocab is not None and vocab > text_vocab:
        raise TokenizerError(
            f"the tokenizer has {vocab} tokens but the text encoder only {text_vocab}: "
            "they do not belong together"
        )


# --------------------------------------------------------------------------- latents


def scaling_factor_of(pipe_or_vae: Any) -> float:
    """The VAE's own ``scaling_factor`` (``vae.config.scaling_factor``)."""
    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    factor = getattr(getattr(vae, "config", None), "scaling_factor", None)
    if factor is None:
        raise ValueError("the VAE config has no scaling_factor (not a diffusers AutoencoderKL?)")
    return float(factor)


def _select(embeds: torch.Tensor | None, i: int, n: int) -> torch.Tensor | None:
    """Row ``i`` of ``[P, L, D]`` (or the only row of ``[1, L, D]``) repeated ``n`` times."""
    if embeds is None:
        return None
    row = embeds[i if embeds.shape[0] > 1 else 0]
    return row[None].expand(n, *row.shape)


@torch.no_grad()
def generate_latents(
    pipe: Any,
    prompts: Sequence[str] | None,
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float = 7.5,
    prompt_embeds: torch.Tensor | None = None,
    *,
    negative_prompt: str | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Unscaled latents ``[P, S, C, h, w]`` (float32, CPU) for every prompt and seed.

    Sample ``(p, s)`` starts from ``torch.Generator(pipe.device).manual_seed(seeds[s])``
    (one generator per image, so it does not depend on the batching); up to
    ``batch_size`` seeds of one prompt run in one pipeline call. The returned latents are
    the pipeline's latents divided by the VAE's own ``scaling_factor`` (0.18215 for SD1.5),
    i.e. what the pipeline would pass to ``vae.decode``. (The release multiplied by
    ``1 / 0.1825``, a typo for ``1 / 0.18215``: its latents are 0.2% too small.)

    ``prompts``: ``P`` texts, or ``None`` with ``prompt_embeds`` ``[P, L, D]`` (the text
    encoder's output, for pipelines without a usable tokenizer). With ``guidance > 1``
    the negative prompt is ``negative_prompt`` (default ``""``) or
    ``negative_prompt_embeds`` (``[P, L, D]`` or ``[1, L, D]``).
    """
    if not seeds:
        raise ValueError("give at least one seed")
    if prompts is None and prompt_embeds is None:
        raise ValueError("give prompts or prompt_embeds")
    if prompt_embeds is not None and prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be [P, L, D], got {tuple(prompt_embeds.shape)}")
    num_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    if prompts is not None and prompt_embeds is not None and len(prompts) != len(prompt_embeds):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_embeds)} prompt_embeds")
    cfg = guidance > 1.0
    if prompt_embeds is None or (cfg and negative_prompt_embeds is None):
        check_tokenizer(pipe)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    factor = scaling_factor_of(pipe)
    out = []
    for p in range(num_prompts):
        per_seed = []
        for start in range(0, len(seeds), batch_size):
            chunk = list(seeds[start : start + batch_size])
            n = len(chunk)
            kwargs: dict[str, Any] = {}
            if prompt_embeds is not None:
                kwargs["prompt_embeds"] = _select(prompt_embeds, p, n)
            else:
                kwargs["prompt"] = [prompts[p]] * n
            if cfg:
                if negative_prompt_embeds is not None:
                    kwargs["negative_prompt_embeds"] = _select(negative_prompt_embeds, p, n)
                else:
                    kwargs["negative_prompt"] = [negative_prompt or ""] * n
            generators = [torch.Generator(pipe.device).manual_seed(int(s)) for s in chunk]
            latents = pipe(
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                generator=generators,
                output_type="latent",
                **kwargs,
            ).images
            # unscaled latents: what StableDiffusionPipeline passes to vae.decode
            per_seed.append(latents.float().cpu() / factor)
        out.append(torch.cat(per_seed))
    return torch.stack(out)


@torch.no_grad()
def decode_latents(model: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` (float32, on the model's device) from unscaled
    latents ``[B, C, h, w]`` (or ``[C, h, w]``).

    ``model``: the FA-VAE (``fa_vae_kl_f8``), our ``kl_model``, or a diffusers
    ``AutoencoderKL``; all decode to ``[-1, 1]``, mapped here to ``[0, 1]`` and clamped.
    """
    if latents.ndim == 3:
        latents = latents[None]
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got {tuple(latents.shape)}")
    param = next(model.parameters())
    config = getattr(model, "config", None)  # diffusers models keep it in their config
    expected = getattr(config, "latent_channels", None) or getattr(model, "latent_channels", None)
    if expected is not None and latents.shape[1] != expected:
        raise ValueError(
            f"latents have {latents.shape[1]} channels but the autoencoder expects {expected}"
        )
    x = model.decode(latents.to(device=param.device, dtype=param.dtype))
    x = getattr(x, "sample", x)  # diffusers DecoderOutput
    return ((x.float() + 1.0) / 2.0).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- latent files


def latent_name(prompt_index: int, seed: int) -> str:
    """File stem of the latent of prompt ``prompt_index`` (0-based) and ``seed``."""
    return f"{prompt_index:05d}_s{seed}"


def save_latent(
    latent: torch.Tensor, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write one unscaled latent ``[C, h, w]`` as safetensors (atomically), with
    ``metadata`` (JSON-serialisable values) in the file and in a ``.json`` next to it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    write_text(path.with_suffix(".json"), json.dumps(dict(metadata or {}), indent=2) + "\n")
    with atomic_write(path) as tmp:  # the latent last: its presence means both files are complete
        save_file({LATENT_KEY: latent.detach().float().contiguous().cpu()}, str(tmp), metadata=meta)
    return path


def read_latent(path: str | os.PathLike) -> torch.Tensor:
    """An unscaled latent ``[C, h, w]`` from one of our ``.safetensors`` latent files or a
    ``.pt`` tensor file (e.g. the release's ``img_0000.pt``; ``[C, h, w]`` or ``[1, C, h, w]``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if LATENT_KEY not in tensors:
            raise ValueError(
                f"{path}: no {LATENT_KEY!r} tensor (found {sorted(tensors)}); "
                "is it a latent file written by txt2img_latents?"
            )
        latent = tensors[LATENT_KEY]
    elif path.suffix == ".pt":
        latent = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(latent, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor, got {type(latent).__name__}")
    else:
        raise ValueError(f"{path}: latent files are .safetensors (or .pt)")
    if latent.ndim == 4 and latent.shape[0] == 1:
        latent = latent[0]
    if latent.ndim != 3:
        raise ValueError(f"{path}: expected a latent [C, h, w], got {tuple(latent.shape)}")
    return latent.float()
