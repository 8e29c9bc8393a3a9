"""Building the SR pipeline from weight files (moe_sr/build.py) and the moe-sr CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import CheckpointMismatchError
from ldm.diffusion.schedule import NoiseSchedule
from moe_sr.build import build_pipeline, build_pipeline_from_folder, export_pipeline
from moe_sr.cli.sr import main
from tests.moe_sr_helpers import released_state_dict, tiny_fa_vae, tiny_unets

CONFIG = "moe_sr/sr8x_tiny"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Tiny files in the released layout: moe_stage{k}.ckpt (raw + EMA) and fa_vae.pth."""
    folder = tmp_path_factory.mktemp("release")
    unets = tiny_unets()
    buffers = NoiseSchedule.linear().ldm_buffers()
    paths = []
    for k, unet in enumerate(unets):
        ema = unet.state_dict()
        raw = {n: v + 1.0 for n, v in ema.items()}
        paths.append(folder / f"moe_stage{k}.ckpt")
        torch.save(released_state_dict(raw, ema, buffers), paths[-1])
    vae = tiny_fa_vae()
    torch.save(vae.state_dict(), folder / "fa_vae.pth")
    return {"experts": paths, "vae": folder / "fa_vae.pth", "unets": unets}


@pytest.fixture(scope="module")
def weights_dir(release, tmp_path_factory):
    pipe = build_pipeline(CONFIG, release["experts"], release["vae"])
    folder = tmp_path_factory.mktemp("ours")
    export_pipeline(pipe, folder)
    return folder


def test_build_from_released_files_takes_the_ema_weights(release):
    pipe = build_pipeline(CONFIG, release["experts"], release["vae"], steps=2)
    for mine, ref in zip(pipe.unets, release["unets"]):
        for (name, a), b in zip(mine.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), name
    raw = build_pipeline(CONFIG, release["experts"], release["vae"], weights="raw")
    a = raw.unets[0].state_dict()["out.2.bias"]
    torch.testing.assert_close(a, release["unets"][0].state_dict()["out.2.bias"] + 1.0)
    assert pipe.steps == 2 and pipe.color_fix == "adain" and pipe.stages.num_stages == 4


def test_build_rejects_a_wrong_order_and_a_wrong_schedule(release):
    e = release["experts"]
    with pytest.raises(ValueError, match="moe_stage2.ckpt is at stage position 1"):
        build_pipeline(CONFIG, [e[0], e[2], e[1], e[3]], release["vae"])
    with pytest.raises(CheckpointMismatchError, match="noise schedule differs"):
        build_pipeline(CONFIG, e, release["vae"], overrides=["schedule.linear_end=0.02"])


def test_export_round_trip_and_metadata_order(release, weights_dir):
    files = sorted(p.name for p in weights_dir.iterdir())
    assert files == [f"expert_stage{k}.safetensors" for k in range(4)] + ["fa_vae.safetensors"]
    lr = torch.rand(3, 5, 6)
    a = build_pipeline(CONFIG, release["experts"], release["vae"], steps=2)(lr).image
    b = build_pipeline_from_folder(weights_dir, CONFIG, steps=2)(lr).image
    assert torch.equal(a, b)
    # our files carry their stage: any order given by the user works
    shuffled = [weights_dir / f"expert_stage{k}.safetensors" for k in (3, 1, 0, 2)]
    c = build_pipeline(CONFIG, shuffled, weights_dir / "fa_vae.safetensors", steps=2)(lr).image
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="trained for timesteps"):
        build_pipeline_from_folder(weights_dir, CONFIG, overrides=["stages=[0,200,500,750,1000]"])


