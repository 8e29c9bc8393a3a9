"""The LDM UNet (``openaimodel.UNetModel``), optionally with FFN-MoE layers (SS-MoE stage experts).

With ``ffn_moe_experts == 0`` this is latent-diffusion's UNet (e.g. the bsr_sr 4x SR model);
with ``ffn_moe_experts = E > 0`` every attention block is followed by an :class:`FFNMoE`
layer, as in the official ``UNetModelWithFFNMoe``. The module tree, and so every parameter
name, equals the released checkpoints' ``model.diffusion_model.*`` keys: in the blocks with
attention, index 1 is the attention block and index 2 the FFN-MoE layer (so the middle
block's second ResBlock is ``middle_block.3`` and an up-level's upsampler
``output_blocks.i.3`` instead of ``.2``).

Conditioning is by concatenation: ``forward(x, t)`` with ``x = cat([x_t, cond], 1)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ldm.checkpoint import PRESET_GUESSERS
from ldm.registry import register
from ldm.unet.ffn_moe import FFNMoE
from ldm.unet.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)

logger = logging.getLogger(__name__)


@register("unet", kind="unet")
class UNetModel(nn.Module):
    """UNet with timestep embedding, ResBlocks, legacy attention and optional FFN-MoE.

    Args:
        in_channels: input channels (latent + concatenated condition; 6 for the 8x SR model).
        out_channels: predicted channels (3: eps of a 3-channel latent).
        model_channels: base width (160 in the released stage experts).
        num_res_blocks: ResBlocks per level.
        attention_resolutions: downsampling rates (1, 2, 4, ...) at which ResBlocks are
            followed by attention (LDM semantics; e.g. ``[8]`` = at 1/8 of the input size).
            Rates the network never reaches have no effect (the official configs list 16).
        channel_mult: width multiplier per level.
        num_heads / num_head_channels: heads per attention block, or channels per head
            (one of the two must be set; ``num_head_channels`` wins, as in LDM).
        dropout: dropout in the ResBlocks.
        conv_resample: learned 3x3 convolutions for up/downsampling.
        use_scale_shift_norm: FiLM-style timestep conditioning in the ResBlocks.
        resblock_updown: resample with ResBlocks instead of Up/Downsample layers.
        ffn_moe_experts: FFN experts per FFN-MoE layer (0 = no FFN-MoE layers).
        ffn_moe_routing: ``"random"`` (released behaviour) or ``"average"``.
        use_checkpoint: gradient checkpointing of ResBlocks/attention during training.
        attention_backend: ``"sdpa"`` (default) or ``"xformers"`` (CUDA inputs only).
        norm_groups: GroupNorm groups (32 in every released model; a narrow model wants
            several channels per group, e.g. 8 groups at 32 channels).

    The output convolution takes ``model_channels`` inputs in the official code; that is the
    width of the last level only when ``channel_mult[0] == 1`` (the official model fails
    otherwise). We size it with the actual width, which is the same layout whenever the
    official model runs.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = -1,
        num_head_channels: int = -1,
        dropout: float = 0.0,
        conv_resample: bool = True,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        ffn_moe_experts: int = 0,
        ffn_moe_routing: str = "random",
        use_checkpoint: bool = False,
        attention_backend: str = "sdpa",
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (both are -1)")
        if not channel_mult:
            raise ValueError("channel_mult must list at least one level")
        if norm_groups < 0 or (
            norm_groups and any(model_channels * m % norm_groups for m in (1, *channel_mult))
        ):
            raise ValueError(
                f"model_channels={model_channels} x channel_mult={list(channel_mult)} must give "
                f"multiples of norm_groups={norm_groups} (GroupNorm)"
            )
        if ffn_moe_experts < 0:
            raise ValueError(f"ffn_moe_experts must be >= 0, got {ffn_moe_experts}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.ffn_moe_experts = ffn_moe_experts
        self.downsample_factor = 2 ** (len(channel_mult) - 1)

        def res(ch_in: int, ch_out: int | None = None, **kw) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                use_scale_shift_norm=use_scale_shift_norm,
                use_checkpoint=use_checkpoint,
                norm_groups=norm_groups,
                **kw,
            )

        def attn_layers(ch: int) -> list[nn.Module]:
            layers: list[nn.Module] = [
                AttentionBlock(
                    ch,
                    num_heads=num_heads,
                    num_head_channels=num_head_channels,
                    use_checkpoint=use_checkpoint,
                    backend=attention_backend,
                    norm_groups=norm_groups,
                )
            ]
            if ffn_moe_experts > 0:
                layers.append(FFNMoE(ch, num_experts=ffn_moe_experts, routing=ffn_moe_routing))
            return layers

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers += attn_layers(ch)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), *attn_layers(ch), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers += attn_layers(ch)
                if level and i == num_res_blocks:
                    up = res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, norm_groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )

    # ------------------------------------------------------------------ FFN-MoE control
    def ffn_moe_layers(self) -> list[FFNMoE]:
        """The FFN-MoE layers in call order (input blocks, middle block, output blocks)."""
        return [m for m in self.modules() if isinstance(m, FFNMoE)]

    def set_ffn_moe_routing(
        self,
        mode: str,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        perms: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Set the routing of every FFN-MoE layer.

        ``mode``: ``"random"`` (one ``randperm`` per layer and forward from ``generator``,
        default torch's CPU generator, drawn in call order like the release; a sequence of
        generators routes each sample of a batch with its own), ``"average"``
        (FFN experts averaged into one FFN) or ``"fixed"`` (replay recorded permutations:
        ``perms[i]`` is used by the i-th layer of :meth:`ffn_moe_layers` on every forward).
        """
        layers = self.ffn_moe_layers()
        if not layers:
            raise ValueError("this UNet has no FFN-MoE layers (ffn_moe_experts=0)")
        if mode == "fixed":
            if perms is None or len(perms) != len(layers):
                got = "none" if perms is None else len(perms)
                raise ValueError(
                    f"routing 'fixed' needs one permutation per FFN-MoE layer: {len(layers)} "
                    f"layers, got {got}"
                )
            for layer, perm in zip(layers, perms):
                layer.set_routing("fixed", perm=perm)
            return
        if perms is not None:
            raise ValueError(f"perms are only used by routing 'fixed', not {mode!r}")
        for layer in layers:
            layer.set_routing(mode, generator=generator)

    def last_ffn_moe_perms(self) -> list[torch.Tensor | None]:
        """The permutation each FFN-MoE layer used in the last forward (``None`` if none)."""
        return [layer.last_perm for layer in self.ffn_moe_layers()]

    def pack_ffn_moe_experts(self) -> None:
        """Lay out every FFN-MoE layer's FFN expert parameters as slices of stacked tensors (see
        :meth:`FFNMoE.pack_experts`). Layers are packed when built and after every ``.to()``;
        this is only needed after replacing parameters by hand."""
        for layer in self.ffn_moe_layers():
            layer.pack_experts()

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet input must be [B, {self.in_channels}, H, W] (x_t and the condition "
                f"concatenated on channels), got {tuple(x.shape)}"
            )
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"UNet input height and width must be multiples of {f} "
                f"(2**(levels-1)), got {tuple(x.shape[2:])}; pad the latent"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape [{x.shape[0]}], got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict from ``x = cat([x_t, cond], 1)`` [B, in, H, W] at timesteps ``t`` [B]."""
        t = self._check_inputs(x, t)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


@PRESET_GUESSERS.register("unet")
def guess_unet_preset(state_dict) -> str | None:
    """Name the UNet preset a state_dict (prefix stripped or not) most likely belongs to."""
    first = next((v for k, v in state_dict.items() if k.endswith("input_blocks.0.0.weight")), None)
    if first is None or first.ndim != 4:
        return None
    experts = {k.split("moe_blocks.")[1].split(".")[0] for k in state_dict if ".moe_blocks." in k}
    shape = (tuple(first.shape), len(experts))
    return {
        ((160, 6, 3, 3), 16): "unet/sr8x_expert",
        ((160, 6, 3, 3), 0): "unet/ldm_sr4x",
        ((32, 6, 3, 3), 4): "unet/sr8x_expert_tiny",
    }.get(shape)
