"""Checker for ``fixtures/stage_routing``: the expert serving each of the 200 DDIM timesteps of
the released setting (4 experts, T = 1000), through ``StageSchedule`` and ``TimestepRouter``."""

from __future__ import annotations

from pathlib import Path

import torch

from fixture_checkers.common import assert_close, load_io, load_json
from ldm.diffusion.ddim import ddim_timesteps
from moe_sr.router import TimestepRouter
from moe_sr.stages import StageSchedule

FEATURE = "stage schedule and timestep router (moe_sr, issue 5)"


def check(fixture_dir: Path) -> None:
    table = load_json(fixture_dir, "stage_routing.json")
    io = load_io(fixture_dir)
    n_experts, steps = table["n_experts"], table["ddim_steps"]
    expected = [tuple(p) for p in table["pairs_timestep_expert"]]
    assert len(expected) == steps

    stages = StageSchedule.uniform(n_experts, 1000)
    assert stages.boundaries == (0, 250, 500, 750, 1000)
    sampling_order = ddim_timesteps(1000, steps).flip(0)

    # integer API
    pairs = [(int(t), stages.stage_of(int(t))) for t in sampling_order]
    assert pairs == expected, "routing table differs from the official one"
    # tensor API
    assert_close(sampling_order, io["timestep"], "timestep")
    assert_close(stages.stage_of(sampling_order), io["expert"], "expert")

    # through the router: which expert actually gets called
    called: list[int] = []
    experts = [(lambda x, t, c, k=k: called.append(k) or x) for k in range(n_experts)]
    router = TimestepRouter(experts, stages)
    x = torch.zeros(1, 1)
    for t in sampling_order:
        router(x, t.reshape(1), None)
        assert router.expert_for(int(t)) is experts[called[-1]]
    assert called == [k for _, k in expected]
    # one-per-sample routing of all 200 timesteps as one mixed batch
    seen: dict[int, list[int]] = {}
    experts = [
        (lambda x, t, c, k=k: seen.setdefault(k, []).extend(t.tolist()) or x * 0 + k)
        for k in range(n_experts)
    ]
    out = TimestepRouter(experts, stages)(torch.zeros(steps, 1), sampling_order, None)
    assert out.squeeze(1).long().tolist() == [k for _, k in expected]
    for k, ts in seen.items():
        assert all(stages.stage_of(t) == k for t in ts)
