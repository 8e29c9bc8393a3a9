"""Initialising an LDM-layout autoencoder as a box-filter codec, for training from scratch.

A freshly initialised VQ/KL autoencoder has to discover, through many GroupNorms and a
3-channel bottleneck, that colour and brightness must be carried at all: a small model trained
briefly (the CPU-trained demo) first spends its latent on luminance detail and paints every
image in one learned tint. :func:`box_codec_init` starts it where that lesson is already learnt:

* encoder = 2x2 area averages at every downsampling, so the first ``n`` latent channels are the
  RGB image averaged over ``f x f`` blocks;
* decoder = nearest-neighbour upsampling of those channels back to RGB;
* every residual branch and attention output starts at zero (SkipInit, De & Smith 2020), so
  the identity paths carry the image; the other channels start at the usual random init and
  join in as training proceeds.

At step 0 the model reconstructs the image as ``f x f`` blocks of the right colours (about
24-28 dB on photographs at ``f = 4``); training only has to add the detail. It needs a model
without normalisation (``norm_groups: 0``): a GroupNorm on the main path would rescale the
image away. The final SiLU before ``conv_out`` is kept near-linear by a bias shift that
``conv_out`` removes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm.autoencoders.blocks import AttnBlock, ChannelAffine, Downsample, ResnetBlock, Upsample
from ldm.registry import register

#: SiLU is applied at ``x + SHIFT``, where it is close to linear for ``|x| <= 1``.
SHIFT = 5.0


def _silu_at_shift() -> tuple[float, float]:
    """``silu(SHIFT)`` and its slope there (``silu(SHIFT + x) ~ value + slope * x``)."""
    s = 1.0 / (1.0 + math.exp(-SHIFT))
    return SHIFT * s, s + SHIFT * s * (1.0 - s)


def _pass_through(conv: nn.Conv2d, n: int, tap: tuple[int, int]) -> None:
    """Output channel ``c < n`` = input channel ``c`` at kernel position ``tap`` (and nothing
    else); the other outputs keep their random weights."""
    w = conv.weight
    w[:n].zero_()
    for c in range(n):
        w[c, c, tap[0], tap[1]] = 1.0
    if conv.bias is not None:
        conv.bias[:n].zero_()


@register("box_codec")
@torch.no_grad()
def box_codec_init(model: nn.Module) -> None:
    """Initialise a VQ autoencoder (``vq_model`` or a model built on it) as a box-filter codec
    (see the module docstring). Raises ``ValueError`` for models with normalisation layers or
    a KL posterior."""
    encoder, decoder = model.encoder, model.decoder
    if not isinstance(encoder.norm_out, ChannelAffine):
        raise ValueError(
            "box_codec init needs an autoencoder without normalisation (ddconfig norm_groups: 0): "
            "GroupNorm would rescale the image on its main path"
        )
    z = model.quant_conv.out_channels
    if (
        encoder.conv_out.out_channels != model.quant_conv.in_channels
        or getattr(model, "quantize", None) is None
    ):
        raise ValueError("box_codec init supports VQ autoencoders (double_z: false) only")
    n = min(3, z)
    value, slope = _silu_at_shift()
    for module in model.modules():
        if isinstance(module, ResnetBlock):
            nn.init.zeros_(module.conv2.weight)
            nn.init.zeros_(module.conv2.bias)
            if module.in_channels != module.out_channels:
                _pass_through(module.nin_shortcut, n, (0, 0))
        elif isinstance(module, AttnBlock):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)
        elif isinstance(module, Downsample) and module.with_conv:
            # LDM pads right/bottom by one, then a 3x3 stride-2 conv: taps (0..1, 0..1) are the
            # 2x2 block of the output pixel
            _pass_through(module.conv, n, (0, 0))
            for c in range(n):
                module.conv.weight[c, c, :2, :2] = 0.25
        elif isinstance(module, Upsample) and module.with_conv:
            _pass_through(module.conv, n, (1, 1))
    for part in (encoder, decoder):
        _pass_through(part.conv_in, n, (1, 1))
        part.norm_out.weight[:n] = 1.0
        part.norm_out.bias[:n] = SHIFT
        part.conv_out.weight.zero_()
        part.conv_out.bias.zero_()
        for c in range(n):
            part.conv_out.weight[c, c, 1, 1] = 1.0 / slope
            part.conv_out.bias[c] = -value / slope
    for conv in (model.quant_conv, model.post_quant_conv):
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(n):
            conv.weight[c, c, 0, 0] = 1.0
