"""Expert weight averaging (EWA) for the FFN-MoE layers of a UNet.

After each optimizer step, every FFN expert of every FFN-MoE layer is pulled towards the others
(the official ``LatentDiffusionExtremeSREWA.apply_ewa``, ``sr_8x_inf/ldm/models/diffusion/ddpm.py``):

    p_k <- (1 - beta) * p_k + beta / (N - 1) * sum_{j != k} p_j,
    beta = min(beta_max * step / ramp_steps, beta_max)      (official: 0.3 over 10k steps)

for the weight and bias of both linear layers of each FFN expert (all of an FFN expert's
parameters), with ``step`` the optimizer steps done before this one (0 at the first step, as the
official ``self.global_step``).

Unlike the release, which replaces each parameter by a new ``nn.Parameter`` (so the optimizer,
holding the old objects, stops updating the FFN experts after the first step), the update here is
in place on the same parameter objects (DESIGN.md section 5.3).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def ffn_moe_layers(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """``(name, moe_blocks)`` for every module holding a ``moe_blocks`` list of >= 2 FFN experts."""
    out = []
    for name, module in model.named_modules():
        blocks = getattr(module, "moe_blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) >= 2:
            out.append((name, blocks))
    return out


def ewa_coefficient(step: int, beta_max: float = 0.3, ramp_steps: int = 10_000) -> float:
    """Linear ramp ``0 -> beta_max`` over ``ramp_steps`` steps, constant afterwards."""
    if ramp_steps <= 0:
        return float(beta_max)
    return min(beta_max * step / ramp_steps, beta_max)


@torch.no_grad()
def apply_ewa(experts: nn.ModuleList, beta: float) -> None:
    """One EWA update of the FFN experts of one FFN-MoE layer, in place."""
    n = len(experts)
    if beta == 0.0 or n < 2:
        return
    per_expert = [dict(e.named_parameters()) for e in experts]
    names = list(per_expert[0])
    for i, params in enumerate(per_expert[1:], start=1):
        if list(params) != names:
            raise ValueError(
                f"FFN expert {i} has parameters {list(params)} but FFN expert 0 has {names}: "
                "EWA needs identically built FFN experts"
            )
    for pname in names:
        group = [params[pname] for params in per_expert]
        stacked = torch.stack([p.detach() for p in group])  # [N, ...] snapshot before the update
        total = stacked.sum(dim=0)
        for k, p in enumerate(group):
            mean_others = (total - stacked[k]) / (n - 1)
            p.mul_(1.0 - beta).add_(mean_others, alpha=beta)


class ExpertWeightAveraging:
    """Applies :func:`apply_ewa` to every FFN-MoE layer of ``model`` (call after each step)."""

    def __init__(self, beta_max: float = 0.3, ramp_steps: int = 10_000):
        if not 0.0 <= beta_max <= 1.0:
            raise ValueError(f"EWA beta_max must lie in [0, 1], got {beta_max}")
        self.beta_max = float(beta_max)
        self.ramp_steps = int(ramp_steps)

    def __call__(self, model: nn.Module, step: int) -> float:
        layers = ffn_moe_layers(model)
        if not layers:
            raise ValueError(
                "EWA is configured but the model has no FFN-MoE layer (no module with a "
                "'moe_blocks' list): build the UNet with ffn_moe_experts > 1 or drop 'ewa'"
            )
        beta = ewa_coefficient(step, self.beta_max, self.ramp_steps)
        for _, blocks in layers:
            apply_ewa(blocks, beta)
        return beta

    def __repr__(self) -> str:
        return f"ExpertWeightAveraging(beta_max={self.beta_max}, ramp_steps={self.ramp_steps})"
