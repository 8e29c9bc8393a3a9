"""Exponential moving average of a model's weights, stored with latent-diffusion's names.

The buffers are laid out exactly as LDM's ``LitEma`` (``ldm/modules/ema.py``) lays them out,
so a checkpoint written by our training has the same ``model_ema.*`` keys as the released
stage checkpoints (see ``../shared/reference/manifests/moe_stage_ckpt.json``):

* ``decay`` (float32 scalar) and ``num_updates`` (**int32** scalar) first;
* then one buffer per trainable parameter, named after the parameter with every dot removed
  (``diffusion_model.input_blocks.5.2.moe_blocks.0.0.weight`` ->
  ``diffusion_modelinput_blocks52moe_blocks00weight``).

The effective decay warms up as in LDM: ``min(decay, (1 + n) / (10 + n))`` where ``n`` is the
number of updates done so far (counted after the increment).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn


def shadow_name(name: str) -> str:
    """LDM's EMA buffer name for parameter ``name``: the dots removed."""
    return name.replace(".", "")


class EMA(nn.Module):
    """Shadow copies of ``model``'s trainable parameters (LDM ``LitEma`` layout).

    Args:
        model: the module whose parameters are averaged (LDM's ``DiffusionWrapper``, here the
            ``ConcatDenoiser``, so that names start with ``diffusion_model``).
        decay: the target decay.
        use_num_updates: LDM's warm-up ``min(decay, (1+n)/(10+n))``; when ``False``,
            ``num_updates`` stays -1 and the fixed ``decay`` is used from the first update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer(
            "num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32)
        )
        self.name_map: dict[str, str] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            s_name = shadow_name(name)
            if s_name in self.name_map.values():
                raise ValueError(
                    f"two parameters map to the EMA buffer name {s_name!r} after removing dots; "
                    "rename one of them"
                )
            self.name_map[name] = s_name
            self.register_buffer(s_name, p.detach().clone())
        self._stored: list[torch.Tensor] = []

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use (after its counter increment)."""
        decay = float(self.decay)
        n = int(self.num_updates)
        if n >= 0:
            n += 1
            decay = min(decay, (1 + n) / (10 + n))
        return decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step: ``shadow -= (1 - decay) * (shadow - param)``."""
        decay = self.current_decay()
        if int(self.num_updates) >= 0:
            self.num_updates += 1
        one_minus = 1.0 - decay
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if not p.requires_grad:
                if name in self.name_map:
                    raise RuntimeError(
                        f"parameter {name!r} was trainable when the EMA was built but is frozen now"
                    )
                continue
            if name not in self.name_map:
                raise RuntimeError(f"parameter {name!r} has no EMA copy (added after the EMA?)")
            s = shadows[self.name_map[name]]
            s.sub_(one_minus * (s - p.detach().to(s.dtype)))

    forward = update

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model``'s parameters (in place)."""
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.name_map:
                p.copy_(shadows[self.name_map[name]])

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the EMA values in place of the trainable parameters."""
        shadows = dict(self.named_buffers())
        out = {}
        for name, v in model.state_dict().items():
            s = self.name_map.get(name)
            out[name] = shadows[s].detach().clone() if s is not None else v.detach().clone()
        return out

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Remember the current values of ``parameters`` (to :meth:`restore` them later)."""
        self._stored = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the values saved by :meth:`store`."""
        params = list(parameters)
        if len(params) != len(self._stored):
            raise RuntimeError(
                f"restore() got {len(params)} parameters but store() saved {len(self._stored)}"
            )
        for p, s in zip(params, self._stored):
            p.copy_(s)
        self._stored = []

    @contextmanager
    def average_parameters(self, model: nn.Module):
        """Context in which ``model`` holds the EMA weights; training weights come back after."""
        self.store(model.parameters())
        self.copy_to(model)
        try:
            yield model
        finally:
            self.restore(model.parameters())
