"""Checker for ``fixtures/schedule``: LDM schedule buffers, DDIM parameters, one-step goldens and
the full 200-step SS-MoE DDIM loop reproduced through the timestep router."""

from __future__ import annotations

from pathlib import Path

import torch

from fixture_checkers.common import assert_close, load_io, load_json
from ldm.diffusion.ddim import ddim_parameters, ddim_sample, ddim_step
from ldm.diffusion.schedule import LDM_BUFFER_NAMES, NoiseSchedule
from moe_sr.router import TimestepRouter
from moe_sr.stages import StageSchedule

FEATURE = "noise schedule and DDIM sampler (ldm.diffusion, issue 3)"

ATOL = 1e-5  # README: schedule/DDIM tensors atol 1e-5, relative for pred_x0


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, name: str, tol=ATOL):
    """Max abs error relative to max |expected| (pred_x0 at t=996 reaches ~180)."""
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.to(expected.dtype) - expected).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol:g} x {scale:.3g}"


def stand_in_expert(k: int):
    """The fixture's stand-in eps model of expert k."""

    def expert(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return (0.5 + 0.1 * k) * x + 0.1 * (t.to(torch.float32) / 1000)[:, None, None, None] * cond

    return expert


def check(fixture_dir: Path) -> None:
    io = load_io(fixture_dir)
    meta = load_json(fixture_dir, "meta.json")
    schedule = NoiseSchedule.linear(1000, 0.0015, 0.0155)

    # the 12 LDM buffers (+ the non-persistent lvlb weights)
    buffers = schedule.ldm_buffers()
    assert tuple(buffers) == LDM_BUFFER_NAMES
    for name, value in buffers.items():
        assert value.dtype == torch.float32, name
        assert_close(value, io[name], name, atol=ATOL, rtol=0)
    assert_close(
        schedule.ldm_lvlb_weights(),
        io["lvlb_weights_nonpersistent"],
        "lvlb_weights",
        atol=ATOL,
        rtol=1e-5,
    )

    # DDIM parameters (200 steps, eta 1)
    params = ddim_parameters(schedule, steps=200, eta=1.0)
    assert_close(params.timesteps, io["ddim_timesteps"], "ddim_timesteps")
    assert_close(params.alphas, io["ddim_alphas"], "ddim_alphas", atol=ATOL, rtol=0)
    assert_close(
        params.alphas_prev, io["ddim_alphas_prev_float64"], "ddim_alphas_prev", atol=1e-12, rtol=0
    )
    assert_close(
        params.alphas_prev.float(),
        io["ddim_alphas_prev"],
        "ddim_alphas_prev f32",
        atol=ATOL,
        rtol=0,
    )
    assert float(params.alphas_prev[0]) == float(io["ddim_alphas_prev_float64"][0]) != 1.0
    assert_close(params.sigmas, io["ddim_sigmas_float64"], "ddim_sigmas", atol=1e-12, rtol=0)
    assert_close(params.sigmas.float(), io["ddim_sigmas"], "ddim_sigmas f32", atol=ATOL, rtol=0)
    assert_close(
        params.sqrt_one_minus_alphas,
        io["ddim_sqrt_one_minus_alphas"],
        "ddim_sqrt_one_minus_alphas",
        atol=ATOL,
        rtol=0,
    )

    # one-step goldens
    stages = StageSchedule([0, 250, 500, 750, 1000])
    for index_str, info in meta["single_steps"].items():
        n = int(index_str)
        t = io[f"step{n}_t"]
        assert (t == info["t"]).all() and int(params.timesteps[n]) == info["t"], f"step {n}: t"
        assert (stages.stage_of(t) == info["expert"]).all(), f"step {n}: expert"
        x_prev, pred_x0 = ddim_step(
            params, n, io[f"step{n}_x_t"], io[f"step{n}_eps"], io[f"step{n}_noise"]
        )
        assert_close(x_prev, io[f"step{n}_x_prev"], f"step{n}_x_prev", atol=ATOL, rtol=0)
        assert_close_relative(pred_x0, io[f"step{n}_pred_x0"], f"step{n}_pred_x0")

    # the full 200-step loop through the router of 4 stand-in experts, recorded noise
    calls: list[tuple[int, int]] = []
    experts = []
    for k in range(4):
        f = stand_in_expert(k)

        def logged(x, t, cond, k=k, f=f):
            calls.append((int(t[0]), k))
            return f(x, t, cond)

        experts.append(logged)
    switches: list[tuple] = []
    router = TimestepRouter(experts, stages, on_switch=lambda a, b: switches.append((a, b)))
    noise = io["loop_noise"]
    x_traj, pred_traj = [], []

    def callback(i, t, x, pred_x0):
        x_traj.append(x.clone())
        pred_traj.append(pred_x0.clone())

    x_final = ddim_sample(
        router,
        schedule,
        io["loop_x_T"],
        io["loop_cond"],
        steps=200,
        eta=1.0,
        callback=callback,
        noise_fn=lambda i, shape: noise[i],
    )
    assert len(x_traj) == 200
    assert_close(torch.stack(x_traj), io["loop_x_traj"], "loop_x_traj", atol=ATOL, rtol=0)
    for i in range(200):
        assert_close_relative(pred_traj[i], io["loop_pred_x0_traj"][i], f"loop_pred_x0_traj[{i}]")
    assert_close(x_final, io["loop_x_final"], "loop_x_final", atol=ATOL, rtol=0)
    assert switches == [(None, 3), (3, 2), (2, 1), (1, 0)], switches
    assert [k for _, k in calls] == [3] * 50 + [2] * 50 + [1] * 50 + [0] * 50
