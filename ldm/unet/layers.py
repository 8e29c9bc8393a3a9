"""Building blocks of the LDM / guided-diffusion UNet.

Module and parameter names follow ``openaimodel.py`` of latent-diffusion (and of the
official SS-MoE release), so released checkpoints load by stripping a prefix:
``ResBlock`` has ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``,
``skip_connection``; ``AttentionBlock`` has ``norm``, ``qkv`` (1x1 Conv1d), ``proj_out``;
``Downsample.op``, ``Upsample.conv``.
"""

from __future__ import annotations

import importlib.util
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t*f) | sin(t*f)]`` of timesteps ``t`` ([B], may be fractional).

    ``f_i = exp(-ln(max_period) * i / half)``, ``i = 0..half-1`` (float32, computed on the
    CPU like the official ``util.timestep_embedding``); an odd ``dim`` gets a zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (LDM ``GroupNorm32``), result cast back to ``x.dtype``.

    Works for half/bfloat16 models too: the affine parameters are cast to float32 for the
    computation.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int, groups: int = 32) -> nn.Module:
    """The UNet's normalisation: GroupNorm, eps 1e-5, affine (32 groups in every released
    model; ``groups`` lets narrow models keep several channels per group; ``0`` means no
    normalisation, a per-channel scale and shift with the same parameters)."""
    if groups == 0:
        from ldm.autoencoders.blocks import ChannelAffine

        return ChannelAffine(channels)
    return GroupNorm32(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise the parameters of ``module`` (output convolutions, as in LDM)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class TimestepBlock(nn.Module):
    """A module whose ``forward(x, emb)`` takes the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that passes ``emb`` to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class _Resample(nn.Module):
    """The channel counts of :class:`Upsample` / :class:`Downsample`; only a convolution may
    change them."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if not use_conv and self.out_channels != channels:
            raise ValueError(
                f"{type(self).__name__} without a convolution cannot change the channel count"
            )


class Upsample(_Resample):
    """Nearest x2 upsampling, then an optional 3x3 convolution (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__(channels, use_conv, out_channels)
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(_Resample):
    """x2 downsampling: a strided 3x3 convolution (``op``, padding 1) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__(channels, use_conv, out_channels)
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    ``h = in_layers(x)`` (norm, SiLU, conv3x3); the projected embedding is added to ``h``
    (or, with ``use_scale_shift_norm``, applied FiLM-style as ``norm(h)*(1+scale)+shift``);
    ``out_layers`` (norm, SiLU, dropout, zero-initialised conv3x3); output
    ``skip_connection(x) + h``. ``up``/``down`` resample inside the block
    (``resblock_updown``), after the first norm+SiLU as in guided-diffusion.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers memory-efficient attention on [B, H, T, ch] tensors (CUDA only)."""
    import xformers.ops  # noqa: PLC0415 (optional backend)

    b, h, t, c = q.shape
    q, k, v = (z.transpose(1, 2).contiguous() for z in (q, k, v))  # [B, T, H, ch]
    out = xformers.ops.memory_efficient_attention(q, k, v)
    return out.transpose(1, 2)


class AttentionBlock(nn.Module):
    """Spatial self-attention with the *legacy* QKV layout of LDM's ``AttentionBlock``.

    ``qkv`` (1x1 Conv1d, ``3C`` outputs) is split into heads **first**: channels
    ``[h*3c, (h+1)*3c)`` belong to head ``h``, and within a head the first ``c`` are q, then
    k, then v (``QKVAttentionLegacy``). Attention itself runs through
    ``F.scaled_dot_product_attention`` (scale ``1/sqrt(c)``, same maths as the legacy
    einsum + float32 softmax), or xformers when ``backend="xformers"`` and the input is on
    CUDA (xformers has no CPU kernels; CPU inputs fall back to SDPA).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        backend: str = "sdpa",
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels are not divisible by num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention backend {backend!r} unknown; use one of {ATTENTION_BACKENDS}"
            )
        if backend == "xformers" and not xformers_available():
            raise ValueError(
                "attention backend 'xformers' requested but xformers is not installed; "
                "install it (GPU only) or use backend='sdpa'"
            )
        self.backend = backend
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        t = x.shape[-1]
        qkv = self.qkv(self.norm(x))  # [B, 3C, T]
        heads = self.num_heads
        ch = c // heads
        # legacy order: [B, heads, (q|k|v), ch, T]
        q, k, v = qkv.reshape(b, heads, 3, ch, t).transpose(-1, -2).unbind(dim=2)  # [B, H, T, ch]
        if self.backend == "xformers" and x.is_cuda:
            a = _xformers_attention(q, k, v)
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(-1, -2).reshape(b, c, t)  # heads back to channels, head-major
        return (x + self.proj_out(a)).reshape(b, c, *spatial)
