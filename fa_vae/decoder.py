"""The frequency-augmented decoder: the LDM decoder plus fuse layers and a frequency module.

Luo et al. (arXiv 2310.12004), section 3.1. Two released variants:

* **VQ-f4** (SR): fuse layers ``fusion_layer_{i}`` at every up-level ``0 < i < len(ch_mult)-1``
  merge the encoder features of the x8-upsampled LR image into the decoder (after the
  level's blocks, before its upsample), and the frequency module ``unet_1`` refines the
  full-resolution features before ``norm_out``. Official: ``Decoder_Mix_Unet``
  (``sr_8x_inf/ldm/models/vqmodel.py``).
* **KL-f8** (text-to-image): only ``unet_1``; no LR input, so it replaces any SD1.5
  decoder. Official: ``DecoderAFF`` (``vae_txt2img_inf/models/autoencoder.py``).

The LDM decoder's ``forward`` is reused unchanged through its two hooks,
:meth:`~ldm.autoencoders.decoder.Decoder.fuse_skip` and ``pre_out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fa_vae.frequency import UNetAff
from fa_vae.fusion import FuseLayer
from ldm.autoencoders.blocks import NORM_GROUPS
from ldm.autoencoders.decoder import Decoder


class FADecoder(Decoder):
    """LDM :class:`~ldm.autoencoders.decoder.Decoder` with LR fuse layers and ``unet_1``.

    Extra parameters (besides the LDM ``ddconfig`` ones, which go on to
    :class:`~ldm.autoencoders.decoder.Decoder` as ``ldm_params``; like the release's
    ``num_fuse_block`` they live in ``ddconfig``):

    * ``fuse_lr``: build the fuse layers (VQ-f4 FA-VAE) or not (KL-f8 FA-VAE);
    * ``num_fuse_block``: RRDB blocks per fuse layer (release: 2);
    * ``freq_ch_mul``, ``freq_hidden_size_factor``, ``freq_drop_path``, ``freq_mlp_ratio``:
      the :class:`~fa_vae.frequency.UNetAff` (release: ``(1, 1, 2, 2)``, 1, 0.1, 4: the
      expansion of its inverted residuals, most of its cost at full resolution);
    * ``norm_groups``: GroupNorm groups everywhere in the decoder, fuse layers and frequency
      module (release: 32; narrow models want several channels per group).

    Attributes set after construction (by the model): ``fusion_w``, the weight ``w`` of
    the fused residual (release: 1.0), and ``release_train_mode``: keep ``unet_1`` in
    train mode even after ``.eval()`` (batch-statistics BatchNorm and random DropPath),
    the behaviour of the official SR script, which never calls ``.eval()``. Off by
    default: with it, outputs depend on the batch and on the random state.

    ``forward(z, skips)``: ``skips`` are the features of ``Encoder(x, return_features=True)``
    for the upsampled LR image ``x`` (``skips[i]`` = level ``i``); required when there
    are fuse layers, refused otherwise.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        fuse_lr: bool = True,
        num_fuse_block: int = 2,
        freq_ch_mul: Sequence[int] = (1, 1, 2, 2),
        freq_hidden_size_factor: int = 1,
        freq_drop_path: float = 0.1,
        freq_mlp_ratio: float = 4.0,
        norm_groups: int = NORM_GROUPS,
        **ldm_params: Any,
    ) -> None:
        super().__init__(ch=ch, ch_mult=ch_mult, norm_groups=norm_groups, **ldm_params)
        ch_mult = tuple(ch_mult)
        #: weight ``w`` of the fused residual (the release's ``fusion_w``)
        self.fusion_w = 1.0
        #: keep ``unet_1`` in train mode after ``.eval()`` (the official SR script's behaviour)
        self.release_train_mode = False
        # The release registers fusion_layer_{i} from the deepest level down, then unet_1,
        # all between ``up`` and ``norm_out``: keep that order so state_dict() matches it.
        self.fuse_levels: tuple[int, ...] = (
            tuple(i for i in reversed(range(1, len(ch_mult) - 1))) if fuse_lr else ()
        )
        for i in self.fuse_levels:
            self.add_module(
                f"fusion_layer_{i}",
                FuseLayer(ch * ch_mult[i], num_rrdb=num_fuse_block, norm_groups=norm_groups),
            )
        block_in = ch * ch_mult[0]
        self.unet_1 = UNetAff(
            block_in,
            block_in,
            ch_mul=freq_ch_mul,
            hidden_size_factor=freq_hidden_size_factor,
            drop_path=freq_drop_path,
            norm_groups=norm_groups,
            mlp_ratio=freq_mlp_ratio,
        )
        for name in ("norm_out", "conv_out"):
            self._modules[name] = self._modules.pop(name)

    # ------------------------------------------------------------------ hooks

    def fuse_skip(
        self, level: int, h: torch.Tensor, skips: Sequence[torch.Tensor] | None
    ) -> torch.Tensor:
        if not self.fuse_levels:
            if skips is not None:
                raise ValueError(
                    "this FA decoder has no fuse layers (KL-f8 variant): decode without skips"
                )
            return h
        if level not in self.fuse_levels:
            return h
        if skips is None:
            raise ValueError(
                "the VQ-f4 FA decoder fuses LR features: pass skips = the encoder features "
                "of the LR image upsampled to the output size, i.e. "
                "model.encode(lr_up, return_features=True)[1]"
            )
        expected = self.num_resolutions - 1
        if len(skips) != expected:
            raise ValueError(
                f"skips must hold {expected} encoder level features (one per downsampling "
                f"level, as Encoder(x, return_features=True) returns), got {len(skips)}"
            )
        return getattr(self, f"fusion_layer_{level}")(skips[level], h, self.fusion_w)

    def pre_out(self, h: torch.Tensor) -> torch.Tensor:
        if self.give_pre_end:  # the release returns the features before its frequency module
            return h
        return self.unet_1(h.contiguous())

    # ------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> FADecoder:
        super().train(mode)
        if self.release_train_mode:
            self.unet_1.train(True)
        return self

    def frequency_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the FA parts (fuse layers and ``unet_1``), the ones the release trains."""
        params = list(self.unet_1.parameters())
        for i in self.fuse_levels:
            params += list(getattr(self, f"fusion_layer_{i}").parameters())
        return params
