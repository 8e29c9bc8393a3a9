"""FA-VAE (fa_vae/): manifests of the released files, strict loading, presets, behaviour.

Golden numbers against the official code live in the fixture checkers
(tests/fixture_checkers/fa_vae_vqf4.py, fa_vae_klf8.py).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import fa_vae
from fa_vae.frequency import AFNO2D, UNetAff
from fa_vae.fusion import FuseLayer
from fa_vae.released import RELEASED
from ldm.checkpoint import CheckpointMismatchError, load_pretrained, save_pretrained
from ldm.config import instantiate, load_config, to_plain
from ldm.official import config_from_official

DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
MANIFESTS = {"vq_f4": "fa_vae_vqf4.json", "kl_f8": "fa_vae_klf8.json"}
PRESETS = {"vq_f4": "fa_vae/vq_f4_fa", "kl_f8": "fa_vae/kl_f8_fa"}


def _manifest(manifests_dir, kind: str) -> dict:
    return json.loads((manifests_dir / MANIFESTS[kind]).read_text())


def _tiny(kind: str):
    return instantiate(load_config(f"{PRESETS[kind]}_tiny"))


def _inputs(kind: str, batch: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    f = 4 if kind == "vq_f4" else 8
    ch = 3 if kind == "vq_f4" else 4
    z = torch.randn(batch, ch, size // f, size // f, generator=g)
    return x, z


@torch.no_grad()
def _decode(model, kind: str, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    if kind == "vq_f4":
        return model.decode(z, skips=model.lr_features(x))
    return model.decode(z)


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("kind", ["vq_f4", "kl_f8"])
def test_full_size_build_matches_release_manifest(kind, manifests_dir):
    """Keys (in state_dict order), shapes and dtypes equal the released checkpoint."""
    manifest = _manifest(manifests_dir, kind)
    with torch.device("meta"):
        model = instantiate(load_config(PRESETS[kind]))
    ours = {
        k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
        for k, v in model.state_dict().items()
    }
    assert list(ours) == list(manifest)
    assert ours == manifest
    n_tracked = sum(k.endswith("num_batches_tracked") for k in ours)
    assert n_tracked == 27  # 9 AFF blocks x 3 BatchNorms, int64 like the release


@pytest.mark.parametrize("kind", ["vq_f4", "kl_f8"])
def test_released_file_is_recognised(kind, manifests_dir):
    manifest = _manifest(manifests_dir, kind)
    fake = {k: torch.empty(0) for k in manifest}
    assert fa_vae.identify(fake) == kind


@pytest.mark.parametrize("kind", ["vq_f4", "kl_f8"])
def test_synthetic_release_loads_strictly(kind, manifests_dir, tmp_path):
    """A state dict synthesised from the manifest (random values, manifest shapes) loads
    through load_released: every key consumed, every tensor taken from the file.
    Full size on the CPU: ~6 s and ~1 GB each."""
    manifest = _manifest(manifests_dir, kind)
    g = torch.Generator().manual_seed(0)
    synth = {}
    for key, (shape, dtype) in manifest.items():
        if DTYPES[dtype].is_floating_point:
            synth[key] = torch.randn(shape, generator=g)
        else:
            synth[key] = torch.randint(0, 10_000, shape, generator=g, dtype=DTYPES[dtype])
    path = tmp_path / "fa_vae.pth"
    torch.save(synth, path)
    model = fa_vae.load_released(path, kind=kind)
    loaded = model.state_dict()
    assert set(loaded) == set(synth)
    for key, value in synth.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), f"{key} not taken from the file"
    other = "kl_f8" if kind == "vq_f4" else "vq_f4"
    with pytest.raises(CheckpointMismatchError, match=re.escape(RELEASED[other][1])):
        fa_vae.load_released(path, kind=other)


def test_tiny_synthetic_state_dict_loads_strictly(tmp_path):
    """Fast variant of the synthetic-checkpoint test on the tiny preset."""
    model = _tiny("vq_f4")
    g = torch.Generator().manual_seed(0)
    synth = {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 7)
        for k, v in model.state_dict().items()
    }
    path = tmp_path / "fa_vae.pth"
    torch.save(synth, path)
    loaded = fa_vae.load_released(path, "vq_f4", preset="fa_vae/vq_f4_fa_tiny").state_dict()
    assert set(loaded) == set(synth)
    assert all(torch.equal(loaded[k], v) for k, v in synth.items())
    # the tiny weights do not fit the full-size preset: readable strict-loading error
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        fa_vae.load_released(path, "vq_f4")


# --------------------------------------------------------------------------- loading errors


def test_wrong_file_names_the_expected_one(tmp_path):
    kl = _tiny("kl_f8")
    path = tmp_path / "kl.pth"
    torch.save(kl.state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as err:
        fa_vae.load_released(path, kind="vq_f4")
    msg = str(err.value)
    assert "first_stage_models/vq-f4/fa_vae.pth" in msg and "kind='kl_f8'" in msg

    plain = {"encoder.conv_in.weight": torch.zeros(1), "quantize.embedding.weight": torch.zeros(1)}
    torch.save(plain, tmp_path / "plain.pth")
    with pytest.raises(CheckpointMismatchError, match="plain VQ autoencoder"):
        fa_vae.load_released(tmp_path / "plain.pth", kind="vq_f4")
    with pytest.raises(ValueError, match="kind must be one of"):
        fa_vae.load_released(path, kind="vq-f4")


def test_decode_argument_errors():
    vq, kl = _tiny("vq_f4"), _tiny("kl_f8")
    x, z = _inputs("vq_f4")
    with pytest.raises(ValueError, match="pass skips"):
        vq.decode(z)
    feats = vq.lr_features(x)
    with pytest.raises(ValueError, match="must hold 2 encoder level features"):
        vq.decode(z, skips=feats[1:])
    with pytest.raises(ValueError, match="upsampled to the HR size"):
        vq.decode(z, skips=vq.lr_features(torch.zeros(2, 3, 64, 64)))
    _, z8 = _inputs("kl_f8")
    with pytest.raises(ValueError, match="no fuse layers"):
        kl.decode(z8, skips=feats)
    with pytest.raises(ValueError, match="divisible by 4"):
        UNetAff(32, 32)(torch.zeros(1, 32, 6, 8))


def test_ddconfig_keys_owned_by_the_model():
    cfg = to_plain(load_config("fa_vae/vq_f4_fa_tiny"))
    cfg["params"]["ddconfig"]["num_fuse_block"] = 1
    with pytest.raises(ValueError, match="next to ddconfig"):
        instantiate(cfg)


# --------------------------------------------------------------------------- presets, converters


@pytest.mark.parametrize(
    "kind, base", [("vq_f4", "autoencoder/vq_f4"), ("kl_f8", "autoencoder/kl_f8")]
)
def test_presets_compose_the_base_autoencoder(kind, base, tmp_path, monkeypatch):
    fa = to_plain(load_config(PRESETS[kind]))
    plain = to_plain(load_config(base))
    assert fa["params"]["ddconfig"] == plain["params"]["ddconfig"]
    for key in ("embed_dim", "scale_factor"):
        assert fa["params"][key] == plain["params"][key]
    text = (load_config.__globals__["CONFIG_ROOT"] / f"{PRESETS[kind]}.yaml").read_text()
    assert f"${{preset:{base},params.ddconfig}}" in text  # composed, not copied


def test_official_converter_vq():
    ddconfig = {
        "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [],
        "dropout": 0.0,
    }  # fmt: skip
    cfg = config_from_official(
        "VQModelResiUnet", {"ddconfig": ddconfig, "n_embed": 8192, "embed_dim": 3}
    )
    assert cfg == to_plain(load_config("fa_vae/vq_f4_fa"))  # release default: 2 RRDBs
    cfg = config_from_official(
        "VQModelResiUnet",
        {"ddconfig": {**ddconfig, "num_fuse_block": 1}, "n_embed": 8192, "embed_dim": 3,
         "fusion_w": 0.5, "ckpt_path": "x.ckpt"},
    )  # fmt: skip
    assert cfg["params"]["num_fuse_block"] == 1 and cfg["params"]["fusion_w"] == 0.5
    with pytest.raises(ValueError, match="unknown ddconfig key"):
        config_from_official(
            "VQModelResiUnet", {"ddconfig": {**ddconfig, "bogus": 1}, "n_embed": 8, "embed_dim": 3}
        )
    with pytest.raises(ValueError, match="tanh_out"):
        config_from_official(
            "VQModelResiUnet",
            {"ddconfig": {**ddconfig, "tanh_out": True}, "n_embed": 8, "embed_dim": 3},
        )


def test_four_level_vq_has_two_fuse_layers_deepest_first():
    cfg = to_plain(load_config("fa_vae/vq_f4_fa_tiny"))
    cfg["params"]["ddconfig"]["ch_mult"] = [1, 1, 2, 2]
    model = instantiate(cfg)
    names = [n for n, _ in model.decoder.named_children()]
    assert names[names.index("up") + 1 :] == [
        "fusion_layer_2", "fusion_layer_1", "unet_1", "norm_out", "conv_out"
    ]  # fmt: skip
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h, feats = model.encode(x, return_features=True)
        assert model.decode(h, skips=feats).shape == x.shape


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("kind", ["vq_f4", "kl_f8"])
def test_eval_by_default_and_deterministic(kind):
    model = _tiny(kind)
    assert not model.training and not model.decoder.unet_1.training
    x, z = _inputs(kind)
    a, b = _decode(model, kind, x, z), _decode(model, kind, x, z)
    assert torch.equal(a, b)
    # running BatchNorm statistics: a sample's output does not depend on its batch
    single = _decode(model, kind, x[:1], z[:1])
    torch.testing.assert_close(single, a[:1], atol=1e-5, rtol=1e-5)


def test_release_train_mode_flag():
    cfg = to_plain(load_config("fa_vae/vq_f4_fa_tiny"))
    cfg["params"]["release_train_mode"] = True
    model = instantiate(cfg).eval()
    assert model.decoder.unet_1.training and not model.encoder.training
    x, z = _inputs("vq_f4", batch=4)
    torch.manual_seed(0)
    a = _decode(model, "vq_f4", x, z)
    torch.manual_seed(1)
    b = _decode(model, "vq_f4", x, z)
    assert not torch.equal(a, b)  # random DropPath, as the official SR script


def test_fuse_layer_weight_and_afno_identity():
    torch.manual_seed(0)
    fuse = FuseLayer(32, num_rrdb=1).eval()
    enc, dec = torch.randn(2, 1, 32, 8, 8)
    with torch.no_grad():
        assert torch.equal(fuse(enc, dec, 0.0), dec)
        d1 = fuse(enc, dec, 1.0) - dec
        torch.testing.assert_close(fuse(enc, dec, 0.5) - dec, 0.5 * d1)
    afno = AFNO2D(32)
    with torch.no_grad():
        for p in afno.parameters():
            p.zero_()  # mask = softshrink(0) = 0: only the residual is left
        x = torch.randn(1, 32, 8, 12)
        assert torch.equal(afno(x), x)
        # half precision input: the filter runs in float32 and returns the input dtype
        assert afno(x.half().float()).dtype == torch.float32
        assert afno.to(torch.float64)(x.double()).dtype == torch.float64


@pytest.mark.parametrize("kind", ["vq_f4", "kl_f8"])
def test_safetensors_round_trip(kind, tmp_path):
    model = _tiny(kind)
    with torch.no_grad():  # make BatchNorm statistics non-trivial so the round trip is meaningful
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    cfg = to_plain(load_config(f"{PRESETS[kind]}_tiny"))
    path = save_pretrained(model, tmp_path / "fa.safetensors", cfg)
    again = load_pretrained(path)
    assert type(again) is type(model) and not again.training
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    x, z = _inputs(kind)
    assert torch.equal(_decode(model, kind, x, z), _decode(again, kind, x, z))
    assert isinstance(fa_vae.load_released(path, kind=kind), type(model))
    other = "kl_f8" if kind == "vq_f4" else "vq_f4"
    with pytest.raises(CheckpointMismatchError, match="not"):
        fa_vae.load_released(path, kind=other)


def test_inference_fast_path_matches_autograd_path():
    """No-grad inference folds BatchNorm and works in place; it must equal the plain path,
    and the autograd path must give gradients to the frequency module and fuse layer."""
    model = _tiny("vq_f4")
    x, z = _inputs("vq_f4")
    fast = _decode(model, "vq_f4", x, z)
    out = model.decode(z, skips=model.lr_features(x))
    torch.testing.assert_close(out.detach(), fast, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.frequency_parameters())


def test_vq_checker_handles_other_layouts(tmp_path):
    """The fixture checker is not tied to the small fixture's layout: a fixture set written
    in the same format for a 4-level model with 2 RRDBs per fuse layer (two fuse layers,
    two official encoder features) passes, and a wrong golden fails."""
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixture_checkers import fa_vae_vqf4

    ddconfig = {
        "double_z": False, "z_channels": 3, "resolution": 64, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0, "num_fuse_block": 2,
    }  # fmt: skip
    params = {"ddconfig": ddconfig, "n_embed": 16, "embed_dim": 3}
    model = instantiate(config_from_official("VQModelResiUnet", params))
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    latent = torch.randn(1, 3, 4, 4, generator=g)
    c = torch.randn(1, 32, 8, 8, generator=g)
    with torch.no_grad():
        h, feats = model.encode(image, return_features=True)
        z_q, loss, idx = model.quantize(latent)
        io = {
            "image": image, "latent": latent, "h_prequant": h,
            "enc_fea_0": feats[1], "enc_fea_1": feats[2],
            "latent_quantized": z_q, "quant_indices": idx.reshape(1, 4, 4), "emb_loss": loss.reshape(1),
            "decoded": model.decode(latent, skips=feats),
            "decoded_noquant": model.decode(latent, skips=feats, quantize=False),
            "comp_afno_in": c, "comp_afno_out": model.decoder.unet_1.conv1.filter(c),
            "comp_unet1_in": c, "comp_unet1_out": model.decoder.unet_1(c),
            "comp_fusion_enc": c, "comp_fusion_dec": -c,
            "comp_fusion_out": model.decoder.fusion_layer_1(c, -c, 1.0),
        }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"cls": "VQModelResiUnet", "params": params}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors"
    )
    save_file({k: v.clone() for k, v in io.items()}, tmp_path / "io.safetensors")
    fa_vae_vqf4.check(tmp_path)

    io["decoded"] = io["decoded"] + 1e-3
    save_file({k: v.clone() for k, v in io.items()}, tmp_path / "io.safetensors")
    with pytest.raises(AssertionError, match="decoded"):
        fa_vae_vqf4.check(tmp_path)
    io["unexpected"] = c
    io["decoded"] = io["decoded"] - 1e-3
    save_file({k: v.clone() for k, v in io.items()}, tmp_path / "io.safetensors")
    with pytest.raises(AssertionError, match="without a check"):
        fa_vae_vqf4.check(tmp_path)
