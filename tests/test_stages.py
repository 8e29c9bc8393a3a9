"""StageSchedule, the stage timestep sampler and the TimestepRouter (moe_sr)."""

from __future__ import annotations

import pytest
import torch

from ldm.config import instantiate
from ldm.diffusion.ddim import ddim_sample
from ldm.diffusion.ddpm import ddpm_sample
from ldm.diffusion.schedule import NoiseSchedule
from moe_sr.router import TimestepRouter
from moe_sr.stages import StageSchedule, StageTimestepSampler

RELEASED = [0, 250, 500, 750, 1000]


# ---------------------------------------------------------------------------- StageSchedule
def test_released_stages():
    s = StageSchedule(RELEASED)
    assert s == StageSchedule.uniform(4, 1000) == StageSchedule.from_num_stages(4)
    assert s.num_stages == len(s) == 4 and s.num_timesteps == 1000
    assert [s.interval(k) for k in range(4)] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    for t in (0, 1, 249, 250, 251, 499, 500, 749, 750, 999):
        assert s.stage_of(t) == int(t // (1000 / 4))  # the release's rule
    t = torch.arange(1000)
    assert torch.equal(s.stage_of(t), t // 250)
    assert s.stage_of(t.reshape(10, 100)).shape == (10, 100)


@pytest.mark.parametrize("n, T", [(1, 1000), (3, 1000), (5, 100), (7, 50), (2, 2)])
def test_uniform_matches_official_rule_for_any_split(n, T):
    s = StageSchedule.uniform(n, T)
    assert s.num_stages == n and s.num_timesteps == T
    t = torch.arange(T)
    official = torch.tensor([int(v // (T / n)) for v in range(T)])
    assert torch.equal(s.stage_of(t), official)


def test_uneven_custom_stages():
    s = StageSchedule([0, 10, 400, 401, 1200])
    assert s.num_stages == 4 and s.num_timesteps == 1200
    assert [s.stage_of(t) for t in (0, 9, 10, 399, 400, 401, 1199)] == [0, 0, 1, 1, 2, 3, 3]


@pytest.mark.parametrize(
    "boundaries, error, match",
    [
        ([0], ValueError, "at least two"),
        ([1, 500, 1000], ValueError, "start at 0"),
        ([0, 500, 500, 1000], ValueError, "strictly increase"),
        ([0, 600, 500, 1000], ValueError, "600 is followed by 500"),
        ([0, 2.5, 1000], TypeError, "must be ints"),
        ([0, True, 1000], TypeError, "must be ints"),
    ],
)
def test_bad_boundaries(boundaries, error, match):
    with pytest.raises(error, match=match):
        StageSchedule(boundaries)


def test_query_errors():
    s = StageSchedule(RELEASED)
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        s.stage_of(1000)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        s.stage_of(torch.tensor([3, -1]))
    with pytest.raises(TypeError, match="integers"):
        s.stage_of(torch.tensor([1.0]))
    with pytest.raises(IndexError, match="4 stages"):
        s.interval(4)
    with pytest.raises(ValueError, match="non-empty"):
        StageSchedule.uniform(5, 3)
    with pytest.raises(ValueError, match="positive"):
        StageSchedule.uniform(0)


# ---------------------------------------------------------------------------- training sampler
@pytest.mark.parametrize("boundaries", [RELEASED, [0, 1, 2, 700, 1000]])
def test_training_sampler_stays_in_range(boundaries):
    s = StageSchedule(boundaries)
    for k in range(s.num_stages):
        lo, hi = s.interval(k)
        t = s.sample_timesteps(k, 4000, generator=torch.Generator().manual_seed(k))
        assert t.dtype == torch.long and t.shape == (4000,)
        assert int(t.min()) == lo and int(t.max()) == hi - 1  # fills the interval, nothing else
        assert (s.stage_of(t) == k).all()
        sampler = s.sampler(k)
        assert isinstance(sampler, StageTimestepSampler) and sampler.interval == (lo, hi)
        assert (s.stage_of(sampler(100)) == k).all()


def test_training_sampler_seeded_and_registered():
    a = StageTimestepSampler(2)(50, generator=torch.Generator().manual_seed(0))
    b = StageTimestepSampler(2)(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and ((a >= 500) & (a < 750)).all()
    built = instantiate({"target": "stage_timesteps", "params": {"stage": 1, "num_stages": 2}})
    assert built.interval == (500, 1000) and built.num_timesteps == 1000
    built = instantiate(
        {"target": "stage_timesteps", "params": {"stage": 0, "boundaries": [0, 10, 100]}}
    )
    assert built.interval == (0, 10) and built.num_timesteps == 100
    with pytest.raises(ValueError, match="not both"):
        StageTimestepSampler(0, boundaries=[0, 5, 10], num_stages=2)
    with pytest.raises(ValueError, match="end at 10"):
        StageTimestepSampler(0, boundaries=[0, 5, 10], num_timesteps=1000)
    with pytest.raises(IndexError, match="4 stages"):
        StageTimestepSampler(4)


# ---------------------------------------------------------------------------- router
def affine_expert(k: float):
    def expert(x, t, cond):
        return (0.5 + 0.1 * k) * x + 0.1 * (t.float() / 1000).reshape(-1, 1, 1, 1) * cond

    return expert


def test_router_over_identical_experts_equals_one_expert():
    schedule = NoiseSchedule.linear()
    one = affine_expert(1)
    router = TimestepRouter([one] * 4, StageSchedule(RELEASED))
    g = torch.Generator().manual_seed(0)
    x_T, cond = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for sample in (
        lambda d, gen: ddim_sample(d, schedule, x_T, cond, steps=20, generator=gen),
        lambda d, gen: ddpm_sample(d, schedule, x_T, cond, steps=20, generator=gen),
    ):
        a = sample(one, torch.Generator().manual_seed(5))
        b = sample(router, torch.Generator().manual_seed(5))
        assert torch.equal(a, b)


def test_router_mixed_batch_routes_per_sample():
    stages = StageSchedule(RELEASED)
    calls = []

    def make(k):
        def expert(x, t, cond):
            calls.append((k, t.tolist()))
            assert (stages.stage_of(t) == k).all()
            return affine_expert(k)(x, t, cond)

        return expert

    router = TimestepRouter([make(k) for k in range(4)], stages)
    t = torch.tensor([999, 0, 260, 998, 1, 740])
    x, cond = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    out = router(x, t, cond)
    expected = torch.cat(
        [
            affine_expert(int(t[i]) // 250)(x[i : i + 1], t[i : i + 1], cond[i : i + 1])
            for i in range(6)
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert sorted(k for k, _ in calls) == [0, 1, 2, 3]  # each expert called once
    assert dict(calls) == {0: [0, 1], 1: [260], 2: [740], 3: [999, 998]}
    # conditions in mappings / tuples are split alongside; None passes through
    seen = {}

    def dict_expert(x, t, cond):
        seen[int(t[0]) // 250] = (cond["lr"].shape[0], cond["tag"], cond["pair"][0].shape[0])
        return x

    router = TimestepRouter([dict_expert] * 4, stages)
    cond = {"lr": torch.randn(6, 1), "tag": "x", "pair": (torch.randn(6), None)}
    router(x, t, cond)
    assert seen == {0: (2, "x", 2), 1: (1, "x", 1), 2: (1, "x", 1), 3: (2, "x", 2)}
    with pytest.raises(ValueError, match="per-sample condition"):
        TimestepRouter([make(k) for k in range(4)], stages)(x, t, torch.randn(1, 3, 2, 2))


def test_router_switch_hook_and_expert_for():
    stages = StageSchedule(RELEASED)
    experts = [affine_expert(k) for k in range(4)]
    switches = []
    router = TimestepRouter(experts, stages, on_switch=lambda a, b: switches.append((a, b)))
    ddim_sample(
        router, NoiseSchedule.linear(), torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), steps=20
    )
    assert switches == [(None, 3), (3, 2), (2, 1), (1, 0)]  # 3 moves per image + the first load
    router.reset()
    assert router.current_stage is None
    assert router.expert_for(0) is experts[0] and router.expert_for(999) is experts[3]
    assert router.expert_for(torch.tensor([500, 749])) is experts[2]
    with pytest.raises(ValueError, match="span stages"):
        router.expert_for(torch.tensor([0, 999]))
    # a mixed batch starts with the current expert (no needless switch)
    switches.clear()
    router(torch.zeros(2, 3, 2, 2), torch.tensor([10, 900]), torch.zeros(2, 3, 2, 2))
    router(torch.zeros(2, 3, 2, 2), torch.tensor([20, 950]), torch.zeros(2, 3, 2, 2))
    # second call starts with expert 3 (current): 3 switches, not 4 with a fixed order
    assert switches == [(None, 0), (0, 3), (3, 0)]


def test_router_errors():
    stages = StageSchedule(RELEASED)
    with pytest.raises(ValueError, match="3 experts given for 4 stages"):
        TimestepRouter([affine_expert(0)] * 3, stages)
    with pytest.raises(TypeError, match="StageSchedule"):
        TimestepRouter([affine_expert(0)] * 4, RELEASED)
    with pytest.raises(TypeError, match="not callable"):
        TimestepRouter([affine_expert(0)] * 3 + [None], stages)
    router = TimestepRouter([affine_expert(0)] * 4, stages)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        router(torch.zeros(2, 1, 1, 1), torch.tensor([1, 2, 3]), None)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        router(torch.zeros(1, 1, 1, 1), torch.tensor([1000]), torch.zeros(1, 1, 1, 1))
