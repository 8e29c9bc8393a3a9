"""The timestep router of the sampling-space mixture of experts (SS-MoE).

:class:`TimestepRouter` is itself a denoiser (``router(x_t, t, cond) -> eps``): each call goes to
the stage expert whose stage owns ``t``. Any sampler of ``ldm.diffusion`` therefore drives four
stage experts exactly as it drives one UNet. Unlike the release (``ddim_moe.py:p_sample_ddim``
routes the whole batch by ``t[0]``), a batch that mixes stages is split per sample: each stage
expert involved is called once on its sub-batch and the results are scattered back in order.

Where the stage experts live is not the router's business: the optional ``on_switch(prev, new)``
hook is called before a stage expert of a different stage than the previous call's is used, so a
pipeline can move weights (e.g. keep only the active stage expert on the GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ldm.diffusion.denoiser import Denoiser
from moe_sr.stages import StageSchedule

logger = logging.getLogger(__name__)

__all__ = ["TimestepRouter"]

#: ``on_switch(prev_stage, new_stage)``; ``prev_stage`` is ``None`` on the first call.
SwitchHook = Callable[[int | None, int], None]


class TimestepRouter:
    """Route ``denoiser(x_t, t, cond)`` calls to ``experts[stages.stage_of(t)]``.

    Args:
        experts: one denoiser per stage, in stage order (stage expert ``k`` serves stage ``k``).
        stages: the :class:`StageSchedule` used to train the stage experts.
        on_switch: optional ``on_switch(prev_stage, new_stage)`` hook (see the module docstring).
    """

    def __init__(
        self,
        experts: Sequence[Denoiser],
        stages: StageSchedule,
        *,
        on_switch: SwitchHook | None = None,
    ):
        if not isinstance(stages, StageSchedule):
            raise TypeError(f"stages must be a StageSchedule, got {type(stages).__name__}")
        experts = tuple(experts)
        if len(experts) != stages.num_stages:
            raise ValueError(
                f"{len(experts)} experts given for {stages.num_stages} stages "
                f"(boundaries {list(stages.boundaries)}): give exactly one expert per stage"
            )
        for k, e in enumerate(experts):
            if not callable(e):
                raise TypeError(f"stage expert {k} is not callable (got {type(e).__name__})")
        self.experts = experts
        self.stages = stages
        self.on_switch = on_switch
        self.current_stage: int | None = None

    def __len__(self) -> int:
        return len(self.experts)

    def reset(self) -> None:
        """Forget the last used stage (the next call reports ``prev_stage=None``)."""
        self.current_stage = None

    def expert_for(self, t: int | torch.Tensor) -> Denoiser:
        """The stage expert serving timestep ``t`` (an int, or a tensor whose entries share a
        stage)."""
        stage = self.stages.stage_of(t)
        if isinstance(stage, torch.Tensor):
            unique = torch.unique(stage).tolist()
            if len(unique) != 1:
                raise ValueError(
                    f"timesteps span stages {unique}; expert_for needs timesteps of one stage "
                    "(call the router itself to route a mixed batch)"
                )
            stage = unique[0]
        return self.experts[stage]

    def _use(self, stage: int) -> Denoiser:
        if stage != self.current_stage:
            logger.debug("router: stage %s -> %s", self.current_stage, stage)
            if self.on_switch is not None:
                self.on_switch(self.current_stage, stage)
            self.current_stage = stage
        return self.experts[stage]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Any) -> torch.Tensor:
        batch = x_t.shape[0]
        t = torch.as_tensor(t)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"t must have shape [{batch}] (one timestep per sample), got {tuple(t.shape)}"
            )
        # The stage expert is chosen on the host. The samplers pass t as a CPU tensor (they know
        # their timesteps there), so this needs no device-to-host copy; a t on the device costs one
        # sync here (as the release's ``t[0].item()``).
        t_host = t if t.device.type == "cpu" else t.cpu()
        stage = self.stages.stage_of(t_host)
        unique = torch.unique(stage).tolist()
        if len(unique) == 1:
            return self._use(unique[0])(x_t, t, cond)

        # mixed batch: the current stage expert first (no switch), then the others in stage order
        if self.current_stage in unique:
            unique.remove(self.current_stage)
            unique.insert(0, self.current_stage)
        out: torch.Tensor | None = None
        for k in unique:
            idx = (stage == k).nonzero().squeeze(1)
            idx_dev = idx.to(x_t.device)
            eps_k = self._use(k)(x_t[idx_dev], t[idx.to(t.device)], _take(cond, idx_dev, batch))
            if out is None:
                out = eps_k.new_empty((batch, *eps_k.shape[1:]))
            out[idx_dev] = eps_k
        assert out is not None
        return out

    def __repr__(self) -> str:
        return f"TimestepRouter({len(self.experts)} experts, {self.stages!r})"


def _take(cond: Any, idx: torch.Tensor, batch: int) -> Any:
    """The sub-batch ``idx`` of a condition: tensors (also inside mappings, lists and tuples) are
    indexed along their leading batch dimension; other values are passed unchanged."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        if cond.ndim == 0 or cond.shape[0] != batch:
            raise ValueError(
                f"cannot split a condition of shape {tuple(cond.shape)} for a batch of {batch}: "
                "a mixed-stage batch needs a per-sample condition"
            )
        return cond[idx.to(cond.device)]
    if isinstance(cond, Mapping):
        return {key: _take(v, idx, batch) for key, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_take(v, idx, batch) for v in cond)
    return cond
