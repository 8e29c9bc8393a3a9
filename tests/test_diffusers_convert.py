"""LDM <-> diffusers AutoencoderKL: key map against the manifests, numeric equivalence, round trip."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.autoencoders.diffusers_convert import (
    build_keymap,
    diffusers_kwargs,
    diffusers_to_ldm,
    from_diffusers,
    is_attention_projection,
    ldm_to_diffusers,
    to_diffusers,
)
from ldm.checkpoint import CheckpointMismatchError
from ldm.config import instantiate, load_config

diffusers = pytest.importorskip("diffusers")


def test_full_keymap_matches_diffusers_own_conversion(manifests_dir):
    """Every SD1.5 LDM key maps to the name diffusers' converter gives it, with its shape."""
    ldm = json.loads((manifests_dir / "sd15_vae_klf8.json").read_text())
    dif = json.loads((manifests_dir / "sd15_vae_klf8_diffusers.json").read_text())
    ref = json.loads((manifests_dir / "sd15_vae_klf8_ldm_to_diffusers_keymap.json").read_text())
    ref_map = ref["mapping"]
    assert not ref["unmapped"]
    keymap = build_keymap(list(ldm), num_levels=4)
    assert len(keymap) == len(ldm) == len(dif) == len(ref_map) == 248
    assert keymap == {k: v["diffusers"] for k, v in ref_map.items()}
    assert set(keymap.values()) == set(dif)
    reshaped = 0
    for k, entry in ref_map.items():
        assert ldm[k][0] == entry["src_shape"] and dif[entry["diffusers"]][0] == entry["dst_shape"]
        if is_attention_projection(k):
            reshaped += 1
            assert entry["dst_shape"] == entry["src_shape"][:2] and entry["src_shape"][2:] == [1, 1]
        else:
            assert entry["dst_shape"] == entry["src_shape"], k
    assert reshaped == 8


def test_full_size_conversion_both_ways_on_meta(manifests_dir):
    ldm = json.loads((manifests_dir / "sd15_vae_klf8.json").read_text())
    dif = json.loads((manifests_dir / "sd15_vae_klf8_diffusers.json").read_text())
    sd = {k: torch.empty(shape, device="meta") for k, (shape, _) in ldm.items()}
    out = ldm_to_diffusers(sd)
    assert {k: list(v.shape) for k, v in out.items()} == {k: s for k, (s, _) in dif.items()}
    back = diffusers_to_ldm(out)
    assert {k: list(v.shape) for k, v in back.items()} == {k: s for k, (s, _) in ldm.items()}


@pytest.fixture(scope="module")
def tiny_diffusers_vae() -> torch.nn.Module:
    """Built once: the first diffusers model construction imports a lot (~10 s)."""
    cfg = load_config("autoencoder/kl_f8_tiny").params
    vae = diffusers.AutoencoderKL(**diffusers_kwargs(cfg.ddconfig, cfg.embed_dim, cfg.scale_factor))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb everything, norms and biases included
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return vae.eval()


def test_tiny_diffusers_vae_converts_to_identical_outputs(tiny_diffusers_vae):
    vae = tiny_diffusers_vae
    ours = from_diffusers(vae)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 40, 56, generator=g) * 2 - 1
    z = torch.randn(2, 4, 6, 5, generator=g)
    with torch.no_grad():
        ref_post = vae.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(post.logvar, ref_post.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(z), vae.decode(z).sample, atol=1e-5, rtol=0)
    assert ours.scale_factor == pytest.approx(vae.config.scaling_factor)


def test_export_to_diffusers_round_trips_exactly():
    ours = instantiate(load_config("autoencoder/kl_f8_tiny")).eval()
    vae = to_diffusers(ours)
    back = from_diffusers(vae)
    sd, sd_back = ours.state_dict(), back.state_dict()
    assert list(sd) == list(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, ours.decode(z), atol=1e-5, rtol=0)


def test_unknown_diffusers_keys_are_named():
    sd = ldm_to_diffusers(instantiate(load_config("autoencoder/kl_f8_tiny")).state_dict())
    sd["decoder.up_blocks.0.attentions.0.to_q.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointMismatchError, match="attentions.0.to_q.weight"):
        diffusers_to_ldm(sd)


def test_diffusers_file_loads_through_load_autoencoder(tmp_path, tiny_diffusers_vae):
    from safetensors.torch import save_file

    from ldm.autoencoders.loading import load_autoencoder

    vae = tiny_diffusers_vae
    save_file(dict(vae.state_dict()), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model = load_autoencoder(
        "autoencoder/kl_f8_tiny", tmp_path / "diffusion_pytorch_model.safetensors"
    )
    ref = from_diffusers(vae)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
