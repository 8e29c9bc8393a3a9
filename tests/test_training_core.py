"""EMA (LDM layout), timestep samplers, expert weight averaging: unit tests (no Lightning run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.training.ema import EMA, shadow_name
from ldm.training.ewa import ExpertWeightAveraging, apply_ewa, ewa_coefficient
from ldm.training.timestep_sampler import RangeTimesteps, UniformTimesteps


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.diffusion_model[0].bias.requires_grad_(False)  # frozen params get no EMA copy


def test_ema_names_dtypes_and_order():
    ema = EMA(_Wrapper(), decay=0.999)
    names = [n for n, _ in ema.named_buffers()]
    assert names[:2] == ["decay", "num_updates"]
    assert names[2:] == ["diffusion_model0weight", "diffusion_model2weight", "diffusion_model2bias"]
    assert ema.decay.dtype == torch.float32 and ema.decay.shape == ()
    assert ema.num_updates.dtype == torch.int32 and int(ema.num_updates) == 0
    assert shadow_name("diffusion_model.input_blocks.5.2.moe_blocks.0.0.weight") == (
        "diffusion_modelinput_blocks52moe_blocks00weight"
    )


def test_ema_names_match_release_manifest(manifests_dir: Path):
    """The released checkpoints' model_ema.* keys follow the same rule (dots removed)."""
    manifest = json.loads((manifests_dir / "moe_stage_ckpt.json").read_text())
    raw = [k[len("model.") :] for k in manifest if k.startswith("model.diffusion_model.")]
    ema = [k[len("model_ema.") :] for k in manifest if k.startswith("model_ema.")]
    assert ema == ["decay", "num_updates"] + [shadow_name(k) for k in raw]
    assert manifest["model_ema.num_updates"][1] == "int32"


def test_ema_update_follows_ldm_warmup():
    model = _Wrapper()
    ema = EMA(model, decay=0.9)
    w0 = model.diffusion_model[2].weight.detach().clone()
    with torch.no_grad():
        model.diffusion_model[2].weight.add_(1.0)
    ema.update(model)  # n = 1: decay = min(0.9, 2/11)
    d = 2 / 11
    expected = d * w0 + (1 - d) * (w0 + 1.0)
    torch.testing.assert_close(ema.diffusion_model2weight, expected)
    assert int(ema.num_updates) == 1
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9)  # warm-up over
    torch.testing.assert_close(ema.diffusion_model2weight, w0 + 1.0, atol=1e-6, rtol=0)


def test_ema_copy_store_restore():
    model = _Wrapper()
    ema = EMA(model, decay=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters(model):
        # EMA holds the initial weights (no update yet); frozen bias untouched (+3 kept)
        torch.testing.assert_close(
            model.diffusion_model[0].weight, before["diffusion_model.0.weight"]
        )
        torch.testing.assert_close(model.diffusion_model[0].bias, trained["diffusion_model.0.bias"])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k])
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(list(model.parameters())[:1])


def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    t = RangeTimesteps(250, 500)(4096, generator=g)
    assert t.dtype == torch.int64 and int(t.min()) == 250 and int(t.max()) == 499
    u = UniformTimesteps(1000)(4096, generator=g)
    assert int(u.min()) >= 0 and int(u.max()) <= 999 and u.unique().numel() > 900
    a = RangeTimesteps(0, 10)(8, generator=torch.Generator().manual_seed(3))
    b = RangeTimesteps(0, 10)(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lo < hi"):
        RangeTimesteps(500, 500)
    with pytest.raises(ValueError, match="num_timesteps"):
        RangeTimesteps(0, 1001, num_timesteps=1000)


# ------------------------------------------------------------------ EWA


class _MoE(nn.Module):
    """Stand-in with the official FFN-MoE expert layout (Linear, GELU, Dropout, Linear)."""

    def __init__(self, n=4, d=3):
        super().__init__()
        self.moe_norm = nn.LayerNorm(d)
        self.moe_blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * d, d))
            for _ in range(n)
        )

    def forward(self, x):
        return x + sum(b(self.moe_norm(x)) for b in self.moe_blocks)


def _official_ewa(experts, beta):
    """The release's formula (LatentDiffusionExtremeSREWA.apply_ewa), out of place."""
    n = len(experts)
    out = []
    for k in range(n):
        new = {}
        for name, p in experts[k].named_parameters():
            v = (1 - beta) * p.detach()
            for j in range(n):
                if j != k:
                    v = v + beta / (n - 1) * dict(experts[j].named_parameters())[name].detach()
            new[name] = v
        out.append(new)
    return out


def test_ewa_matches_official_formula_in_place():
    layer = _MoE()
    ids = [id(p) for p in layer.parameters()]
    expected = _official_ewa(layer.moe_blocks, 0.3)
    norm_before = layer.moe_norm.weight.detach().clone()
    apply_ewa(layer.moe_blocks, 0.3)
    for k, block in enumerate(layer.moe_blocks):
        for name, p in block.named_parameters():
            torch.testing.assert_close(p.detach(), expected[k][name])
    assert [id(p) for p in layer.parameters()] == ids  # same parameter objects
    torch.testing.assert_close(layer.moe_norm.weight, norm_before)  # LayerNorm untouched


def test_ewa_ramp_and_optimizer_keeps_updating_experts():
    assert ewa_coefficient(0) == 0.0
    assert ewa_coefficient(5000) == pytest.approx(0.15)
    assert ewa_coefficient(10_000) == pytest.approx(0.3)
    assert ewa_coefficient(50_000) == pytest.approx(0.3)
    model = nn.Sequential(_MoE())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ewa = ExpertWeightAveraging(beta_max=0.3, ramp_steps=2)
    x = torch.randn(8, 3)
    for step in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        ewa(model, step)
    # the optimizer still holds the model's parameter objects, so a step moves the experts
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters())
    w = model[0].moe_blocks[1][0].weight
    before = w.detach().clone()
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(w.detach(), before)


def test_ewa_without_moe_layers_is_an_error():
    with pytest.raises(ValueError, match="no FFN-MoE layer"):
        ExpertWeightAveraging()(nn.Linear(2, 2), 0)


def test_image_logger_schedule(tmp_path):
    from ldm.training.callbacks import ImageLogger

    log = ImageLogger(tmp_path, every_n_steps=3, log_first_step=True)
    assert log.should_log(1)  # first batch
    log._last_logged = 1
    assert [s for s in range(2, 10) if log.should_log(s)] == [3, 6, 9]
    quiet = ImageLogger(tmp_path, every_n_steps=3)
    assert not quiet.should_log(1) and quiet.should_log(3)


def test_training_noises_from_its_buffers_exactly_as_the_schedule():
    """The training loss gathers the q_sample coefficients from the module's registered LDM
    buffers (on the device of t: no host sync per step); the values equal NoiseSchedule's."""
    from torch import nn

    from ldm.diffusion.schedule import build_schedule
    from ldm.training.diffusion_module import _BufferForwardProcess

    schedule = build_schedule({"kind": "linear", "num_timesteps": 1000,
                               "linear_start": 0.0015, "linear_end": 0.0155})  # fmt: skip
    holder = nn.Module()
    for name, value in schedule.ldm_buffers().items():
        holder.register_buffer(name, value)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 500, 999])
    out = _BufferForwardProcess(holder).q_sample(x0, t, noise)
    assert torch.equal(out, schedule.q_sample(x0, t, noise))
