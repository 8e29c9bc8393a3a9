"""moe-sr-demo and the demo weights: corrupt inputs, an absent GPU, another working directory,
outputs that would replace inputs, and the config the weights' metadata asks for (issue:
security and reliability)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import save_pretrained
from ldm.config import CONFIG_ROOT, instantiate, load_config
from moe_sr.checkpoints import save_expert
from moe_sr.cli.demo import main as demo_main
from moe_sr.cli.sr import main as sr_main

REPO = CONFIG_ROOT.parent
DEMO_WEIGHTS = REPO / "assets" / "demo"


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    """Random tiny 2-stage weights in our format (the demo config's stages [0, 500, 1000])."""
    folder = tmp_path / "weights"
    unet_cfg = load_config("unet/sr8x_expert_tiny")
    for k, t_range in enumerate([(0, 500), (500, 1000)]):
        torch.manual_seed(k)
        save_expert(instantiate(unet_cfg), folder / f"expert_stage{k}.safetensors",
                    config=unet_cfg, stage=k, num_stages=2, t_range=t_range)  # fmt: skip
    vae_cfg = load_config("fa_vae/vq_f4_fa_tiny")
    save_pretrained(instantiate(vae_cfg), folder / "fa_vae.safetensors", vae_cfg)
    return folder


def _lr(folder: Path, names=("a.png", "b.png")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(np.full((6, 5, 3), 120, np.uint8)).save(folder / n)
    return folder


def _argv(weights: Path, src: Path, out: Path) -> list[str]:
    return ["--demo-weights", str(weights), "-i", str(src), "--hr", str(src / "none"), "-o",
            str(out), "--steps", "1", "--device", "cpu", "--quiet"]  # fmt: skip


def test_a_corrupt_input_is_reported_and_the_others_are_done(tiny_weights, tmp_path, capsys):
    src = _lr(tmp_path / "lr")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    assert demo_main(_argv(tiny_weights, src, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 input(s) failed" in err and "Traceback" not in err
    assert (tmp_path / "o" / "a.png").is_file() and (tmp_path / "o" / "b.png").is_file()


def test_device_cuda_without_a_gpu_is_one_line(tiny_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _argv(tiny_weights, _lr(tmp_path / "lr"), tmp_path / "o")
    argv[argv.index("--device") + 1] = "cuda"
    assert demo_main(argv) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is available here; use --device cpu" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_outputs_that_are_inputs_are_refused(tiny_weights, tmp_path, capsys):
    src = _lr(tmp_path / "lr")
    before = (src / "a.png").read_bytes()
    assert demo_main(_argv(tiny_weights, src, src)) == 2
    assert "refusing to write over input files" in capsys.readouterr().err
    assert (src / "a.png").read_bytes() == before


@pytest.mark.skipif(not any(DEMO_WEIGHTS.glob("*.safetensors")), reason="no demo weights")
def test_the_demo_runs_from_another_working_directory(tmp_path, monkeypatch, capsys):
    """Issue: the bundled weights and examples were looked up relative to the working
    directory, so the demo failed anywhere but the repository root."""
    monkeypatch.delenv("MOESR_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert demo_main(["--steps", "1", "--device", "cpu", "--quiet"]) == 0
    out = tmp_path / "outputs" / "demo"  # outputs go where the user is
    assert {"chelsea.png", "coffee.png", "rocket.png", "comparison.png"} <= {
        p.name for p in out.iterdir()
    }


def test_demo_weights_with_the_default_config_name_the_config_they_need(tmp_path, capsys):
    """Expert files of the demo's UNet (2 stages) with the default 4-stage config: the message
    names the bundled config whose stages and UNet their metadata match."""
    weights = tmp_path / "weights"
    unet_cfg = load_config("demo/unet")
    for k, t_range in enumerate([(0, 500), (500, 1000)]):
        save_expert(instantiate(unet_cfg), weights / f"expert_stage{k}.safetensors",
                    config=unet_cfg, stage=k, num_stages=2, t_range=t_range)  # fmt: skip
    vae_cfg = load_config("fa_vae/vq_f4_fa_tiny")
    save_pretrained(instantiate(vae_cfg), weights / "fa_vae.safetensors", vae_cfg)
    src = _lr(tmp_path / "lr", ("a.png",))
    argv = ["-i", str(src), "-o", str(tmp_path / "o"), "--weights-dir", str(weights)]
    assert sr_main([*argv, "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the expert files are 2 stages [0, 500, 1000]" in err
    assert "their metadata asks for config 'demo/sr8x_demo': pass --config demo/sr8x_demo" in err
