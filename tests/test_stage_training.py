"""Stage-expert training: LDM-4x-SR key map (on the manifest), init from checkpoints, a tiny
stage run with EWA, and the expert export (stage + interval in the metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import CheckpointMismatchError
from ldm.cli.train import main
from ldm.config import CONFIG_ROOT, instantiate, load_config
from ldm.training.init_weights import init_from_checkpoint
from moe_sr.checkpoints import load_expert, read_expert_metadata
from moe_sr.cli.export_expert import main as export_main
from moe_sr.training import LDMSR4xToExpertKeyMap

TINY_STAGE = str(CONFIG_ROOT / "train" / "tiny_stage.yaml")
KEYMAP = {"target": "ldm_sr4x_to_expert"}


def _tiny_unet(experts: int):
    cfg = load_config("unet/sr8x_expert_tiny", overrides=[f"params.ffn_moe_experts={experts}"])
    return instantiate(cfg)


def test_keymap_ldm_sr4x_to_released_expert_names(manifests_dir: Path):
    """latent-diffusion's 4x SR UNet names map onto the released expert's, shapes included."""
    manifest = json.loads((manifests_dir / "moe_stage_ckpt.json").read_text())
    prefix = "model.diffusion_model."
    target = {k[len(prefix) :]: tuple(v[0]) for k, v in manifest.items() if k.startswith(prefix)}
    with torch.device("meta"):
        source = instantiate(load_config("unet/ldm_sr4x")).state_dict()
    target_meta = {k: torch.empty(s, device="meta") for k, s in target.items()}
    mapped, new = LDMSR4xToExpertKeyMap()(source, target_meta)
    assert len(mapped) == len(source)
    assert sorted(set(mapped) | set(new)) == sorted(target)
    assert not set(mapped) & set(new)
    assert all(tuple(mapped[k].shape) == target[k] for k in mapped)
    # the new tensors are exactly the 6 FFN-MoE layers (16 experts x 4 tensors + LayerNorm 2)
    assert len(new) == 6 * (16 * 4 + 2)
    assert "middle_block.3.in_layers.0.weight" in mapped  # shifted past middle_block.2 (MoE)
    assert "output_blocks.2.3.conv.weight" in mapped  # the upsample after attention + MoE


def _fake_ldm_ckpt(unet, path: Path, ema_delta: float = 0.0) -> Path:
    sd = {"model.diffusion_model." + k: v.clone() for k, v in unet.state_dict().items()}
    sd.update(
        {
            "model_ema." + ("diffusion_model." + k).replace(".", ""): v.clone() + ema_delta
            for k, v in unet.state_dict().items()
        }
    )
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    torch.save({"state_dict": sd}, path)
    return path


def test_init_from_ldm_sr4x_with_key_map(tmp_path):
    src = _tiny_unet(0)
    ckpt = _fake_ldm_ckpt(src, tmp_path / "sr4x.ckpt")
    expert = _tiny_unet(4)
    moe_before = {k: v.clone() for k, v in expert.state_dict().items() if ".moe_" in k}
    new = init_from_checkpoint(expert, ckpt, key_map=KEYMAP)
    assert sorted(new) == sorted(moe_before)
    esd = expert.state_dict()
    for k, v in moe_before.items():
        assert torch.equal(esd[k], v)  # new layers keep their init
    torch.testing.assert_close(esd["middle_block.3.in_layers.0.weight"],
                               src.state_dict()["middle_block.2.in_layers.0.weight"])  # fmt: skip
    # without the key map the layouts do not fit: a strict, readable error
    with pytest.raises(CheckpointMismatchError, match="missing"):
        init_from_checkpoint(_tiny_unet(4), ckpt)


def test_init_from_ema_weights(tmp_path):
    src = _tiny_unet(4)
    ckpt = _fake_ldm_ckpt(src, tmp_path / "stage.ckpt", ema_delta=1.0)
    dst = _tiny_unet(4)
    init_from_checkpoint(dst, ckpt, weights="ema")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v + 1.0)
    init_from_checkpoint(dst, ckpt, weights="raw")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_tiny_stage_training_and_export(tmp_path):
    from test_training_run import FAST, make_hr_folder

    hr = make_hr_folder(tmp_path / "hr")
    logdir = tmp_path / "logs"
    assert main(["--base", TINY_STAGE, "-l", str(logdir), "-n", "stage1", "stage=1",
                 f"data.train.params.folder={hr}", *FAST, "lightning.image_logger=null",
                 "lightning.trainer.max_steps=3"]) == 0  # fmt: skip
    (run_dir,) = logdir.iterdir()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert obj["hyper_parameters"]["timestep_sampler"]["params"]["stage"] == 1
    sd = obj["state_dict"]
    # EWA ran after every optimizer step with the linear ramp 0.3 * step / 4 (steps 0, 1, 2)
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        betas = [float(r["train/ewa_beta"]) for r in csv.DictReader(f) if r.get("train/ewa_beta")]
    assert betas == pytest.approx([0.0, 0.075, 0.15])
    w = [sd[f"model.diffusion_model.middle_block.2.moe_blocks.{k}.0.weight"] for k in range(4)]
    assert not torch.equal(w[0], w[1])  # pulled together, still distinct
    # our Lightning checkpoint has the released layout: the release loader reads it (EMA + schedule)
    from ldm.diffusion.schedule import NoiseSchedule

    released_way = _tiny_unet(4)
    load_expert(ckpt, released_way, weights="ema", schedule=NoiseSchedule.linear())
    torch.testing.assert_close(
        released_way.state_dict()["out.2.weight"], sd["model_ema.diffusion_modelout2weight"]
    )

    out = tmp_path / "experts" / "expert_stage1.safetensors"
    assert export_main([str(ckpt), str(out)]) == 0
    meta = read_expert_metadata(out)
    assert meta["stage"] == 1 and meta["num_stages"] == 4 and meta["t_range"] == (250, 500)
    unet = _tiny_unet(4)
    info = load_expert(out, unet)
    assert info.stage == 1
    ema = sd["model_ema.diffusion_modelmiddle_block2moe_blocks30weight"]
    torch.testing.assert_close(unet.state_dict()["middle_block.2.moe_blocks.3.0.weight"], ema)

    # a plain (non-stage) training checkpoint cannot be exported as an expert
    plain = dict(obj)
    plain["hyper_parameters"] = dict(obj["hyper_parameters"], timestep_sampler=None)
    torch.save(plain, tmp_path / "plain.ckpt")
    assert export_main([str(tmp_path / "plain.ckpt"), str(tmp_path / "x.safetensors")]) == 2


@pytest.mark.slow
def test_train_moe_script_trains_and_exports_every_stage(tmp_path):
    import os
    import subprocess
    import sys

    from test_training_run import make_hr_folder

    hr = make_hr_folder(tmp_path / "hr")
    out = tmp_path / "experts"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    cmd = ["bash", str(CONFIG_ROOT.parent / "scripts" / "train_moe.sh"), "-c", TINY_STAGE,
           "-o", str(out), "-l", str(tmp_path / "logs"), "--", "stages=[0,500,1000]",
           f"data.train.params.folder={hr}", "lightning.trainer.max_steps=2",
           "lightning.image_logger=null", "lightning.loggers=[csv]"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metas = [read_expert_metadata(out / f"expert_stage{k}.safetensors") for k in (0, 1)]
    assert [m["t_range"] for m in metas] == [(0, 500), (500, 1000)]
    assert all(m["num_stages"] == 2 for m in metas)
    assert "initialised the UNet from" in proc.stderr  # stage 1 started from stage 0's EMA
