"""UniPC: the unified predictor-corrector multistep solver (data prediction, B(h) = e^h - 1).

Zhao, Bai, Rao, Zhou, Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", NeurIPS 2023 (arXiv 2302.04867), Algorithms 2-3 with the "bh2" choice of
``B(h)``. Why this one next to DPM-Solver++(2M): it is the stronger few-step solver in the
paper's and diffusers' comparisons at 5-10 steps, and its corrector (UniC) raises the order by
one at no extra cost: it reuses the denoiser evaluation at the new point that the next step
needs anyway. (DEIS, the other candidate, is an explicit multistep method of the same family as
DPM-Solver++ and would add little next to it.)

Step ``s = t_{i-1} -> t = t_i`` of order ``p`` with ``h = lambda_t - lambda_s``, the data
predictions ``m_0`` at ``s`` and ``m_k`` at earlier points ``s_k``,
``r_k = (lambda_{s_k} - lambda_s) / h`` and ``D_k = (m_k - m_0) / r_k``:

* predictor (UniP-p): ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m_0
  - alpha_t B(h) sum_k rho_k D_k`` with ``rho`` solving ``R rho = b`` over the ``p - 1``
  earlier points (``rho = 1/2`` for ``p = 2``);
* corrector (UniC-p), once the denoiser has been evaluated at the predicted ``x_t`` (giving
  ``m_t``): the same formula from ``x_s`` with one more difference ``D_t = m_t - m_0``
  (``r = 1``), ``rho`` solving the full ``p x p`` system (``rho = 1/2`` for ``p = 1``). The
  evaluation ``m_t`` is kept: the next predictor uses it with the corrected ``x_t``.

``R[j, k] = r_k^j``, ``b_j = j! phi_{j+1}(-h) / B(h)`` with ``phi_1(-h) = (e^{-h} - 1) / (-h)``
and ``phi_{j+1}(-h) = (phi_j(-h) - 1/j!) / (-h)`` (the paper's ``h phi`` recursion with
``hh = -h`` for data prediction). The last step has no corrector (no evaluation follows it).
Warm-up: step ``i`` uses at most order ``i + 1``; ``lower_order_final`` lowers the order of the
last steps to the number of steps left (as diffusers). History breaks as in
:mod:`ldm.diffusion.multistep` (after a break, the corrector across it is skipped).

Deterministic: ``generator`` is accepted for the common sampler signature and unused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ldm.diffusion.ddim import state_dtype
from ldm.diffusion.denoiser import Denoiser, StepCallback
from ldm.diffusion.multistep import SolverGrid, solver_grid
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.spacing import DEFAULT_SPACING

__all__ = ["unipc_sample", "unipc_coefficients"]

MAX_ORDER = 3


def unipc_coefficients(h: float, rks: Sequence[float], order: int) -> tuple[float, list[float]]:
    """``(B(h), rho)`` of a step of ``order`` with the earlier points' ``rks`` (``order - 1``
    of them for the predictor, plus ``1.0`` for the corrector): ``rho`` has ``len(rks)``
    entries (empty for a first-order predictor)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1  # "bh2": B(h) = e^{hh} - 1
    n = len(rks)
    if n == 0:
        return b_h, []
    if n == 1 and order in (1, 2):  # rho = 1/2: UniP-2, or UniC-1 (the paper's choice)
        return b_h, [0.5]
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    b = []
    for j in range(1, n + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = torch.tensor([[r ** (j - 1) for r in rks] for j in range(1, n + 1)], dtype=torch.float64)
    rho = torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64))
    return b_h, rho.tolist()


def _update(
    grid: SolverGrid,
    x_s: torch.Tensor,
    s: int,
    t: int,
    history: list[tuple[int, torch.Tensor]],
    order: int,
    m_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predictor (``m_t is None``) or corrector from point ``s`` to ``t``; ``history`` ends with
    ``(s, m_0)`` and holds at least ``order`` entries."""
    h = grid.h(s, t)
    m0 = history[-1][1]
    older = history[-order:-1] if order > 1 else []
    rks = [grid.h(s, k) / h for k, _ in reversed(older)]
    diffs = [(m - m0) / r for (_, m), r in zip(reversed(older), rks)]
    if m_t is not None:
        rks.append(1.0)
        diffs.append(m_t - m0)
    b_h, rho = unipc_coefficients(h, rks, order)
    x_t = (grid.sigma[t] / grid.sigma[s]) * x_s - (grid.alpha[t] * math.expm1(-h)) * m0
    if diffs:
        res = sum(r * d for r, d in zip(rho, diffs))
        x_t = x_t - (grid.alpha[t] * b_h) * res
    return x_t


def _usable(grid: SolverGrid, history: list[tuple[int, torch.Tensor]]) -> int:
    """How many of the newest history entries share the newest one's segment."""
    seg = grid.segment[history[-1][0]]
    n = 0
    for k, _ in reversed(history):
        if grid.segment[k] != seg:
            break
        n += 1
    return n


@torch.no_grad()
def unipc_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    cond: Any,
    *,
    steps: int = 20,
    order: int = 2,
    spacing: str = DEFAULT_SPACING,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    lower_order_final: bool = True,
    corrector: bool = True,
    history_breaks: Sequence[int] = (),
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x_T`` at ``t = T-1`` down to ``t = 0`` with UniPC.

    Args:
        denoiser: ``denoiser(x_t, t, cond) -> eps`` (``t`` int64 ``[B]`` on the CPU).
        schedule: the training noise schedule.
        x_T: the starting noise; the state is kept in at least float32.
        cond: passed unchanged to the denoiser.
        steps: denoiser evaluations (= steps).
        order: predictor order 1-3 (the corrector adds one); 2 is diffusers' default for
            conditional sampling.
        spacing: the timestep grid (:data:`~ldm.diffusion.spacing.SPACINGS`).
        generator: unused (deterministic solver).
        callback: ``callback(i, t, x, pred_x0)`` after every predictor step (``x`` is the
            predicted sample at the next point, before its correction).
        lower_order_final: lower the order of the last steps to the steps left.
        corrector: apply UniC (off: the plain UniP predictor).
        history_breaks: timesteps the multistep history does not cross.
    """
    del generator
    if not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    grid = solver_grid(schedule, steps, spacing, history_breaks)
    x = x_T.to(state_dtype(x_T))
    history: list[tuple[int, torch.Tensor]] = []
    x_prev = x
    last_order = 1
    for i in range(steps):
        m_i, t_int = grid.data_prediction(denoiser, x, i, cond)
        if corrector and history and grid.segment[i] == grid.segment[i - 1]:
            x = _update(grid, x_prev, i - 1, i, history, last_order, m_t=m_i)
        history = [*history[-(order - 1) :], (i, m_i)] if order > 1 else [(i, m_i)]
        this_order = min(order, steps - i) if lower_order_final else order
        this_order = min(this_order, _usable(grid, history))
        x_prev = x
        x = _update(grid, x, i, i + 1, history, this_order)
        last_order = this_order
        if callback is not None:
            callback(i, t_int, x, m_i)
    return x
