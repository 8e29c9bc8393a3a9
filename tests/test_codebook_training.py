"""VQ codebook training: initialisation from encoder outputs, dead-code restarts, EMA updates,
usage statistics; and a tiny autoencoder run that collapses with the plain recipe but keeps
its codes alive with the switches on."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ldm.autoencoders.regularizers import VectorQuantizer
from ldm.training.codebook import CodebookTrainer, kmeans, perplexity


def _latents(n: int, c: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 2.0 + 5.0  # far from the uniform [-1/K, 1/K] init


def _as_map(z_flat: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` -> ``[1, C, 1, N]`` (a latent 'image' holding the rows)."""
    return z_flat.t()[None, :, None, :]


def test_kmeans_finds_separated_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    g = torch.Generator().manual_seed(1)
    data = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    found = kmeans(data, 3, iters=20)
    dist = torch.cdist(found, centres).min(1).values
    assert dist.max() < 0.2


def test_initialisation_from_encoder_outputs():
    vq = VectorQuantizer(16, 3)
    trainer = CodebookTrainer(vq.embedding, init="kmeans", init_min_vectors=64)
    z = _latents(64)
    before = vq.embedding.weight.detach().clone()
    _, _, idx = vq(_as_map(z))
    trainer.update(_as_map(z), idx)
    after = vq.embedding.weight.detach()
    assert not torch.equal(before, after)
    # every code now sits among the data (the uniform init is ~8.7 away from it)
    assert torch.cdist(after, z).min(1).values.max() < 3.0
    assert torch.allclose(after.mean(0), z.mean(0), atol=0.5)
    assert bool(trainer.initialised)


def test_sample_init_uses_distinct_encoder_outputs():
    vq = VectorQuantizer(8, 3)
    trainer = CodebookTrainer(vq.embedding, init="sample", init_min_vectors=32)
    z = _latents(32)
    trainer.update(_as_map(z), vq(_as_map(z))[2])
    codes = vq.embedding.weight.detach()
    matches = (codes[:, None] - z[None]).norm(dim=-1).min(1).values
    assert torch.all(matches < 1e-6)  # each code is one of the latents
    assert torch.unique(codes, dim=0).shape[0] == 8


def test_dead_code_reset_replaces_exactly_the_unused_rows():
    vq = VectorQuantizer(6, 2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor(
            [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]]
        ))  # fmt: skip
    trainer = CodebookTrainer(vq.embedding, init="none", dead_code_steps=4)
    g = torch.Generator().manual_seed(0)
    before = vq.embedding.weight.detach().clone()
    restarted = 0
    for _ in range(4):
        z = torch.rand(40, 2, generator=g)  # near codes 0-2 only
        _, _, idx = vq(_as_map(z))
        restarted += trainer.update(_as_map(z), idx).restarted
    after = vq.embedding.weight.detach()
    assert restarted == 3
    assert torch.equal(after[:3], before[:3])  # used codes untouched
    assert torch.all(after[3:].abs().max(1).values < 1.5)  # dead ones moved onto the data


def test_ema_update_matches_a_hand_computation():
    vq = VectorQuantizer(2, 1)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0], [10.0]]))
    d, eps = 0.9, 1e-5
    trainer = CodebookTrainer(
        vq.embedding, init="none", dead_code_steps=0, ema_decay=d, ema_eps=eps
    )
    assert not vq.embedding.weight.requires_grad  # the EMA moves the codes, not the optimizer
    z = torch.tensor([[1.0], [2.0], [9.0]])
    _, _, idx = vq(_as_map(z))
    assert idx.flatten().tolist() == [0, 0, 1]
    trainer.update(_as_map(z), idx)
    # N = d*1 + (1-d)*n ; m = d*e0 + (1-d)*sum z ; e = m / smoothed(N)
    n = torch.tensor([d + (1 - d) * 2, d + (1 - d) * 1])
    m = torch.tensor([d * 0.0 + (1 - d) * 3.0, d * 10.0 + (1 - d) * 9.0])
    smoothed = (n + eps) / (n.sum() + 2 * eps) * n.sum()
    expected = m / smoothed
    assert torch.allclose(vq.embedding.weight.detach().flatten(), expected, atol=1e-6)


def test_usage_statistics_and_warning(caplog):
    vq = VectorQuantizer(4, 1)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    trainer = CodebookTrainer(
        vq.embedding, init="none", dead_code_steps=0, usage_window=2, warn_below=0.9
    )
    z = torch.tensor([[0.0], [0.1], [0.9], [1.1]])  # codes 0 and 1, twice each
    _, _, idx = vq(_as_map(z))
    stats = trainer.update(_as_map(z), idx)
    assert stats.used_in_batch == pytest.approx(0.5)
    assert stats.perplexity == pytest.approx(2.0)
    assert perplexity(idx, 4) == pytest.approx(2.0)
    assert stats.used_recently == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING, logger="ldm.training.codebook"):
        z0 = torch.zeros(4, 1)
        for _ in range(2):
            trainer.update(_as_map(z0), vq(_as_map(z0))[2])
    assert any("codes used" in r.message for r in caplog.records)


def test_invalid_settings_are_refused():
    emb = nn.Embedding(4, 2)
    with pytest.raises(ValueError, match="init"):
        CodebookTrainer(emb, init="random")
    with pytest.raises(ValueError, match="ema_decay"):
        CodebookTrainer(emb, ema_decay=1.5)


# --------------------------------------------------------------------------- a tiny training run


def _tiny_run(switches: dict | None, steps: int = 150) -> float:
    """Train a tiny VQ autoencoder (plain L1 + codebook loss) on coloured blobs; return the
    fraction of codes used on held-out images."""
    from ldm.config import instantiate

    torch.manual_seed(0)
    model = instantiate({
        "target": "vq_model",
        "params": {
            "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3,
                         "out_ch": 3, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
                         "attn_resolutions": [], "norm_groups": 4},
            "n_embed": 512, "embed_dim": 3,
        },
    })  # fmt: skip
    trainer = None if switches is None else CodebookTrainer(model.quantize.embedding, **switches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        base = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
        ramp = torch.linspace(-1, 1, 16).view(1, 1, 1, 16)
        return (base + 0.5 * torch.rand(n, 3, 1, 1, generator=g) * ramp).expand(n, 3, 16, 16)

    for _ in range(steps):
        x = images(8).contiguous()
        z = model.encode(x)
        z_q, cb, idx = model.quantize(z)
        loss = (model.decode(z_q, quantize=False) - x).abs().mean() + cb
        opt.zero_grad()
        loss.backward()
        opt.step()
        if trainer is not None:
            trainer.update(z, idx)
    with torch.no_grad():
        idx = model.quantize(model.encode(images(64).contiguous()))[2]
    return idx.unique().numel() / 512


@pytest.mark.slow
def test_switches_keep_codes_alive_where_the_plain_recipe_collapses():
    plain = _tiny_run(None)
    alive = _tiny_run({"init": "kmeans", "dead_code_steps": 20, "init_min_vectors": 1024})
    assert plain < 0.25  # the plain recipe: a few codes do all the work
    assert alive > 0.5
    ema = _tiny_run({"init": "kmeans", "dead_code_steps": 20, "ema_decay": 0.9,
                     "init_min_vectors": 1024})  # fmt: skip
    assert ema > 0.5
