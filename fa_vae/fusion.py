"""The LR-conditioned fuse layer of the VQ-f4 FA-VAE decoder.

Luo et al. (arXiv 2310.12004), section 3.1: to keep the decoded image faithful to the
low-resolution input, encoder features of the LR image (bicubic-upsampled x8 to the HR
size) are fused into the decoder, CodeFormer/StableSR-CFW style. A fuse layer maps the
concatenation ``[enc, dec]`` through a ResBlock (``2C -> C``), ``num_rrdb`` RRDB blocks
(ESRGAN) and a ResBlock, and adds the result back: ``dec + w * f(cat[enc, dec])``.

Names equal the release (``decoder.fusion_layer_{i}.encode_enc_{1,2,3}.*``); official:
``Fuse_sft_block_RRDB`` in ``sr_8x_inf/ldm/models/vqmodel.py`` with basicsr's ``RRDB``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.autoencoders.blocks import NORM_GROUPS, Normalize


class FuseResBlock(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``, 1x1 ``conv_out`` on the skip when
    the width changes (official ``ResBlock`` of vqmodel.py; no dropout, no time embedding)."""

    def __init__(
        self, in_channels: int, out_channels: int | None = None, norm_groups: int = NORM_GROUPS
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, norm_groups)  # the autoencoder's GroupNorm (eps 1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.conv_out = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_out(x) if self.in_channels != self.out_channels else x
        return h + skip


class ResidualDenseBlock(nn.Module):
    """ESRGAN residual dense block: five 3x3 convs with dense connections (growth
    ``num_grow_ch``), LeakyReLU(0.2) after the first four, output ``x + 0.2 * conv5(...)``."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32, res_scale: float = 0.2) -> None:
        super().__init__()
        self.res_scale = res_scale
        g = num_grow_ch
        self.conv1 = nn.Conv2d(num_feat, g, 3, padding=1)
        self.conv2 = nn.Conv2d(num_feat + g, g, 3, padding=1)
        self.conv3 = nn.Conv2d(num_feat + 2 * g, g, 3, padding=1)
        self.conv4 = nn.Conv2d(num_feat + 3 * g, g, 3, padding=1)
        self.conv5 = nn.Conv2d(num_feat + 4 * g, num_feat, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self, scale: float = 0.1) -> None:
        """basicsr's init for RRDB: Kaiming-normal weights times ``scale``, zero biases."""
        if self.conv1.weight.is_meta:  # nothing to fill (and normal_ on meta is slow to set up)
            return
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight)
            with torch.no_grad():
                conv.weight.mul_(scale)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, dim=1)), 0.2))
        return x + self.res_scale * self.conv5(torch.cat(feats, dim=1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three :class:`ResidualDenseBlock` s, ``x + 0.2 * out``."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32, res_scale: float = 0.2) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.rdb3(self.rdb2(self.rdb1(x)))


class FuseLayer(nn.Module):
    """``dec + w * f(cat[enc, dec])`` with ``f`` = ResBlock(2C->C), ``num_rrdb`` RRDBs, ResBlock.

    ``enc`` are encoder features of the (upsampled) LR image at the same level and size as
    the decoder features ``dec``. ``w`` (the release's ``fusion_w``, default 1.0) trades
    fidelity to the LR input against the generated detail.
    """

    def __init__(
        self,
        channels: int,
        num_rrdb: int = 2,
        num_grow_ch: int = 32,
        norm_groups: int = NORM_GROUPS,
    ) -> None:
        super().__init__()
        if num_rrdb < 1:
            raise ValueError(f"FuseLayer: num_rrdb must be >= 1, got {num_rrdb}")
        self.channels = channels
        self.encode_enc_1 = FuseResBlock(2 * channels, channels, norm_groups)
        self.encode_enc_2 = nn.Sequential(*(RRDB(channels, num_grow_ch) for _ in range(num_rrdb)))
        self.encode_enc_3 = FuseResBlock(channels, channels, norm_groups)

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        if enc.shape != dec.shape:
            raise ValueError(
                f"fuse layer: encoder features {tuple(enc.shape)} and decoder features "
                f"{tuple(dec.shape)} differ; the LR image must be upsampled to the HR size "
                "(x8) before it is encoded"
            )
        f = self.encode_enc_1(torch.cat([enc, dec], dim=1))
        f = self.encode_enc_3(self.encode_enc_2(f))
        return dec + w * f
