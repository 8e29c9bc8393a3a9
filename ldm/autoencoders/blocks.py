"""Building blocks of the LDM / Stable Diffusion first-stage autoencoders.

Parameter names follow ``ldm/modules/diffusionmodules/model.py`` of CompVis
latent-diffusion, so released checkpoints load without renaming. The maths is
the same; attention runs through ``F.scaled_dot_product_attention`` and, when
no gradient is recorded, activations and residual sums are computed in place
to keep the peak memory of large decodes down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: GroupNorm groups of the LDM / Stable Diffusion autoencoders (every released checkpoint).
NORM_GROUPS = 32


class ChannelAffine(nn.Module):
    """``x * weight + bias`` per channel: the ``norm_groups = 0`` stand-in for a GroupNorm
    (no normalisation, same parameter names and shapes, so the layout stays LDM's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.num_channels = channels
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


def group_norm(channels: int, groups: int, eps: float) -> nn.Module:
    """``GroupNorm(groups, channels, eps)``, or :class:`ChannelAffine` for ``groups == 0``."""
    if groups == 0:
        return ChannelAffine(channels)
    if groups < 0 or channels % groups:
        raise ValueError(
            f"GroupNorm: {channels} channels cannot be split into {groups} groups; pick "
            "norm_groups dividing every width of the model (or 0: no normalisation)"
        )
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps, affine=True)


def Normalize(channels: int, groups: int = NORM_GROUPS) -> nn.Module:  # noqa: N802 (LDM name)
    """GroupNorm, eps 1e-6, affine (LDM ``Normalize``; 32 groups as released).

    ``groups`` is a model parameter for narrow models. GroupNorm removes each group's spatial
    mean and scale, so colour and brightness reach the output only as differences between the
    channels of a group: at 32 channels, 32 groups (an instance norm) erase them entirely, and a
    small model trained briefly learns them very slowly even with fewer groups. ``groups = 0``
    means no normalisation (:class:`ChannelAffine`, a per-channel scale and shift with the same
    parameters). The parameter shapes do not depend on it.
    """
    return group_norm(channels, groups, eps=1e-6)


def silu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` (LDM ``nonlinearity``); in place when no graph is recorded.

    Callers pass a freshly computed tensor that nobody else holds.
    """
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """``x + conv2(drop(silu(norm2(conv1(silu(norm1(x)))))))``, 1x1 ``nin_shortcut`` on width change.

    ``temb_channels`` is kept for signature compatibility with LDM; the
    autoencoders use 0 (no timestep embedding, no ``temb_proj``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        temb_channels: int = 0,
        norm_groups: int = NORM_GROUPS,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return h.add_(shortcut)  # h is a fresh conv output: safe in place, also under autograd


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1-conv projections (LDM ``AttnBlock``).

    ``softmax(q k^T / sqrt(C)) v`` through ``F.scaled_dot_product_attention``;
    the 1x1 convolutions are applied as matrix products on the token view.
    """

    def __init__(self, channels: int, norm_groups: int = NORM_GROUPS) -> None:
        super().__init__()
        self.channels = channels
        self.norm = Normalize(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    @staticmethod
    def _linear(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q = self._linear(self.q, tokens)
        k = self._linear(self.k, tokens)
        v = self._linear(self.v, tokens)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        h = self._linear(self.proj_out, h)  # [B, HW, C]
        return h.transpose(1, 2).reshape(b, c, hgt, wid).add_(x)


class _Resample(nn.Module):
    """The optional 3x3 ``conv`` of :class:`Upsample` / :class:`Downsample`."""

    def __init__(self, channels: int, with_conv: bool, *, stride: int, padding: int) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=padding)


class Upsample(_Resample):
    """Nearest-neighbour x2, then a 3x3 conv when ``with_conv``."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__(channels, with_conv, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(_Resample):
    """Stride-2 3x3 conv after LDM's asymmetric zero pad (right and bottom by 1); else avg-pool 2."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__(channels, with_conv, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)
