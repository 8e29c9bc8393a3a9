"""Starting the FA parts of a decoder as the identity, so that fine-tuning them only improves it.

The FA-VAE recipe trains the fuse layers and the frequency module on top of a frozen base
autoencoder. From their random initialisation the FA decoder first decodes worse than the base
decoder it extends (the frequency module replaces the features it is given, the fuse layers add
a random residual), and a short fine-tuning spends its steps getting back there.
:func:`identity_fa_init` makes the FA decoder equal to the base decoder at step 0:

* each fuse layer's residual ``f(cat[enc, dec])`` is zero: the two convolutions that end its
  first and last ResBlock (and the first one's 1x1 skip) start at zero; gradients still reach
  every part through the RRDB and ResBlock skips;
* the frequency module ``unet_1`` returns its input: in every AFF block the two norms start
  with zero scale and shift (the AFNO filter and the inverted residual then see zeros and add
  nothing), and the 1x1 ``up_dim`` projections pass the input channels through (in the two
  decoder blocks, the skip half of their concatenated input).
"""

from __future__ import annotations

import torch
from torch import nn

from fa_vae.decoder import FADecoder
from fa_vae.frequency import AFFBlock, UNetAff
from fa_vae.fusion import FuseLayer
from ldm.registry import register


def _zero(conv: nn.Conv2d) -> None:
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


@torch.no_grad()
def identity_fuse_layer(layer: FuseLayer) -> None:
    _zero(layer.encode_enc_1.conv2)
    _zero(layer.encode_enc_1.conv_out)
    _zero(layer.encode_enc_3.conv2)


@torch.no_grad()
def identity_aff_block(block: AFFBlock, passthrough: int) -> None:
    """``block(x)[:, :passthrough] = x[:, :passthrough]``, the other outputs zero."""
    for norm in (block.norm1, block.norm2):
        nn.init.zeros_(norm.weight)
        nn.init.zeros_(norm.bias)
    _zero(block.up_dim)
    for c in range(passthrough):
        block.up_dim.weight[c, c, 0, 0] = 1.0


@torch.no_grad()
def identity_unet_aff(unet: UNetAff) -> None:
    """``unet(x) == x``: ``conv1`` passes ``x`` through and ``up_conv2`` returns that half of
    its ``cat([x1, up2(d3)])`` input; the deeper blocks keep their init (they start unused)."""
    width = unet.conv1.up_dim.in_channels
    if unet.up_conv2.up_dim.out_channels != width or unet.conv1.up_dim.out_channels < width:
        raise ValueError("identity init needs a frequency module with as many outputs as inputs")
    identity_aff_block(unet.conv1, width)
    identity_aff_block(unet.up_conv2, width)


@register("fa_identity")
def identity_fa_init(model: nn.Module) -> None:
    """Make the FA parts of ``model`` (an FA-VAE, or its decoder) start as the identity."""
    decoder = getattr(model, "decoder", model)
    if not isinstance(decoder, FADecoder):
        raise ValueError(f"fa_identity init needs an FA decoder, got {type(decoder).__name__}")
    for level in decoder.fuse_levels:
        identity_fuse_layer(getattr(decoder, f"fusion_layer_{level}"))
    identity_unet_aff(decoder.unet_1)
