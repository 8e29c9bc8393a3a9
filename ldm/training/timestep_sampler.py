"""Training timestep samplers: which ``t`` each training sample is noised to.

A sampler is a callable ``sampler(n, *, device=None, generator=None) -> LongTensor[n]`` with
values in ``[0, num_timesteps)``, configured by ``{target, params}`` like every other part
(after ``sgm/modules/diffusionmodules/sigma_sampling.py`` in Stability-AI's generative-models).
LDM's default is uniform over all ``T`` timesteps; a stage expert of the sampling-space mixture of
experts (Luo et al. 2023, Sec. 3.2) samples only its stage's interval. ``moe_sr`` registers a
sampler driven by its ``StageSchedule``; :class:`RangeTimesteps` covers a plain interval.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ldm.registry import register


class TimestepSampler(Protocol):
    num_timesteps: int

    def __call__(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...


@register("range_timesteps")
class RangeTimesteps:
    """Uniform integers in ``[lo, hi)`` (a sub-range of ``[0, num_timesteps)``)."""

    def __init__(self, lo: int, hi: int, num_timesteps: int = 1000):
        if not 0 <= lo < hi <= num_timesteps:
            raise ValueError(
                f"timestep range [{lo}, {hi}) must satisfy 0 <= lo < hi <= num_timesteps "
                f"({num_timesteps})"
            )
        self.lo, self.hi, self.num_timesteps = int(lo), int(hi), int(num_timesteps)

    @property
    def interval(self) -> tuple[int, int]:
        return self.lo, self.hi

    def __call__(self, n, *, device=None, generator=None):
        # Draw on the generator's device, then move: a CPU generator works for any device.
        gen_device = generator.device if generator is not None else device
        t = torch.randint(self.lo, self.hi, (n,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lo={self.lo}, hi={self.hi}, num_timesteps={self.num_timesteps})"
        )


@register("uniform_timesteps")
class UniformTimesteps(RangeTimesteps):
    """LDM's default: uniform over all of ``[0, num_timesteps)``."""

    def __init__(self, num_timesteps: int = 1000):
        super().__init__(0, num_timesteps, num_timesteps)
