"""The frequency module of the FA-VAE: adaptive frequency filters (AFNO) in a small U-Net.

Luo et al. (arXiv 2310.12004), section 3.1: the decoder of a latent-diffusion autoencoder
loses high frequencies; a frequency-augmented block at full resolution, right before the
decoder's output layers, learns to restore them. The release builds it from the
"Adaptive Frequency Filters" token mixer (Huang et al., 2023): features go to the
Fourier domain, a small block-diagonal complex MLP predicts an input-dependent spectral
mask, the spectrum is multiplied by it and transformed back.

Parameter and buffer names equal the released checkpoints (``decoder.unet_1.*``); the
release's ``SyncBatchNorm`` is a plain :class:`torch.nn.BatchNorm2d` here (same
parameters and buffers, so the state dicts load; no process group needed). Inference
runs in ``eval()`` mode: running BatchNorm statistics, no DropPath.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.autoencoders.blocks import group_norm


class AFNO2D(nn.Module):
    """Channel-first adaptive Fourier filter with a residual connection.

    ``x -> irfft2(rfft2(x) * M(rfft2(x))) + x`` where the mask ``M`` is a two-layer complex
    MLP applied per frequency, block-diagonal over ``num_blocks`` groups of channels:
    ``M = softshrink(W2 · leaky_relu(W1 · X + b1) + b2)``. Real and imaginary parts of the
    hidden layer go through the LeakyReLU separately (slope 0.1), the output through a
    softshrink with threshold ``sparsity_threshold`` (0.01), which zeroes small mask entries.
    FFTs use ``norm="ortho"``. As in the release the filter always runs in float32
    (autocast off) and casts the result back to the input dtype.

    Official: ``AFNO2D_channelfirst`` (``sr_8x_inf/ldm/models/tvae/aff.py``).
    """

    def __init__(
        self,
        channels: int,
        num_blocks: int = 8,
        hidden_size_factor: int = 1,
        sparsity_threshold: float = 0.01,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        if channels % num_blocks != 0:
            raise ValueError(
                f"AFNO2D: channels ({channels}) must be divisible by num_blocks ({num_blocks})"
            )
        self.channels = channels
        self.num_blocks = num_blocks
        self.block_size = channels // num_blocks
        self.hidden_size_factor = hidden_size_factor
        self.sparsity_threshold = sparsity_threshold
        self.negative_slope = negative_slope
        k, bs, hid = num_blocks, self.block_size, self.block_size * hidden_size_factor
        # index 0: real part, index 1: imaginary part of the complex weights
        self.w1 = nn.Parameter(torch.empty(2, k, bs, hid))
        self.b1 = nn.Parameter(torch.empty(2, k, hid))
        self.w2 = nn.Parameter(torch.empty(2, k, hid, bs))
        self.b2 = nn.Parameter(torch.empty(2, k, bs))
        self.reset_parameters()

    def reset_parameters(self, scale: float = 0.02) -> None:
        """Official initialisation: every weight and bias ``scale * N(0, 1)``."""
        if self.w1.is_meta:  # nothing to fill (and normal_ on meta is slow to set up)
            return
        with torch.no_grad():
            for p in (self.w1, self.b1, self.w2, self.b2):
                p.normal_(0.0, scale)

    @staticmethod
    def _complex_linear(
        re: torch.Tensor, im: torch.Tensor, w: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-diagonal complex affine map over the channel axis of ``[B, k, i, H, W]``."""
        real = (
            torch.einsum("bkihw,kio->bkohw", re, w[0])
            - torch.einsum("bkihw,kio->bkohw", im, w[1])
            + b[0, :, :, None, None]
        )
        imag = (
            torch.einsum("bkihw,kio->bkohw", im, w[0])
            + torch.einsum("bkihw,kio->bkohw", re, w[1])
            + b[1, :, :, None, None]
        )
        return real, imag

    def spectral_mask(self, spectrum: torch.Tensor) -> torch.Tensor:
        """The complex mask ``M`` for an ``rfft2`` spectrum ``[B, C, H, W//2+1]``."""
        b, c, h, wf = spectrum.shape
        x = spectrum.reshape(b, self.num_blocks, self.block_size, h, wf)
        w1, b1, w2, b2 = (p.float() for p in (self.w1, self.b1, self.w2, self.b2))
        re, im = self._complex_linear(x.real, x.imag, w1, b1)
        re = F.leaky_relu(re, self.negative_slope)
        im = F.leaky_relu(im, self.negative_slope)
        re, im = self._complex_linear(re, im, w2, b2)
        mask = F.softshrink(torch.stack([re, im], dim=-1), lambd=self.sparsity_threshold)
        return torch.view_as_complex(mask.contiguous()).reshape(b, c, h, wf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"AFNO2D expects [B, {self.channels}, H, W] features, got {tuple(x.shape)}"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            h, w = x.shape[-2:]
            spectrum = torch.fft.rfft2(x.float(), dim=(2, 3), norm="ortho")
            mask = self.spectral_mask(spectrum)
            filtered = spectrum.mul_(mask) if not torch.is_grad_enabled() else spectrum * mask
            y = torch.fft.irfft2(filtered, s=(h, w), dim=(2, 3), norm="ortho").to(x.dtype)
        return y.add_(x) if not torch.is_grad_enabled() else y + x

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_blocks={self.num_blocks}, "
            f"hidden_size_factor={self.hidden_size_factor}, "
            f"sparsity_threshold={self.sparsity_threshold}"
        )


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor`` (not below it, never more than 10% down).

    The MobileNet channel rule the release uses for the inverted-residual width.
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Module):
    """``conv (no bias) -> BatchNorm2d -> [LeakyReLU(0.1)]`` under ``.block`` (official ``ConvLayer``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        groups: int = 1,
        act: bool = True,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        )
        # The release uses SyncBatchNorm: same parameters and buffers, no process group.
        layers["norm"] = nn.BatchNorm2d(out_channels)
        if act:
            layers["act"] = nn.LeakyReLU(negative_slope)
        self.block = nn.Sequential(layers)
        self.negative_slope = negative_slope if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.block.norm.training:
            return self.block(x)
        # Inference: the same maths, with BatchNorm and activation applied in place on the
        # fresh conv output (the full-resolution blocks are 4x wider than the decoder).
        norm = self.block.norm
        x = self.block.conv(x)
        scale = norm.weight.float() * torch.rsqrt(norm.running_var.float() + norm.eps)
        shift = norm.bias.float() - norm.running_mean.float() * scale
        x.mul_(scale.to(x.dtype)[:, None, None]).add_(shift.to(x.dtype)[:, None, None])
        if self.negative_slope is not None:
            F.leaky_relu(x, self.negative_slope, inplace=True)
        return x


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 reduce (no activation); residual
    when the channel count is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = make_divisible(int(round(in_channels * expand_ratio)), 8)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expand_ratio != 1:
            layers["exp_1x1"] = ConvBNAct(in_channels, hidden, 1)
        layers["conv_3x3"] = ConvBNAct(hidden, hidden, 3, groups=hidden)
        layers["red_1x1"] = ConvBNAct(hidden, out_channels, 1, act=False)
        self.block = nn.Sequential(layers)
        self.use_residual = in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if not self.use_residual:
            return out
        return out.add_(x) if not torch.is_grad_enabled() else out + x


class DropPath(nn.Module):
    """Stochastic depth per sample, scaled by ``1/keep``; identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class AFFBlock(nn.Module):
    """Adaptive-frequency-filter block (official ``AFFBlock`` with ``double_skip=True``).

    ``h = mlp(norm1(x)) + up_dim(x)``; ``out = drop_path(filter(norm2(h))) + h``, where
    ``mlp`` is an :class:`InvertedResidual` (``in -> out`` channels), ``up_dim`` a 1x1
    projection of the input and ``filter`` an :class:`AFNO2D` on ``out`` channels (which
    carries its own residual). ``norm1``/``norm2`` are GroupNorm(32) with torch's default
    eps (1e-5), unlike the autoencoder's 1e-6.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hidden_size_factor: int = 1,
        num_blocks: int = 8,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        # registration order = the release's state_dict order
        self.norm1 = group_norm(in_channels, norm_groups, eps=1e-5)
        self.filter = AFNO2D(
            out_channels, num_blocks=num_blocks, hidden_size_factor=hidden_size_factor
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = group_norm(out_channels, norm_groups, eps=1e-5)
        self.up_dim = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.mlp = InvertedResidual(in_channels, out_channels, expand_ratio=mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        no_grad = not torch.is_grad_enabled()
        h = self.mlp(self.norm1(x))
        h = h.add_(self.up_dim(x)) if no_grad else h + self.up_dim(x)
        out = self.drop_path(self.filter(self.norm2(h)))
        return out.add_(h) if no_grad else out + h


def _subpixel_up(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv to ``4 * out_channels`` followed by PixelShuffle(2) (x2 upsampling)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels * 4, kernel_size=1), nn.PixelShuffle(2)
    )


class UNetAff(nn.Module):
    """Three-scale U-Net of :class:`AFFBlock` s: the FA-VAE frequency module (``decoder.unet_1``).

    Encoder ``conv1`` (full res) -> maxpool -> ``conv2`` (1/2) -> maxpool -> ``conv3`` (1/4)
    -> four ``context_refine`` blocks; decoder: ``up3`` (sub-pixel x2), concat with the
    ``conv2`` output, ``up_conv3``; ``up2``, concat with ``conv1`` output, ``up_conv2``.
    Widths are ``ch_mul[1..3] * in_channels``; both released decoders use
    ``ch_mul=(1, 1, 2, 2)`` and ``hidden_size_factor=1``. Height and width must be
    divisible by 4. ``block_params`` (``hidden_size_factor``, ``num_blocks``, ``mlp_ratio``,
    ``drop_path``, ``norm_groups``) go to every :class:`AFFBlock`, with its defaults.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ch_mul: Sequence[int] = (1, 1, 2, 2),
        *,
        num_context_blocks: int = 4,
        **block_params: Any,
    ) -> None:
        super().__init__()
        if len(ch_mul) != 4:
            raise ValueError(f"UNetAff: ch_mul needs 4 entries, got {list(ch_mul)}")
        c1, c2, c3 = (m * in_channels for m in ch_mul[1:])
        self.max_pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv1 = AFFBlock(in_channels, c1, **block_params)
        self.conv2 = AFFBlock(c1, c2, **block_params)
        self.conv3 = AFFBlock(c2, c3, **block_params)
        self.context_refine = nn.ModuleList(
            AFFBlock(c3, c3, **block_params) for _ in range(num_context_blocks)
        )
        self.up_conv3 = AFFBlock(2 * c2, c2, **block_params)
        self.up_conv2 = AFFBlock(2 * c1, out_channels, **block_params)
        self.up3 = _subpixel_up(c3, c2)
        self.up2 = _subpixel_up(c2, c1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(
                f"UNetAff needs height and width divisible by 4 (two 2x2 poolings), got {h}x{w}; "
                "pad the image to a multiple of 4x the autoencoder's downsampling factor"
            )
        x1 = self.conv1(x)
        x2 = self.conv2(self.max_pool(x1))
        x3 = self.conv3(self.max_pool(x2))
        for block in self.context_refine:
            x3 = block(x3)
        d3 = self.up_conv3(torch.cat([x2, self.up3(x3)], dim=1))
        return self.up_conv2(torch.cat([x1, self.up2(d3)], dim=1))
