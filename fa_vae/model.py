"""The two released FA-VAEs: LDM's VQ-f4 / SD1.5's KL-f8 with the frequency-augmented decoder.

* ``fa_vae_vq_f4`` (:class:`FAVQModel`): the SR first stage. ``decode(z, skips)`` fuses the
  encoder features of the LR image (bicubic-upsampled x8 to the output size) into the
  decoder. Official: ``VQModelResiUnet`` (``sr_8x_inf/ldm/models/vqmodel.py``).
* ``fa_vae_kl_f8`` (:class:`FAKLModel`): a drop-in replacement of the SD1.5 VAE (same
  encoder, same latent), decoder with the frequency module only. Official:
  ``AutoencoderKLAFF`` (``vae_txt2img_inf/models/autoencoder.py``).

Both are built in ``eval()`` mode (running BatchNorm statistics, no DropPath), so
inference is deterministic; training code calls ``.train()`` explicitly.
Parameter names equal the released ``fa_vae.pth`` files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fa_vae.decoder import FADecoder
from ldm.autoencoders.autoencoder import AutoencoderKL, VQModel
from ldm.registry import register

#: ddconfig keys that the model sets itself
_MODEL_OWNED_KEYS = ("fuse_lr", "num_fuse_block")


def _checked_ddconfig(ddconfig: Mapping[str, Any], **owned: Any) -> dict[str, Any]:
    clash = [k for k in _MODEL_OWNED_KEYS if k in ddconfig]
    if clash:
        raise ValueError(
            f"ddconfig must not set {clash}: the FA-VAE model sets them "
            "(give num_fuse_block next to ddconfig, not inside it)"
        )
    return {**dict(ddconfig), **owned}


#: State-dict prefixes of the FA parts (everything else is the base LDM autoencoder); the
#: models carry them as ``fa_part_prefixes`` (what the FA training trains by default).
FA_PART_PREFIXES = ("decoder.fusion_layer_", "decoder.unet_1.")


def _set_decoder_modes(decoder: FADecoder, fusion_w: float, release_train_mode: bool) -> None:
    decoder.fusion_w = float(fusion_w)
    decoder.release_train_mode = bool(release_train_mode)


class _FAParts:
    """What both FA-VAEs add to their base autoencoder class: the FA decoder and its parts."""

    decoder_class = FADecoder
    fa_part_prefixes = FA_PART_PREFIXES

    def frequency_parameters(self) -> list[nn.Parameter]:
        """Parameters of the FA parts (fuse layers where there are any, and ``unet_1``): what
        the release trains."""
        return self.decoder.frequency_parameters()


@register("fa_vae_vq_f4", kind="autoencoder")
class FAVQModel(_FAParts, VQModel):
    """VQ autoencoder whose decoder fuses LR features and refines frequencies.

    ``num_fuse_block``: RRDB blocks per fuse layer (release: 2); ``fusion_w``: weight of
    the fused LR residual (release: 1.0); ``release_train_mode``: reproduce the official
    SR script's train-mode frequency module (random; off by default).

    Usage (SR)::

        h, feats = model.encode(lr_up8, return_features=True)  # LR image upsampled x8
        x = model.decode(z, skips=feats)                        # z: latent from diffusion
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        scale_factor: float = 1.0,
        beta: float = 0.25,
        num_fuse_block: int = 2,
        fusion_w: float = 1.0,
        release_train_mode: bool = False,
    ) -> None:
        ddconfig = _checked_ddconfig(ddconfig, fuse_lr=True, num_fuse_block=num_fuse_block)
        if len(ddconfig["ch_mult"]) < 3:
            raise ValueError(
                "the VQ FA-VAE fuses LR features at the middle up-levels: ch_mult needs at "
                f"least 3 entries, got {list(ddconfig['ch_mult'])}"
            )
        super().__init__(ddconfig, n_embed, embed_dim, scale_factor=scale_factor, beta=beta)
        _set_decoder_modes(self.decoder, fusion_w, release_train_mode)
        self.eval()

    @property
    def fusion_w(self) -> float:
        return self.decoder.fusion_w

    @fusion_w.setter
    def fusion_w(self, value: float) -> None:
        self.decoder.fusion_w = float(value)

    def lr_features(self, lr_up: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of the upsampled LR image: the ``skips`` of :meth:`decode`."""
        return self.encode(lr_up, return_features=True)[1]

    def forward(self, x: torch.Tensor, lr_up: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct ``x`` (encode, quantize, decode) with the LR features of ``lr_up``
        (same size as ``x``; default ``x`` itself)."""
        h, feats = self.encode(x, return_features=True)
        if lr_up is not None:
            feats = self.lr_features(lr_up)
        return self.decode(h, skips=feats, quantize=True)


@register("fa_vae_kl_f8", kind="autoencoder")
class FAKLModel(_FAParts, AutoencoderKL):
    """KL autoencoder (SD1.5 kl-f8 layout) whose decoder refines frequencies (``unet_1``).

    Same encoder and latent space as the plain VAE: the latents of any SD1.5 pipeline
    decode with it. ``release_train_mode`` as in :class:`FAVQModel`.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        scale_factor: float = 0.18215,
        release_train_mode: bool = False,
    ) -> None:
        ddconfig = _checked_ddconfig(ddconfig, fuse_lr=False)
        super().__init__(ddconfig, embed_dim, scale_factor=scale_factor)
        _set_decoder_modes(self.decoder, 1.0, release_train_mode)
        self.eval()


def base_autoencoder(model: FAVQModel) -> VQModel:
    """The plain VQ autoencoder inside an FA-VAE: same encoder, codebook and base decoder,
    without the fuse layers and the frequency module (a copy of the weights).

    What the FA-VAE decodes "without LR help"; with the recipe's frozen base it is exactly the
    autoencoder the FA parts were trained on top of.
    """
    if not isinstance(model, FAVQModel):
        raise TypeError(f"expected a VQ FA-VAE (fa_vae_vq_f4), got {type(model).__name__}")
    ddconfig = {
        k: v
        for k, v in model.ddconfig.items()
        if k not in _MODEL_OWNED_KEYS and not k.startswith("freq_")
    }
    base = VQModel(
        ddconfig,
        model.quantize.n_embed,
        model.latent_channels,
        scale_factor=model.scale_factor,
        beta=model.quantize.beta,
    )
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(FA_PART_PREFIXES)}
    base.load_state_dict(state, strict=True)
    return base.to(next(model.parameters()).device).eval()


def fa_vae_from_autoencoder(
    autoencoder: str | os.PathLike,
    fa_config: str | os.PathLike | Mapping[str, Any],
    out: str | os.PathLike,
    *,
    seed: int = 0,
) -> Path:
    """The inverse of :func:`base_autoencoder` for files: an FA-VAE safetensors file from a plain
    VQ autoencoder file (ours, config in the metadata), same base weights, FA parts at their
    (seeded) initialisation. The demo recipe samples latents with it before the FA parts train.
    """
    from ldm.checkpoint import CheckpointMismatchError, load_pretrained, save_pretrained
    from ldm.config import instantiate, load_config, to_plain

    base = load_pretrained(autoencoder, kinds=("autoencoder",)).state_dict()
    cfg = to_plain(fa_config if isinstance(fa_config, Mapping) else load_config(fa_config))
    torch.manual_seed(seed)
    model = instantiate(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in base and not k.startswith(FA_PART_PREFIXES)]
    unexpected = [k for k in base if k not in own]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{autoencoder} is not the base of {cfg.get('target')}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    own.update(base)
    model.load_state_dict(own, strict=True)
    return save_pretrained(model.eval(), out, cfg)
