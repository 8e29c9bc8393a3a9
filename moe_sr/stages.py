"""Sampling-space stages: which stage expert owns which timesteps (paper Sec. 3.2, SS-MoE).

The timestep axis ``[0, T)`` is cut into consecutive intervals ``[b_k, b_{k+1})``; stage ``k``
(stage expert ``k``) is trained only on timesteps of its interval and serves them at inference. The
release uses four equal stages of ``T = 1000``: ``[0, 250, 500, 750, 1000]``, routed there with
``int(t // (T / 4))``. One :class:`StageSchedule` object is used by training and by inference,
so the boundary table exists once.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from ldm.registry import register

__all__ = ["StageSchedule", "StageTimestepSampler"]


class StageSchedule:
    """Consecutive timestep intervals ``[boundaries[k], boundaries[k+1])``, one per stage.

    Args:
        boundaries: ints starting at 0, strictly increasing, ending at ``T`` (the number of
            training timesteps); ``len(boundaries) - 1`` stages.
    """

    def __init__(self, boundaries: Sequence[int]):
        b = list(boundaries)
        if len(b) < 2:
            raise ValueError(
                f"stage boundaries need at least two entries [0, T], got {b}; e.g. "
                "[0, 250, 500, 750, 1000] for four stages of T=1000"
            )
        b = [_as_int(v, f"stage boundaries must be ints, got {v!r} in {b}") for v in b]
        if b[0] != 0:
            raise ValueError(f"stage boundaries must start at 0, got {b}")
        bad = [(b[i], b[i + 1]) for i in range(len(b) - 1) if b[i + 1] <= b[i]]
        if bad:
            raise ValueError(
                f"stage boundaries must strictly increase (every stage needs at least one "
                f"timestep), got {b}: {bad[0][0]} is followed by {bad[0][1]}"
            )
        self._boundaries = tuple(b)

    @classmethod
    def uniform(cls, num_stages: int, num_timesteps: int = 1000) -> StageSchedule:
        """``num_stages`` near-equal stages of ``[0, num_timesteps)``.

        Boundary ``k`` is ``ceil(k T / n)``: the same split as the release's
        ``int(t // (T / n))`` (exactly ``[0, 250, 500, 750, 1000]`` for 4 stages of 1000).
        """
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int):
            raise ValueError(f"num_timesteps must be an int, got {num_timesteps!r}")
        if num_timesteps < num_stages:
            raise ValueError(
                f"cannot split {num_timesteps} timesteps into {num_stages} non-empty stages"
            )
        return cls([-((-k * num_timesteps) // num_stages) for k in range(num_stages + 1)])

    #: alias of :meth:`uniform`
    from_num_stages = uniform

    # ------------------------------------------------------------------ properties
    @property
    def boundaries(self) -> tuple[int, ...]:
        return self._boundaries

    @property
    def num_stages(self) -> int:
        return len(self._boundaries) - 1

    @property
    def num_timesteps(self) -> int:
        return self._boundaries[-1]

    def __len__(self) -> int:
        return self.num_stages

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StageSchedule) and other._boundaries == self._boundaries

    def __hash__(self) -> int:
        return hash(self._boundaries)

    def __repr__(self) -> str:
        return f"StageSchedule({list(self._boundaries)})"

    # ------------------------------------------------------------------ queries
    def _check_stage(self, k: int) -> int:
        k = _as_int(k, f"stage index must be an int, got {k!r}")
        if not 0 <= k < self.num_stages:
            raise IndexError(f"stage {k} out of range: this schedule has {self.num_stages} stages")
        return k

    def interval(self, k: int) -> tuple[int, int]:
        """``(lo, hi)``: stage ``k`` owns the timesteps ``lo <= t < hi``."""
        k = self._check_stage(k)
        return self._boundaries[k], self._boundaries[k + 1]

    def stage_of(self, t: int | torch.Tensor) -> int | torch.Tensor:
        """The stage owning timestep ``t``: an int for an int, a LongTensor (same shape/device)
        for a tensor. Timesteps outside ``[0, T)`` are an error."""
        T = self.num_timesteps
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"timesteps must be integers, got a {t.dtype} tensor")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
                raise ValueError(
                    f"timesteps must lie in [0, {T}), got min {int(t.min())}, max {int(t.max())}"
                )
            inner = torch.tensor(self._boundaries[1:-1], dtype=t.dtype, device=t.device)
            return torch.bucketize(t, inner, right=True)
        t = _as_int(t, f"timestep must be an int or an integer tensor, got {t!r}")
        if not 0 <= t < T:
            raise ValueError(f"timestep {t} outside [0, {T})")
        for k in range(self.num_stages):
            if t < self._boundaries[k + 1]:
                return k
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ training
    def sample_timesteps(
        self,
        k: int,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``n`` training timesteps of stage ``k``, uniform on ``[lo, hi)``, int64.

        Drawn on the generator's device (CPU when none) and moved to ``device``.
        """
        lo, hi = self.interval(k)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        draw_device = generator.device if generator is not None else (device or "cpu")
        t = torch.randint(lo, hi, (n,), generator=generator, device=draw_device, dtype=torch.long)
        return t if device is None else t.to(device)

    def sampler(self, k: int) -> StageTimestepSampler:
        """A training timestep sampler restricted to stage ``k``."""
        return StageTimestepSampler(k, self)


def _as_int(v: object, message: str) -> int:
    """``operator.index(v)`` (ints, numpy ints) with a ``TypeError(message)`` otherwise."""
    if isinstance(v, bool):
        raise TypeError(message)
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(message) from None


@register("stage_timesteps")
class StageTimestepSampler:
    """Training timestep sampler of one stage: ``sampler(n, *, device=None, generator=None)``.

    Uniform over the interval of stage ``stage`` (the released per-stage training: each stage expert
    sees only its own timesteps); follows ``ldm.training.timestep_sampler``'s protocol and is
    registered as ``stage_timesteps`` for configs::

        timestep_sampler: {target: stage_timesteps, params: {stage: 2}}

    Args:
        stage: the stage index ``k``.
        boundaries: the stage boundaries (a list of ints or a :class:`StageSchedule`); default
            ``num_stages`` equal stages of ``num_timesteps``.
        num_stages: number of equal stages when ``boundaries`` is not given (default 4, as
            released).
        num_timesteps: ``T`` (default 1000; with ``boundaries`` only checked against them).
    """

    def __init__(
        self,
        stage: int,
        boundaries: Sequence[int] | StageSchedule | None = None,
        num_stages: int | None = None,
        num_timesteps: int | None = None,
    ):
        if boundaries is not None:
            if num_stages is not None:
                raise ValueError("give either boundaries or num_stages, not both")
            stages = (
                boundaries if isinstance(boundaries, StageSchedule) else StageSchedule(boundaries)
            )
            if num_timesteps is not None and stages.num_timesteps != num_timesteps:
                raise ValueError(
                    f"boundaries end at {stages.num_timesteps} but num_timesteps={num_timesteps}"
                )
        else:
            stages = StageSchedule.uniform(
                4 if num_stages is None else num_stages,
                1000 if num_timesteps is None else num_timesteps,
            )
        self.stages = stages
        self.stage = stages._check_stage(stage)
        self.lo, self.hi = stages.interval(self.stage)

    @property
    def num_timesteps(self) -> int:
        return self.stages.num_timesteps

    @property
    def interval(self) -> tuple[int, int]:
        return self.lo, self.hi

    def __call__(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return self.stages.sample_timesteps(self.stage, n, generator=generator, device=device)

    def __repr__(self) -> str:
        return (
            f"StageTimestepSampler(stage={self.stage}, interval=[{self.lo}, {self.hi}), "
            f"stages={self.stages!r})"
        )
