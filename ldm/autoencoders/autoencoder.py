"""The two first-stage models of latent diffusion: ``VQModel`` (LDM vq-f4) and
``AutoencoderKL`` (Stable Diffusion 1.5 kl-f8).

KL vs VQ is only a regularizer swap on the latent (cf. sgm's autoencoder): both
models share the encoder/decoder code and the ``encode`` / ``decode`` seam.
The decoder class is the class attribute :attr:`FirstStageModel.decoder_class`
(override it, or :meth:`FirstStageModel.build_decoder`, in a subclass to plug
in another decoder, e.g. the FA-VAE decoder of ``fa_vae``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldm.autoencoders.decoder import Decoder
from ldm.autoencoders.encoder import Encoder
from ldm.autoencoders.regularizers import DiagonalGaussian, VectorQuantizer
from ldm.registry import register


def _kwarg_names(cls: type) -> set[str]:
    """The keyword arguments of ``cls(...)``; a ``**kwargs`` of its ``__init__`` stands for those
    of the base class it is passed on to (the next ``__init__`` in the MRO)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {
            p.name
            for p in params
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


class FirstStageModel(nn.Module):
    """Shared parts: ``ddconfig`` split, encoder/decoder construction, size attributes, and
    the interface every autoencoder kind offers, so that callers need not know VQ from KL:

    * ``encode_latent(x, *, sample=False, generator=None)``: the unscaled latent the decoder
      and the diffusion model take (VQ: the pre-quantisation latent; KL: the posterior mean,
      or a sample with ``sample=True``);
    * ``decode(z, skips=None, *, quantize=True)``: the image of a latent; ``quantize`` snaps
      ``z`` to the codebook first (a KL model has none: no effect);
    * ``encode(x, return_features=False)``: the kind's own encoding (VQ: the latent; KL: the
      posterior), with the encoder features the LR-guided FA decoder fuses.
    """

    encoder_class: type[nn.Module] = Encoder
    decoder_class: type[nn.Module] = Decoder

    def __init__(self, ddconfig: Mapping[str, Any], scale_factor: float) -> None:
        super().__init__()
        ddconfig = dict(ddconfig)
        enc_keys, dec_keys = _kwarg_names(self.encoder_class), _kwarg_names(self.decoder_class)
        unknown = sorted(set(ddconfig) - enc_keys - dec_keys)
        if unknown:
            raise ValueError(
                f"unknown ddconfig key(s) {unknown}; valid keys: {sorted(enc_keys | dec_keys)}"
            )
        self.ddconfig = ddconfig
        self.encoder = self.build_encoder({k: v for k, v in ddconfig.items() if k in enc_keys})
        self.decoder = self.build_decoder({k: v for k, v in ddconfig.items() if k in dec_keys})
        self.scale_factor = float(scale_factor)
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        self.z_channels = int(ddconfig["z_channels"])

    def build_encoder(self, params: dict[str, Any]) -> nn.Module:
        return self.encoder_class(**params)

    def build_decoder(self, params: dict[str, Any]) -> nn.Module:
        return self.decoder_class(**params)

    def encode_latent(
        self,
        x: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The unscaled latent of ``x`` (see the class note)."""
        return self.latent_of(self.encode(x), sample, generator)

    def latent_of(
        self, encoded: Any, sample: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The latent in what :meth:`encode` returned (each kind says how)."""
        raise NotImplementedError

    def snap_to_codebook(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` on the codebook (a kind without one returns ``z``)."""
        return z

    def decode(
        self,
        z: torch.Tensor,
        skips: Sequence[torch.Tensor] | None = None,
        *,
        quantize: bool = True,
    ) -> torch.Tensor:
        """Image from an unscaled latent; ``quantize=True`` snaps ``z`` to the codebook first
        (LDM ``VQModelInterface.decode``; no effect for a KL model, which has none), ``False``
        decodes ``z`` as it is. ``skips``: encoder features for an LR-guided decoder."""
        if quantize:
            z = self.snap_to_codebook(z)
        return self.decoder(self.post_quant_conv(z), skips)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator=None):
        """Reconstruction: encode, (VQ: quantize,) decode; a KL model decodes the posterior
        mean (or a sample with ``sample_posterior``)."""
        return self.decode(self.encode_latent(x, sample=sample_posterior, generator=generator))

    def check_input(self, x: torch.Tensor) -> None:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"expected an image batch [B, C, H, W] with H and W divisible by {f}, "
                f"got shape {tuple(x.shape)}; pad it first (ldm.autoencoders.reconstruct.pad_to_multiple)"
            )


@register("vq_model", kind="autoencoder")
class VQModel(FirstStageModel):
    """LDM ``VQModel`` (as used through ``VQModelInterface``): encode to the
    pre-quantisation latent, quantize explicitly or inside :meth:`decode`.

    Parameter names: ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``,
    ``quant_conv.*``, ``post_quant_conv.*``.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        scale_factor: float = 1.0,
        beta: float = 0.25,
    ) -> None:
        super().__init__(ddconfig, scale_factor)
        if ddconfig.get("double_z", True):
            raise ValueError("a VQModel needs ddconfig double_z: false")
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, legacy=True)
        self.quant_conv = nn.Conv2d(self.z_channels, embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, self.z_channels, kernel_size=1)
        self.latent_channels = embed_dim

    def encode(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Pre-quantisation latent ``quant_conv(encoder(x))`` [+ encoder features]."""
        self.check_input(x)
        if return_features:
            h, feats = self.encoder(x, return_features=True)
            return self.quant_conv(h), feats
        return self.quant_conv(self.encoder(x))

    def latent_of(self, encoded: torch.Tensor, sample: bool, generator) -> torch.Tensor:
        """The pre-quantisation latent itself (deterministic: ``sample`` has no effect)."""
        return encoded

    def snap_to_codebook(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantize(z)[0]


@register("kl_model", kind="autoencoder")
class AutoencoderKL(FirstStageModel):
    """LDM / Stable Diffusion ``AutoencoderKL``: encode to a diagonal Gaussian posterior.

    Parameter names: ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``.
    ``scale_factor`` (0.18215 for SD) is what the diffusion model's latents are
    multiplied by; :meth:`decode` takes unscaled latents.
    """

    def __init__(
        self, ddconfig: Mapping[str, Any], embed_dim: int, scale_factor: float = 0.18215
    ) -> None:
        super().__init__(ddconfig, scale_factor)
        if not ddconfig.get("double_z", True):
            raise ValueError("an AutoencoderKL needs ddconfig double_z: true (mean and logvar)")
        self.quant_conv = nn.Conv2d(2 * self.z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, self.z_channels, kernel_size=1)
        self.latent_channels = embed_dim

    def encode(
        self, x: torch.Tensor, return_features: bool = False
    ) -> DiagonalGaussian | tuple[DiagonalGaussian, list[torch.Tensor]]:
        """Posterior ``DiagonalGaussian(quant_conv(encoder(x)))`` [+ encoder features]."""
        self.check_input(x)
        if return_features:
            h, feats = self.encoder(x, return_features=True)
            return DiagonalGaussian(self.quant_conv(h)), feats
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def latent_of(self, encoded: DiagonalGaussian, sample: bool, generator) -> torch.Tensor:
        """The posterior mean, or with ``sample=True`` a sample drawn with ``generator``."""
        return encoded.sample(generator) if sample else encoded.mode()


# Registers the autoencoder preset guesser (ldm.checkpoint.PRESET_GUESSERS).
import ldm.autoencoders.loading  # noqa: E402, F401
