"""One-call swap of a diffusers Stable Diffusion VAE decoder for the KL-f8 FA-VAE decoder.

The KL-f8 FA-VAE keeps SD1.5's encoder and latent space and only changes the decoder
(frequency module before ``norm_out``), so any SD1.5 pipeline can decode with it::

    from fa_vae.diffusers_swap import swap_vae_decoder
    swap_vae_decoder(pipe, "first_stage_models/kl-f8/fa_vae.pth")
    image = pipe(prompt).images[0]          # decoded by the FA decoder

diffusers' ``AutoencoderKL.decode`` runs ``post_quant_conv`` then ``decoder(z)``; both are
replaced by the FA-VAE's (its ``post_quant_conv`` belongs to its decoder). The pipeline's
encoder, ``scaling_factor``, slicing and tiling stay as they are.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from fa_vae.decoder import FADecoder
from fa_vae.model import FAKLModel


class DiffusersDecoderAdapter(nn.Module):
    """Our :class:`~fa_vae.decoder.FADecoder` behind diffusers' ``Decoder.forward`` signature."""

    def __init__(self, decoder: FADecoder) -> None:
        super().__init__()
        self.fa_decoder = decoder

    def forward(
        self, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        if latent_embeds is not None:
            raise ValueError(
                "the FA-VAE decoder takes no latent_embeds (spatial norm conditioning)"
            )
        return self.fa_decoder(sample)


def _find_vae(target: Any) -> nn.Module:
    from diffusers import AutoencoderKL

    if isinstance(target, AutoencoderKL):
        return target
    vae = getattr(target, "vae", None)
    if isinstance(vae, AutoencoderKL):
        return vae
    raise TypeError(
        f"expected a diffusers AutoencoderKL or a pipeline with one as .vae, got {type(target).__name__}"
    )


def swap_vae_decoder(target: Any, fa_model: FAKLModel | str | os.PathLike) -> Any:
    """Make ``target`` (a diffusers ``AutoencoderKL`` or a pipeline with ``.vae``) decode
    with the KL-f8 FA-VAE decoder; returns ``target``, changed in place.

    ``fa_model``: a :class:`~fa_vae.model.FAKLModel` or the path of its weights (the
    released ``first_stage_models/kl-f8/fa_vae.pth`` or our safetensors). The FA modules
    are moved to the VAE's device and dtype and put in eval mode.
    """
    vae = _find_vae(target)
    if not isinstance(fa_model, FAKLModel):
        from fa_vae.released import load_released

        fa_model = load_released(fa_model, kind="kl_f8")
    latent_channels = int(vae.config.latent_channels)
    if latent_channels != fa_model.latent_channels:
        raise ValueError(
            f"the VAE has {latent_channels} latent channels, the FA-VAE "
            f"{fa_model.latent_channels}: it is not an SD1.5-type VAE"
        )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != fa_model.downsample_factor:
        raise ValueError(
            f"the VAE downsamples by {factor}, the FA-VAE by {fa_model.downsample_factor}"
        )
    param = next(vae.parameters())
    fa_model = fa_model.to(device=param.device, dtype=param.dtype).eval()
    vae.decoder = DiffusersDecoderAdapter(fa_model.decoder)
    vae.post_quant_conv = fa_model.post_quant_conv
    return target
