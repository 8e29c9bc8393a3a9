"""Few-step ODE solvers (DPM-Solver++(2M), UniPC), their grids and the sampler dispatch.

The accuracy checks use Gaussian data, where the optimal denoiser and the exact solution of the
probability-flow ODE are closed-form: for ``x_0 ~ N(mu, s^2)`` (per element),
``eps*(x_t, t) = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)`` and the ODE keeps
``z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2)`` constant.
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.ddim import ddim_sample
from ldm.diffusion.dpm_solver import dpmpp_2m_sample
from ldm.diffusion.samplers import SAMPLERS, check_sampler_options, run_sampler
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.spacing import SPACINGS, solver_timesteps
from ldm.diffusion.unipc import unipc_coefficients, unipc_sample
from moe_sr.router import TimestepRouter
from moe_sr.stages import StageSchedule

SCHEDULE = NoiseSchedule.linear()
AC = SCHEDULE.alphas_cumprod
MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
SD = torch.tensor([0.3, 0.05, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
SOLVERS = {"dpmpp-2m": dpmpp_2m_sample, "unipc": unipc_sample}


def gaussian_eps(x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    assert t.device.type == "cpu" and t.dtype == torch.long  # the solvers' host timesteps
    a = AC[t].view(-1, 1, 1, 1).to(x_t.dtype)
    return (1 - a).sqrt() * (x_t - a.sqrt() * MU) / (a * SD**2 + (1 - a))


def exact(x_T: torch.Tensor, t_start: int) -> torch.Tensor:
    """The ODE solution at t = 0 (alpha_bar_0, where every sampler here ends)."""
    a0, a1 = AC[0], AC[t_start]
    z = (x_T - a1.sqrt() * MU) / (a1 * SD**2 + 1 - a1).sqrt()
    return a0.sqrt() * MU + (a0 * SD**2 + 1 - a0).sqrt() * z


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b) ** 2).mean().sqrt().item()


@pytest.fixture(scope="module")
def x_T() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def ddim200(x_T) -> torch.Tensor:
    return ddim_sample(gaussian_eps, SCHEDULE, x_T, None, steps=200, eta=0.0)


# ----------------------------------------------------------------------------- grids
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 10, 25, 200, 998, 999])
def test_grids_are_strictly_decreasing_from_T_minus_1_to_0(spacing, steps):
    ts = solver_timesteps(SCHEDULE, steps, spacing)
    assert ts.dtype == torch.long and ts.numel() == steps + 1
    assert ts[0] == 999 and ts[-1] == 0
    assert (ts[1:] < ts[:-1]).all()


def test_grid_shapes():
    assert solver_timesteps(SCHEDULE, 4, "uniform").tolist() == [999, 749, 500, 250, 0]
    quad = solver_timesteps(SCHEDULE, 4, "quadratic").tolist()
    assert quad == [999, round(999 * 9 / 16), round(999 / 4), round(999 / 16), 0]
    lam = 0.5 * (AC.log() - (1 - AC).log())
    ts = solver_timesteps(SCHEDULE, 10, "logsnr")
    steps = (lam[ts[1:]] - lam[ts[:-1]]).tolist()
    assert max(steps) - min(steps) < 0.1 * sum(steps) / 10  # equal steps in lambda (rounded t)
    kar = solver_timesteps(SCHEDULE, 10, "karras")
    assert kar[-2] < solver_timesteps(SCHEDULE, 10, "uniform")[-2]  # dense near t = 0


@pytest.mark.parametrize(
    "steps, spacing, match",
    [(0, "uniform", "positive"), (1000, "uniform", "at most 999"), (5, "cosine", "spacing")],
)
def test_grid_errors(steps, spacing, match):
    with pytest.raises(ValueError, match=match):
        solver_timesteps(SCHEDULE, steps, spacing)


# ----------------------------------------------------------------------------- accuracy
def test_one_step_is_the_ddim_eta0_step(x_T):
    """A single step from T-1 to 0 is first order: DDIM with eta 0 (both solvers)."""
    t = torch.full((x_T.shape[0],), 999)
    eps = gaussian_eps(x_T, t, None)
    a1, a0 = AC[999], AC[0]
    x0 = (x_T - (1 - a1).sqrt() * eps) / a1.sqrt()
    expected = a0.sqrt() * x0 + (1 - a0).sqrt() * eps
    for solver in SOLVERS.values():
        torch.testing.assert_close(solver(gaussian_eps, SCHEDULE, x_T, None, steps=1), expected)


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("steps", [10, 15, 20])
def test_few_steps_beat_ddim_at_the_same_count(name, steps, x_T, ddim200):
    """Closer to DDIM-200 (eta 0) and to the exact solution than DDIM with as many steps."""
    ours = SOLVERS[name](gaussian_eps, SCHEDULE, x_T, None, steps=steps)
    ddim = ddim_sample(gaussian_eps, SCHEDULE, x_T, None, steps=steps, eta=0.0)
    assert rms(ours, ddim200) < 0.35 * rms(ddim, ddim200)
    assert rms(ours, exact(x_T, 999)) < 0.15 * rms(ddim, exact(x_T, 901 if steps == 10 else 999))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_error_falls_with_more_steps_on_every_spacing(name, x_T):
    ref = exact(x_T, 999)
    for spacing in SPACINGS:
        errs = [
            rms(SOLVERS[name](gaussian_eps, SCHEDULE, x_T, None, steps=n, spacing=spacing), ref)
            for n in (5, 10, 20, 40)
        ]
        assert errs == sorted(errs, reverse=True), (spacing, errs)
    fine = SOLVERS[name](gaussian_eps, SCHEDULE, x_T, None, steps=200)
    assert rms(fine, ref) < 1e-3  # converges to the exact solution


def test_unipc_coefficients():
    assert unipc_coefficients(0.3, [], 1)[1] == []
    assert unipc_coefficients(0.3, [-1.0], 2)[1] == [0.5]  # UniP-2
    assert unipc_coefficients(0.3, [1.0], 1)[1] == [0.5]  # UniC-1
    h = 0.4
    b_h, rho = unipc_coefficients(h, [-0.8, 1.0], 2)  # UniC-2: solves R rho = b
    assert b_h == pytest.approx(math.expm1(-h))
    assert sum(rho) == pytest.approx(((math.expm1(-h) / -h) - 1) / b_h)  # first row: b_1
    with pytest.raises(ValueError, match="order"):
        unipc_sample(gaussian_eps, SCHEDULE, torch.zeros(1, 3, 2, 2), None, steps=3, order=4)


def test_all_breaks_make_every_step_first_order(x_T):
    """With a history break at every grid point both solvers reduce to DDIM (eta 0) on the
    grid; without breaks the second-order result differs."""
    grid = solver_timesteps(SCHEDULE, 12).tolist()
    first = unipc_sample(gaussian_eps, SCHEDULE, x_T, None, steps=12, order=1, corrector=False)
    for solver in SOLVERS.values():
        broken = solver(gaussian_eps, SCHEDULE, x_T, None, steps=12, history_breaks=grid)
        assert torch.equal(broken, first)
        assert not torch.equal(solver(gaussian_eps, SCHEDULE, x_T, None, steps=12), first)


# ----------------------------------------------------------------------------- state and batches
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_no_state_leaks_between_images_or_calls(name, x_T):
    """Each image of a batch equals the image sampled alone; a call in between another image's
    calls changes nothing (the multistep history lives in the call)."""
    solver = SOLVERS[name]
    both = solver(gaussian_eps, SCHEDULE, x_T, None, steps=10)
    first = solver(gaussian_eps, SCHEDULE, x_T[:1], None, steps=10)
    second = solver(gaussian_eps, SCHEDULE, x_T[1:], None, steps=10)
    again = solver(gaussian_eps, SCHEDULE, x_T[:1], None, steps=10)
    assert torch.equal(torch.cat([first, second]), both)
    assert torch.equal(first, again)


def test_callback_and_float32_state():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float16)
    seen = []
    out = unipc_sample(
        gaussian_eps, SCHEDULE, x, None, steps=5, callback=lambda i, t, *_: seen.append((i, t))
    )
    assert out.dtype == torch.float32  # half inputs are upcast like ddim_sample
    assert [i for i, _ in seen] == list(range(5))
    assert [t for _, t in seen] == solver_timesteps(SCHEDULE, 5)[:-1].tolist()


# ----------------------------------------------------------------------------- routing
class _Recorder:
    def __init__(self, stage: int, stages: StageSchedule) -> None:
        self.stage, self.stages, self.ts = stage, stages, []

    def __call__(self, x_t, t, cond):
        assert t.device.type == "cpu"
        self.ts += t.tolist()
        assert all(self.stages.stage_of(v) == self.stage for v in t.tolist()), t
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("spacing", [None, "quadratic", "karras"])
@pytest.mark.parametrize("breaks", [False, True])
def test_every_evaluation_goes_to_the_expert_of_its_timestep(name, spacing, breaks):
    """Multistep updates mix evaluations across a stage boundary (or not, with breaks), but
    each evaluation itself is routed by its own timestep. The data live on the meta device:
    routing reads only the host timesteps, never the data (no device-to-host copy)."""
    if name == "ddim" and spacing not in (None, "quad"):
        spacing = "quad"
    stages = StageSchedule([0, 250, 500, 750, 1000])
    experts = [_Recorder(k, stages) for k in range(4)]
    router = TimestepRouter(experts, stages)
    x_T = torch.empty(2, 3, 4, 4, device="meta")
    cond = torch.empty(2, 3, 4, 4, device="meta")
    out = run_sampler(
        name, router, SCHEDULE, x_T, cond, steps=15, spacing=spacing, eta=0.0,
        history_breaks=stages.boundaries[1:-1] if breaks else (),
    )  # fmt: skip
    assert out.device.type == "meta"
    calls = sorted(t for e in experts for t in e.ts)
    assert len(calls) == 2 * 15  # one evaluation per step (two samples each)
    assert all(e.ts for e in experts)


def test_sampler_options_are_checked():
    check_sampler_options("ddim", 200, 1.0, "quad")
    check_sampler_options("unipc", 10, None, "karras")
    check_sampler_options("dpmpp-2m", 10, 0.0, None)
    for args, match in [
        (("euler", 10), "unknown sampler"),
        (("ddim", 0), "positive"),
        (("ddim", 10, -1.0), "eta"),
        (("ddim", 10, None, "karras"), "ddim spacing"),
        (("unipc", 10, 1.0), "deterministic"),
        (("dpmpp-2m", 10, None, "quad"), "spacing"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_sampler_options(*args)
