"""The LDM first-stage encoder (``ldm/modules/diffusionmodules/model.py:Encoder``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.autoencoders.blocks import NORM_GROUPS, AttnBlock, Downsample, Normalize, ResnetBlock, silu


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> ``[B, (2 if double_z else 1) * z_channels, H/f, W/f]``.

    ``f = 2 ** (len(ch_mult) - 1)``. Level ``i`` runs ``num_res_blocks``
    ResnetBlocks of width ``ch * ch_mult[i]`` (each followed by attention when
    the level's resolution is in ``attn_resolutions``), then a downsample except
    at the last level; then ``mid`` (block, attention, block), norm, SiLU, conv.
    ``resolution`` is the nominal training size; it only decides where attention
    sits, any input size divisible by ``f`` works. ``norm_groups``: GroupNorm groups
    (32 in every released model).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        norm_groups: int = NORM_GROUPS,
    ) -> None:
        super().__init__()
        del out_ch  # accepted so one ddconfig serves encoder and decoder (LDM convention)
        ch_mult = tuple(ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(
                    ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_groups))
            level = nn.Module()
            level.block = blocks
            level.attn = attns
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)

        self.norm_out = Normalize(block_in, norm_groups)
        out_channels = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode ``x``; with ``return_features`` also the per-level features.

        ``features[i]`` is level ``i``'s output after its last ResnetBlock (and
        attention), before its downsample, for every level that has one
        (``len(ch_mult) - 1`` tensors). The official FA-VAE uses level 1
        (``enc_fea`` of ``Encoder.forward(x, return_fea=True)``).
        """
        h = self.conv_in(x)
        features: list[torch.Tensor] = []
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                if return_features:
                    features.append(h)
                h = level.downsample(h)

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = self.conv_out(silu(self.norm_out(h)))
        if return_features:
            return h, features
        return h