def _write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (4, 7), dtype=np.uint8)).save(folder / "a.png")  # gray
    (folder / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


def test_cli_folder_with_a_corrupt_file(weights_dir, tmp_path, capsys):
    src, out = tmp_path / "lr", tmp_path / "sr"
    _write_inputs(src)
    argv = ["-i", str(src), "-o", str(out), "--weights-dir", str(weights_dir),
            "--config", CONFIG, "--steps", "2", "--quiet", "--save-latents"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "c_corrupt.png" in err and "1 problem" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]
    assert Image.open(out / "b.png").size == (48, 40)  # 8x of 6x5 (PIL: width, height)
    assert Image.open(out / "a.png").size == (56, 32)
    from safetensors.torch import load_file

    assert load_file(out / "latents" / "b.safetensors")["latent"].shape == (3, 10, 12)
    # existing outputs are skipped, --overwrite replaces them
    stamp = (out / "b.png").stat().st_mtime_ns
    os.utime(out / "b.png", ns=(stamp - 10**9, stamp - 10**9))
    assert main(argv) == 1
    assert (out / "b.png").stat().st_mtime_ns == stamp - 10**9
    assert main([*argv, "--overwrite"]) == 1
    assert (out / "b.png").stat().st_mtime_ns != stamp - 10**9


def test_cli_errors_and_dry_run(tmp_path, capsys):
    assert main(["-i", str(tmp_path), "-o", str(tmp_path / "o"), "--config", CONFIG]) == 1
    assert "no images" in capsys.readouterr().err
    _write_inputs(tmp_path / "lr")
    assert main(["-i", str(tmp_path / "lr"), "-o", str(tmp_path / "o"), "--config", CONFIG]) == 2
    assert "--ckpt" in capsys.readouterr().err
    argv = ["-i", str(tmp_path / "lr"), "-o", str(tmp_path / "o"), "--config", CONFIG,
            "--dry-run", "--set", "sampler.steps=7"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "steps: 7" in text and "a.png -> " in text


def test_cli_download_offline_says_where_to_get_the_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write_inputs(tmp_path / "lr")
    argv = ["-i", str(tmp_path / "lr"), "-o", str(tmp_path / "o"), "--download-to",
            str(tmp_path / "models")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "huggingface.co/amandaa/moe_sr/resolve/main/Unet/moe_stage3.ckpt" in err
    assert str(tmp_path / "models" / "first_stage_models" / "vq-f4" / "fa_vae.pth") in err


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "--offload" in capsys.readouterr().out


def test_release_style_script_runs_python_m_moe_sr(weights_dir, tmp_path):
    """scripts/inf_moe_8x.sh -> python -m moe_sr, end to end (a subprocess: ~10 s)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = tmp_path / "lr"
    src.mkdir()
    Image.fromarray(np.full((4, 4, 3), 120, np.uint8)).save(src / "x.png")
    env.update(
        CONFIG_PATH=f"configs/{CONFIG}.yaml", WEIGHTS_DIR=str(weights_dir), INPUT_PATH=str(src),
        OUTPUT_PATH=str(tmp_path / "out"), SAMPLE_STEPS="2", PYTHON=sys.executable,
    )  # fmt: skip
    res = subprocess.run(["bash", "scripts/inf_moe_8x.sh", "--quiet"], capture_output=True,
                         text=True, env=env, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert Image.open(tmp_path / "out" / "x.png").size == (32, 32)


def test_load_vae_takes_a_plain_ldm_autoencoder_ckpt(tmp_path):
    """An LDM vq-f4 Lightning .ckpt (with its loss.* keys) loads as the pipeline's VAE."""
    from ldm.config import instantiate, load_config, to_plain
    from moe_sr.build import load_vae

    cfg = to_plain(load_config("autoencoder/vq_f4_tiny"))
    vq = instantiate(cfg)
    sd = {f"first_stage_model.{k}": v for k, v in vq.state_dict().items()}
    sd["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(3)
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "model.ckpt")
    vae = load_vae(cfg, tmp_path / "model.ckpt")
    for k, v in vq.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v), k
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    h, feats = vae.encode(x, return_features=True)
    assert vae.decode(h, skips=feats, quantize=True).shape == x.shape
