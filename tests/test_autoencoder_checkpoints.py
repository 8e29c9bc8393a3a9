"""Autoencoder presets against the released checkpoints' manifests, and checkpoint errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.autoencoders.loading import guess_autoencoder_preset, load_autoencoder
from ldm.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_state_dict_strict,
    read_state_dict,
)
from ldm.config import instantiate, load_config


def _manifest(manifests_dir: Path, name: str) -> dict[str, list]:
    return json.loads((manifests_dir / name).read_text())


def _meta_model(preset: str):
    with torch.device("meta"):
        return instantiate(load_config(preset))


@pytest.mark.parametrize(
    "preset, manifest",
    [("autoencoder/vq_f4", "ldm_vqf4.json"), ("autoencoder/kl_f8", "sd15_vae_klf8.json")],
)
def test_full_size_preset_matches_release_manifest(manifests_dir, preset, manifest):
    ref = _manifest(manifests_dir, manifest)
    sd = _meta_model(preset).state_dict()
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()}
    assert set(ours) == set(ref), (
        f"missing {sorted(set(ref) - set(ours))[:5]}, extra {sorted(set(ours) - set(ref))[:5]}"
    )
    wrong = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert not wrong, f"shape/dtype differences: {list(wrong.items())[:5]}"
    assert list(ours) == list(ref)  # same state_dict order as the official modules, too


@pytest.mark.parametrize(
    "preset, manifest",
    [("autoencoder/vq_f4", "ldm_vqf4.json"), ("autoencoder/kl_f8", "sd15_vae_klf8.json")],
)
def test_guesser_names_full_size_presets(manifests_dir, preset, manifest):
    sd = {
        k: torch.empty(shape, device="meta")
        for k, (shape, _) in _manifest(manifests_dir, manifest).items()
    }
    assert guess_autoencoder_preset(sd) == preset
    prefixed = {"first_stage_model." + k: v for k, v in sd.items()}
    assert guess_autoencoder_preset(prefixed) == f"{preset} under prefix 'first_stage_model.'"


def test_guesser_names_diffusers_naming(manifests_dir):
    sd = {
        k: torch.empty(shape, device="meta")
        for k, (shape, _) in _manifest(manifests_dir, "sd15_vae_klf8_diffusers.json").items()
    }
    assert "diffusers AutoencoderKL" in guess_autoencoder_preset(sd)


def test_guesser_stays_silent_on_unrelated_state_dicts():
    assert guess_autoencoder_preset({"weight": torch.zeros(3, 3)}) is None


def test_mismatch_error_names_the_likely_preset(manifests_dir):
    model = instantiate(load_config("autoencoder/vq_f4_tiny"))
    full = {
        k: torch.empty(shape, device="meta")
        for k, (shape, _) in _manifest(manifests_dir, "sd15_vae_klf8.json").items()
    }
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_strict(model, full, what="sd15.ckpt")
    msg = str(err.value)
    assert "sd15.ckpt does not match the model" in msg
    assert "missing (" in msg and "quantize.embedding.weight" in msg
    assert "unexpected (96): decoder.up.0.block.0.nin_shortcut.bias" in msg
    assert "wrong shape (" in msg and "encoder.conv_in.weight: file (128, 3, 3, 3) vs model" in msg
    assert "more)" in msg  # long lists are shortened
    assert "preset 'autoencoder/kl_f8'" in msg


def _tiny_vq_state(tmp_path: Path):
    cfg = load_config("autoencoder/vq_f4_tiny")
    model = instantiate(cfg).eval()
    return cfg, model, model.state_dict()


def test_ldm_lightning_ckpt_ignores_loss_keys(tmp_path, manifests_dir):
    cfg, model, sd = _tiny_vq_state(tmp_path)
    loss_keys = list(_manifest(manifests_dir, "ldm_vqf4_loss_keys.json"))
    assert all(k.startswith("loss.") for k in loss_keys)
    state = dict(sd)
    for k in loss_keys[:6]:  # a few of the released loss.* names (tiny tensors)
        state[k] = torch.randn(2)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, path)
    loaded = load_autoencoder(cfg, path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # A latent-diffusion checkpoint: the autoencoder under a prefix next to other models.
    ldm_state = {"first_stage_model." + k: v for k, v in sd.items()}
    ldm_state["model.diffusion_model.out.weight"] = torch.zeros(2)
    torch.save({"state_dict": ldm_state}, tmp_path / "ldm.ckpt")
    loaded = load_autoencoder(cfg, tmp_path / "ldm.ckpt", prefix="first_stage_model.")
    assert torch.equal(loaded.quantize.embedding.weight, sd["quantize.embedding.weight"])
    # loss.* keys are dropped only at the top level: under a prefix they are an error.
    torch.save({"first_stage_model." + k: v for k, v in state.items()}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(6\): loss\.perceptual"):
        load_autoencoder(cfg, tmp_path / "bad.ckpt", prefix="first_stage_model.")


def test_missing_and_unexpected_keys_fail_loudly(tmp_path):
    cfg, _, sd = _tiny_vq_state(tmp_path)
    state = dict(sd)
    del state["quant_conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["post_quant_conv.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_autoencoder(cfg, tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing (1): quant_conv.weight" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "wrong shape (1): post_quant_conv.bias: file (5,) vs model (3,)" in msg
    assert "autoencoder/vq_f4_tiny" in msg  # still recognisably the tiny preset


def test_wrong_prefix_lists_the_prefixes_present(tmp_path):
    cfg, _, sd = _tiny_vq_state(tmp_path)
    torch.save(sd, tmp_path / "plain.pth")
    with pytest.raises(CheckpointMismatchError, match="top-level prefixes in the file: decoder"):
        load_autoencoder(cfg, tmp_path / "plain.pth", prefix="first_stage_model.")


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    return msg


def test_truncated_checkpoint_gives_one_line_error(tmp_path):
    _, _, sd = _tiny_vq_state(tmp_path)
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": sd}, full)
    data = full.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        read_state_dict(cut)
    assert "cut.ckpt" in _one_line(err.value)


def test_truncated_safetensors_gives_one_line_error(tmp_path):
    from safetensors.torch import save_file

    _, _, sd = _tiny_vq_state(tmp_path)
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:
        read_state_dict(cut)
    assert "cut.safetensors" in _one_line(err.value)


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".safetensors"])
def test_not_a_checkpoint_gives_one_line_error(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are my notes, not weights\n" * 20)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert path.name in _one_line(err.value)


def test_pickled_object_is_refused_without_unpickling(tmp_path):
    import pickle

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"weights": Path("x")}, protocol=2))
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    _one_line(err.value)


def _class_in_fake_module(monkeypatch, qualified: str, ran: list) -> type:
    """A class importable as ``qualified`` only while the test saves (the loader never has it)."""
    import importlib.util
    import sys
    import types

    module_name, name = qualified.rsplit(".", 1)
    parts = module_name.split(".")
    for i in range(1, len(parts)):  # parent packages that are not installed
        parent = ".".join(parts[:i])
        if parent not in sys.modules and importlib.util.find_spec(parent) is None:
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    module = types.ModuleType(module_name)

    def setstate(self, state):
        ran.append(qualified)  # would mean the original class ran while loading

    cls = type(name, (), {"__module__": module_name, "__setstate__": setstate})
    module.__dict__[name] = cls
    monkeypatch.setitem(sys.modules, module_name, module)
    return cls


def test_lightning_bookkeeping_objects_are_ignored_not_run(tmp_path, monkeypatch):
    """A Lightning checkpoint pickling callback classes, OmegaConf hyper-parameters and numpy
    values next to the weights loads its tensors without importing or running any of them."""
    import numpy as np
    from omegaconf import OmegaConf

    ran: list = []
    callback = _class_in_fake_module(
        monkeypatch, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", ran
    )
    obj = callback()
    obj.__dict__["state"] = 1
    sd = {"encoder.weight": torch.randn(3, 2), "step": torch.tensor(7)}
    ckpt = {
        "state_dict": sd,
        "callbacks": {callback: {"best_model_score": np.float64(0.5), "k": np.zeros(3)}},
        "loops": {"fit": obj},
        "hyper_parameters": OmegaConf.create({"lr": 1e-4, "unet": {"ch": [1, 2]}}),
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    monkeypatch.undo()  # the fake lightning module is gone when loading, as on a user's machine
    got = read_state_dict(path)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert ran == []


def test_unknown_pickled_class_is_still_refused(tmp_path, monkeypatch):
    ran: list = []
    payload = _class_in_fake_module(monkeypatch, "somepkg.payload.Run", ran)
    callback = _class_in_fake_module(
        monkeypatch, "pytorch_lightning.callbacks.early_stopping.EarlyStopping", ran
    )
    p = payload()
    p.__dict__["cmd"] = "x"
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "callbacks": {callback: p}}, path)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"somepkg\.payload\.Run") as err:
        read_state_dict(path)
    assert "EarlyStopping" not in str(err.value)  # only the refused global is named
    _one_line(err.value)
    assert ran == []


#: ``model.params`` of latent-diffusion's models/first_stage_models/vq-f4/config.yaml
LDM_VQ_F4_PARAMS = {
    "embed_dim": 3,
    "n_embed": 8192,
    "monitor": "val/rec_loss",
    "ddconfig": {
        "double_z": False,
        "z_channels": 3,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"},
}


def test_official_ldm_arguments_build_the_preset(manifests_dir):
    from ldm.official import config_from_official

    cfg = config_from_official("VQModel", LDM_VQ_F4_PARAMS)
    preset = dict(load_config("autoencoder/vq_f4"))
    assert cfg["target"] == preset["target"] == "vq_model"
    with torch.device("meta"):
        sd = instantiate(cfg).state_dict()
    ref = _manifest(manifests_dir, "ldm_vqf4.json")
    assert {k: list(v.shape) for k, v in sd.items()} == {k: s for k, (s, _) in ref.items()}
    with pytest.raises(ValueError, match="remap"):
        config_from_official("VQModel", {**LDM_VQ_F4_PARAMS, "remap": "codes.npy"})
    bad = {**LDM_VQ_F4_PARAMS, "ddconfig": {**LDM_VQ_F4_PARAMS["ddconfig"], "tanh_out": True}}
    with pytest.raises(ValueError, match="tanh_out"):
        config_from_official("VQModel", bad)
    kl = config_from_official("AutoencoderKL", {"embed_dim": 4, "ddconfig": {"z_channels": 4}})
    assert kl == {"target": "kl_model", "params": {"embed_dim": 4, "ddconfig": {"z_channels": 4}}}
