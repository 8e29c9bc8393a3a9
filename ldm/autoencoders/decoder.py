"""The LDM first-stage decoder (``ldm/modules/diffusionmodules/model.py:Decoder``).

Subclasses (the FA-VAE decoder in ``fa_vae``) extend it through two hooks
instead of copying ``forward``:

* :meth:`Decoder.fuse_skip` ``(level, h, skips) -> h``, called after each
  up-level's blocks, before its upsample (identity by default);
* :meth:`Decoder.pre_out` ``(h) -> h``, called right before ``norm_out``
  (identity by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.autoencoders.blocks import NORM_GROUPS, AttnBlock, Normalize, ResnetBlock, Upsample, silu


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]``, ``f = 2**(len(ch_mult)-1)``.

    ``conv_in``, ``mid`` (block, attention, block), then the up levels from the
    deepest (``up[len(ch_mult)-1]``) to ``up[0]``, each with ``num_res_blocks + 1``
    ResnetBlocks (+ attention where the resolution is in ``attn_resolutions``) and
    an upsample except at level 0; then norm, SiLU, ``conv_out``.
    ``give_pre_end`` returns the features before ``norm_out``.
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
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        give_pre_end: bool = False,
        norm_groups: int = NORM_GROUPS,
    ) -> None:
        super().__init__()
        del in_channels  # accepted so one ddconfig serves encoder and decoder (LDM convention)
        ch_mult = tuple(ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.give_pre_end = give_pre_end

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, norm_groups=norm_groups)

        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(
                    ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_groups))
            level = nn.Module()
            level.block = blocks
            level.attn = attns
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level (LDM order)

        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    # ------------------------------------------------------------------ hooks

    def fuse_skip(
        self, level: int, h: torch.Tensor, skips: Sequence[torch.Tensor] | None
    ) -> torch.Tensor:
        """Merge encoder features into up-level ``level``'s output (identity here)."""
        return h

    def pre_out(self, h: torch.Tensor) -> torch.Tensor:
        """Transform the final features before ``norm_out`` (identity here)."""
        return h

    # ------------------------------------------------------------------ forward

    def forward(self, z: torch.Tensor, skips: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Decode ``z``; ``skips`` (encoder features) are handed to :meth:`fuse_skip`."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            h = self.fuse_skip(i_level, h, skips)
            if i_level != 0:
                h = level.upsample(h)
        h = self.pre_out(h)
        if self.give_pre_end:
            return h
        return self.conv_out(silu(self.norm_out(h)))
