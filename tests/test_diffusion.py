"""Noise schedule, DDIM and DDPM samplers (ldm.diffusion)."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.ddim import ddim_parameters, ddim_sample, ddim_step, ddim_timesteps, draw_noise
from ldm.diffusion.ddpm import ddpm_coefficients, ddpm_sample, ddpm_timesteps
from ldm.diffusion.denoiser import ConcatDenoiser, Denoiser
from ldm.diffusion.loss import diffusion_loss
from ldm.diffusion.schedule import LDM_BUFFER_NAMES, NoiseSchedule

SHAPE = (2, 3, 4, 4)


def oracle(schedule: NoiseSchedule, x0: torch.Tensor):
    """A denoiser that returns the true eps for the known x0."""

    def denoiser(x_t, t, cond):
        a = schedule.alphas_cumprod[t.cpu()].to(x_t.dtype).reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return denoiser


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear()


def test_linear_schedule_formula(schedule):
    assert schedule.num_timesteps == 1000
    expected = torch.linspace(0.0015**0.5, 0.0155**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.equal(schedule.betas, expected)
    assert schedule.betas.dtype == torch.float64
    assert schedule.alphas_cumprod_prev[0] == 1.0
    assert torch.equal(schedule.alphas_cumprod_prev[1:], schedule.alphas_cumprod[:-1])
    buffers = schedule.ldm_buffers()
    assert tuple(buffers) == LDM_BUFFER_NAMES and len(buffers) == 12
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for v in buffers.values())
    small = NoiseSchedule.linear(10, 1e-4, 2e-2)
    assert small.num_timesteps == 10 and math.isclose(small.betas[-1].item(), 2e-2)


def test_cosine_schedule():
    s = NoiseSchedule.cosine(100)
    assert s.num_timesteps == 100
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()


@pytest.mark.parametrize(
    "betas, match",
    [
        ([], "non-empty"),
        ([0.1, 1.0], "strictly between"),
        ([[0.1]], "1-D"),
        ([0.0, 0.1], "strictly"),
    ],
)
def test_schedule_rejects_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(betas)


def test_conversions_round_trip(schedule):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 999])
    x_t = schedule.q_sample(x0, t, noise)
    a = schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, t, x0), noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.pred_x0_from_eps(x_t, t, noise), x0, atol=2e-4, rtol=1e-4)
    v = schedule.v_from_eps(x0, t, noise)
    torch.testing.assert_close(schedule.pred_x0_from_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(schedule.eps_from_v(x_t, t, v), noise, atol=1e-5, rtol=1e-5)
    # float64 in, float64 out, tighter
    x64 = schedule.pred_x0_from_eps(x_t.double(), t, noise.double())
    assert x64.dtype == torch.float64
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        schedule.q_sample(x0, torch.tensor([0, 1000]), noise)
    with pytest.raises(TypeError, match="integer"):
        schedule.q_sample(x0, torch.tensor([0.0, 1.0]), noise)


def test_ddim_timesteps_ldm_uniform():
    ts = ddim_timesteps(1000, 200)
    assert ts.dtype == torch.int64 and ts.tolist() == list(range(1, 1000, 5))
    assert ddim_timesteps(1000, 50).tolist() == list(range(1, 1000, 20))
    assert ddim_timesteps(100, 10).tolist() == list(range(1, 100, 10))
    assert ddim_timesteps(1000, 999).tolist() == list(range(1, 1000))
    with pytest.raises(ValueError, match="at most 999"):
        ddim_timesteps(1000, 1000)
    # steps not dividing T: LDM's grid would be 1, 334, 667, 1000 (out of range) -> exact count
    assert ddim_timesteps(1000, 3).tolist() == [1, 334, 667]
    assert ddim_timesteps(1000, 30).numel() == 30  # LDM: 31 timesteps
    assert ddim_timesteps(1000, 7, "quad").numel() == 7
    with pytest.raises(ValueError, match="positive int"):
        ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="discretization"):
        ddim_timesteps(1000, 10, "bogus")


def test_ddim_parameters_ldm_quirks(schedule):
    p = ddim_parameters(schedule, 200, eta=1.0)
    assert len(p) == 200
    assert p.alphas.dtype == torch.float32 and p.sigmas.dtype == torch.float64
    assert p.alphas_prev[0] == schedule.alphas_cumprod.float()[0] != 1.0  # not 1.0, as LDM
    assert torch.equal(p.alphas_prev[1:], p.alphas[:-1].double())
    assert (ddim_parameters(schedule, 200, eta=0.0).sigmas == 0).all()
    with pytest.raises(ValueError, match="eta"):
        ddim_parameters(schedule, 200, eta=-1.0)


def test_ddim_step_needs_noise_when_stochastic(schedule):
    p = ddim_parameters(schedule, 10, eta=1.0)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="no noise"):
        ddim_step(p, 3, x, x)


def test_deterministic_ddim_recovers_x0(schedule):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(SHAPE, generator=g)
    eps0 = torch.randn(SHAPE, generator=g)
    t_top = int(ddim_timesteps(1000, 50)[-1])
    x_T = schedule.q_sample(x0, t_top, eps0)
    preds = []
    out = ddim_sample(
        oracle(schedule, x0),
        schedule,
        x_T,
        None,
        steps=50,
        eta=0.0,
        callback=lambda i, t, x, p: preds.append(p),
    )
    for p in preds:
        torch.testing.assert_close(p, x0, atol=1e-4, rtol=1e-4)
    # LDM ends at alpha_bar_0 (alphas_prev[0] = alphas_cumprod[0]): x = q_sample(x0, 0, eps0)
    torch.testing.assert_close(out, schedule.q_sample(x0, 0, eps0), atol=1e-5, rtol=1e-5)
    assert (out - x0).abs().max() < 0.25


def test_ddpm_with_oracle_recovers_x0(schedule):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(SHAPE, generator=g)
    x_T = torch.randn(SHAPE, generator=g)
    for steps in (None, 25):
        out = ddpm_sample(oracle(schedule, x0), schedule, x_T, None, steps=steps, generator=g)
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_ddpm_full_chain_uses_ldm_buffers(schedule):
    coef = ddpm_coefficients(schedule, ddpm_timesteps(1000))
    buf = schedule.ldm_buffers()
    for name in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_log_variance_clipped"):
        assert torch.equal(coef[name].float(), buf[name]), name
    ts = ddpm_timesteps(1000, 4)
    assert ts.tolist() == [0, 333, 666, 999]
    assert ddpm_timesteps(1000, 1).tolist() == [999]
    with pytest.raises(ValueError, match="strictly increasing"):
        ddpm_sample(lambda x, t, c: x, schedule, torch.zeros(1, 1), None, timesteps=[5, 5])
    with pytest.raises(ValueError, match="either"):
        ddpm_sample(lambda x, t, c: x, schedule, torch.zeros(1, 1), None, steps=3, timesteps=[5])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_fixed_generator_reproduces_bit_for_bit(schedule, sampler):
    def denoiser(x, t, cond):
        return 0.3 * x + cond * (t.float() / 1000).reshape(-1, 1, 1, 1)

    cond = torch.randn(SHAPE)
    x_T = torch.randn(SHAPE)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        if sampler == "ddim":
            return ddim_sample(denoiser, schedule, x_T, cond, steps=20, eta=1.0, generator=g)
        return ddpm_sample(denoiser, schedule, x_T, cond, steps=20, generator=g)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_callback_and_timesteps_seen(schedule, sampler):
    seen_t, calls = [], []

    def denoiser(x, t, cond):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        seen_t.append(int(t[0]))
        return torch.zeros_like(x)

    def callback(i, t, x, pred_x0):
        calls.append((i, t))
        assert x.shape == pred_x0.shape == SHAPE

    x_T = torch.randn(SHAPE)
    if sampler == "ddim":
        ddim_sample(denoiser, schedule, x_T, None, steps=10, callback=callback)
        expected = list(range(901, 0, -100))
    else:
        ddpm_sample(denoiser, schedule, x_T, None, steps=10, callback=callback)
        expected = ddpm_timesteps(1000, 10).flip(0).tolist()
    assert seen_t == expected  # original training timesteps, noisiest first
    assert calls == list(enumerate(expected))


def test_noise_fn_replaces_draws(schedule):
    x_T = torch.randn(SHAPE)
    asked = []

    def noise_fn(i, shape):
        asked.append(i)
        return torch.zeros(shape)

    out = ddim_sample(
        lambda x, t, c: torch.zeros_like(x), schedule, x_T, None, steps=5, noise_fn=noise_fn
    )
    assert asked == [0, 1, 2, 3, 4]
    ref = ddim_sample(lambda x, t, c: torch.zeros_like(x), schedule, x_T, None, steps=5, eta=0.0)
    p = ddim_parameters(schedule, 5, eta=1.0)
    # with zero noise and zero eps the state only rescales: x_T * sqrt(a_prev[0] / a_T)
    torch.testing.assert_close(out, x_T * (p.alphas_prev[0] / p.alphas[-1]).sqrt().float())
    torch.testing.assert_close(ref, out)


def test_half_input_keeps_float32_state(schedule):
    dtypes = []

    def denoiser(x, t, c):
        dtypes.append(x.dtype)
        return torch.zeros_like(x)

    out = ddim_sample(denoiser, schedule, torch.randn(SHAPE).half(), None, steps=3, eta=0.0)
    assert out.dtype == torch.float32 and set(dtypes) == {torch.float32}
    with pytest.raises(TypeError, match="floating"):
        ddim_sample(denoiser, schedule, torch.zeros(SHAPE, dtype=torch.long), None, steps=3)


def test_draw_noise_on_generator_device():
    like = torch.zeros(2, dtype=torch.float64)
    a = draw_noise((2,), like, torch.Generator().manual_seed(0))
    b = torch.randn((2,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(a, b) and a.dtype == torch.float64


def test_denoiser_shape_mismatch_is_reported(schedule):
    with pytest.raises(ValueError, match="denoiser returned shape"):
        ddim_sample(lambda x, t, c: x[:1], schedule, torch.randn(SHAPE), None, steps=2, eta=0.0)


class _TinyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 3, 1)

    def forward(self, x, t):
        return self.conv(x) + t.float().reshape(-1, 1, 1, 1) / 1000


def test_concat_denoiser():
    unet = _TinyUNet()
    den = ConcatDenoiser(unet)
    assert isinstance(den, Denoiser)
    x, cond, t = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([3, 500])
    torch.testing.assert_close(den(x, t, cond), unet(torch.cat([x, cond], 1), t))
    with pytest.raises(ValueError, match="cond=None"):
        den(x, t, None)
    with pytest.raises(ValueError, match="spatial"):
        den(x, t, torch.randn(2, 3, 8, 8))


def test_concat_denoiser_compute_dtype():
    unet = _TinyUNet().to(torch.bfloat16)
    den = ConcatDenoiser(unet, torch.bfloat16)
    x, cond, t = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([3, 500])
    out = den(x, t, cond)
    assert out.dtype == torch.float32
    ref = unet(torch.cat([x, cond], 1).to(torch.bfloat16), t).float()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert [n for n, _ in den.named_parameters()] == ["diffusion_model.conv.weight",
                                                      "diffusion_model.conv.bias"]  # fmt: skip


def test_diffusion_loss_matches_ldm_buffers(schedule):
    """The loss noises with the schedule exactly as LDM's float32 buffers do."""
    den = ConcatDenoiser(_TinyUNet())
    x0, cond = torch.randn(SHAPE), torch.randn(SHAPE)
    t, noise = torch.tensor([0, 999]), torch.randn(SHAPE)
    buf = schedule.ldm_buffers()
    shape = (-1, 1, 1, 1)
    x_t = (
        buf["sqrt_alphas_cumprod"][t].view(shape) * x0
        + buf["sqrt_one_minus_alphas_cumprod"][t].view(shape) * noise
    )
    ref = torch.nn.functional.mse_loss(den(x_t, t, cond), noise)
    out = diffusion_loss(den, schedule, x0, cond, t, noise)
    assert torch.equal(out, ref)
