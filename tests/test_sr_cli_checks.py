"""moe-sr: every documented flag value through the real parser, the output side checked
before any work, inputs never overwritten, config mistakes as one line (issue: security and
reliability)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import moe_sr.cli.sr as sr_cli
from ldm.diffusion.samplers import DDIM_SPACINGS
from ldm.diffusion.schedule import NoiseSchedule
from moe_sr.build import build_pipeline, export_pipeline
from moe_sr.cli.sr import build_parser, main
from tests.moe_sr_helpers import released_state_dict, tiny_fa_vae, tiny_unets

CONFIG = "moe_sr/sr8x_tiny"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Tiny files in the released layout: moe_stage{k}.ckpt and fa_vae.pth."""
    folder = tmp_path_factory.mktemp("release")
    buffers = NoiseSchedule.linear().ldm_buffers()
    for k, unet in enumerate(tiny_unets()):
        sd = unet.state_dict()
        torch.save(released_state_dict(sd, sd, buffers), folder / f"moe_stage{k}.ckpt")
    torch.save(tiny_fa_vae().state_dict(), folder / "fa_vae.pth")
    return folder


@pytest.fixture(scope="module")
def weights_dir(release, tmp_path_factory):
    experts = [release / f"moe_stage{k}.ckpt" for k in range(4)]
    out = tmp_path_factory.mktemp("ours")
    export_pipeline(build_pipeline(CONFIG, experts, release / "fa_vae.pth"), out)
    return out


def _inputs(folder: Path, names=("a.png", "b.png")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).save(folder / n)
    return folder


def _argv(src, out, weights_dir, *more):
    return ["-i", str(src), "-o", str(out), "--weights-dir", str(weights_dir), "--config",
            CONFIG, "--steps", "1", "--quiet", *more]  # fmt: skip


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the pipeline is built (the work the checks must come before)."""

    def boom(*a, **k):
        raise AssertionError("the pipeline was built before the output side was checked")

    monkeypatch.setattr(sr_cli, "_build", boom)


def _choice_options(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    return [
        (a.option_strings[-1], c)
        for a in parser._actions
        if a.choices and a.option_strings
        for c in a.choices
    ]


def _sampler_for(flag: str, value: str) -> list[str]:
    """The solver spacings are documented for the solvers (ddim takes uniform|quad)."""
    if flag == "--spacing" and value not in DDIM_SPACINGS:
        return ["--sampler", "unipc", "--steps", "10"]
    return []


def test_every_documented_choice_passes_the_real_parser(tmp_path, capsys):
    """Issue: --tile on / --tile off always failed (the override became a YAML boolean)."""
    src = _inputs(tmp_path / "lr")
    pairs = _choice_options(build_parser())
    assert (
        ("--tile", "on") in pairs and ("--tile", "off") in pairs and ("--format", "same") in pairs
    )
    for flag, value in pairs:
        argv = ["-i", str(src), "-o", str(tmp_path / "o"), "--config", CONFIG, "--dry-run"]
        # the solver spacings are documented for the solvers (ddim takes uniform|quad)
        assert main([*argv, *_sampler_for(flag, value), flag, value]) == 0, (
            flag,
            value,
            capsys.readouterr().err,
        )
    out = capsys.readouterr().out
    assert "mode: 'on'" in out or "mode: on" in out
    for flag, value in (("--tile-size", "32"), ("--tile-overlap", "8"), ("--vae-tile-size", "16")):
        assert main([*argv, flag, value]) == 0


@pytest.mark.parametrize("mode", ["on", "off"])
def test_tile_on_and_off_run_end_to_end(weights_dir, tmp_path, mode):
    src = _inputs(tmp_path / "lr", ("a.png",))
    assert main(_argv(src, tmp_path / "o", weights_dir, "--tile", mode, "--tile-size", "4",
                      "--tile-overlap", "2")) == 0  # fmt: skip
    assert Image.open(tmp_path / "o" / "a.png").size == (40, 32)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("tiling.latent_tyle=64", "unknown parameter(s) ['latent_tyle'] for section 'tiling'"),
        ("sampler.step=3", "unknown parameter(s) ['step'] for section 'sampler'"),
        ("sampler.steps=many", "parameter 'steps' of section 'sampler' must be int"),
        ("tiling.mode=sometimes", "'mode' of section 'tiling' must be one of 'auto', 'on', 'off'"),
        ("color_fix=sharp", "color_fix must be one of ['adain', 'wavelet', 'none']"),
        ("sampler.steps=[1,", "bad --set 'sampler.steps=[1,'"),
        ("unet.target=unet_typo", "unet: unknown config target 'unet_typo'"),
        ("tiling.tile_batch=two", "parameter 'tile_batch' of section 'tiling' must be int"),
        ("stages=[0,500,400,1000]", "stage boundaries must strictly increase"),
        ("tiling", "--set values must look like key=value"),
    ],
)
def test_config_mistakes_are_one_line_with_dry_run(tmp_path, capsys, setting, message):
    src = _inputs(tmp_path / "lr")
    argv = ["-i", str(src), "-o", str(tmp_path / "o"), "--config", CONFIG, "--dry-run"]
    assert main([*argv, "--set", setting]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_outputs_never_replace_inputs(weights_dir, tmp_path, capsys, no_work, monkeypatch):
    """Issue: -i DIR -o DIR --overwrite (or -o . next to the inputs) replaced the LR inputs."""
    src = _inputs(tmp_path / "lr")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for extra in ([], ["--overwrite"], ["--format", "same"], ["--overwrite", "--dry-run"]):
        assert main(_argv(src, src, weights_dir, *extra)) == 2
        err = capsys.readouterr().err
        assert "refusing to write over input files" in err and "a.png" in err
    monkeypatch.chdir(src)
    assert main(_argv("a.png", ".", weights_dir, "--overwrite")) == 2
    assert "refusing to write over input files" in capsys.readouterr().err
    os.link(src / "b.png", tmp_path / "hard.png")  # a hard link is the same file too
    (tmp_path / "o").mkdir()
    os.symlink(src / "a.png", tmp_path / "o" / "a.png")  # an output name that links to an input
    assert main(_argv(src, tmp_path / "o", weights_dir, "--overwrite")) == 2
    assert "a.png" in capsys.readouterr().err
    assert main(_argv(tmp_path / "hard.png", src / "..", weights_dir, "--overwrite")) == 2
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_the_output_side_is_checked_before_any_work(weights_dir, tmp_path, capsys, no_work):
    src = _inputs(tmp_path / "lr")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(_argv(src, a_file, weights_dir)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(_argv(src, a_file / "sub", weights_dir)) == 2
    assert "cannot be created or written" in capsys.readouterr().err
    (src / "noext").write_bytes((src / "a.png").read_bytes())
    (src / "c.gif").write_bytes(b"GIF89a")
    for name, message in (("noext", "has no extension"), ("c.gif", "cannot write images")):
        assert main(_argv(src / name, tmp_path / "o", weights_dir, "--format", "same")) == 2
        assert message in capsys.readouterr().err
    (src / "a.jpg").write_bytes(b"")
    assert main(_argv(src, tmp_path / "o", weights_dir)) == 2  # a.png and a.jpg -> a.png
    assert "would both write" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # the checks leave nothing behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_any_work(weights_dir, tmp_path, capsys,
                                                               no_work):  # fmt: skip
    src = _inputs(tmp_path / "lr")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert main(_argv(src, ro, weights_dir)) == 2
    assert "cannot be created or written" in capsys.readouterr().err


def test_a_failed_write_is_reported_and_the_batch_goes_on(weights_dir, tmp_path, capsys):
    src = _inputs(tmp_path / "lr", ("a.png", "b.png", "c.png"))
    out = tmp_path / "o"
    (out / "b.png").mkdir(parents=True)  # the output path of b is taken by a folder
    assert main(_argv(src, out, weights_dir, "--overwrite")) == 1
    err = capsys.readouterr().err
    assert "b.png: cannot write" in err and "1 problem" in err
    assert Image.open(out / "a.png").size == Image.open(out / "c.png").size == (40, 32)


def test_png_by_default_and_the_input_type_on_request(weights_dir, tmp_path, caplog):
    """Issue: JPEG/GIF/WebP inputs were re-encoded lossily without a word."""
    src = tmp_path / "lr"
    src.mkdir()
    Image.fromarray(np.full((4, 5, 3), 90, np.uint8)).save(src / "p.jpg", quality=95)
    assert main(_argv(src, tmp_path / "o", weights_dir)) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["p.png"]
    caplog.set_level("WARNING")
    assert main(_argv(src, tmp_path / "o2", weights_dir, "--format", "same")) == 0
    assert Image.open(tmp_path / "o2" / "p.jpg").format == "JPEG"
    assert "lossy" in caplog.text


def test_broken_symlinks_in_an_input_folder_are_reported(weights_dir, tmp_path, capsys):
    src = _inputs(tmp_path / "lr", ("a.png",))
    os.symlink(tmp_path / "gone.png", src / "z.png")
    assert main(_argv(src, tmp_path / "o", weights_dir)) == 1
    assert "z.png: broken symbolic link" in capsys.readouterr().err
    assert (tmp_path / "o" / "a.png").is_file()


def test_a_file_of_the_wrong_kind_names_what_it_holds(release, weights_dir, tmp_path, capsys):
    """Issue: an expert file as --vae-ckpt (or the FA-VAE as an expert) gave a key listing
    instead of saying what the file holds and what was expected."""
    src = _inputs(tmp_path / "lr", ("a.png",))
    ours = [str(weights_dir / f"expert_stage{k}.safetensors") for k in range(4)]
    released = [str(release / f"moe_stage{k}.ckpt") for k in range(4)]
    fa_st, fa_pth = str(weights_dir / "fa_vae.safetensors"), str(release / "fa_vae.pth")
    cases = [
        (ours, ours[0], "expert_stage0.safetensors holds a unet ('unet'), expected autoencoder"),
        ([fa_st, *ours[1:]], fa_st, "fa_vae.safetensors holds an autoencoder ('fa_vae_vq_f4'), "
                                    "expected unet"),
        (released, released[0], "moe_stage0.ckpt holds a latent-diffusion UNet training "
                                "checkpoint (model.diffusion_model.* / model_ema.*), expected "
                                "the FA-VAE"),
        ([fa_pth, *released[1:]], fa_pth, "It holds an FA-VAE (encoder, decoder with fuse "
                                          "layers), expected an SS-MoE stage expert"),
    ]  # fmt: skip
    for experts, vae, message in cases:
        argv = ["-i", str(src), "-o", str(tmp_path / "o"), "--config", CONFIG, "--ckpt",
                *experts, "--vae-ckpt", vae, "--quiet"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def _read_stream(stream, chunks: list[bytes]) -> None:
    for chunk in iter(lambda: stream.read(64), b""):
        chunks.append(chunk)


def test_ctrl_c_prints_one_line_and_exits_130(weights_dir, tmp_path):
    src = _inputs(tmp_path / "lr", ("a.png",))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = _argv(src, tmp_path / "o", weights_dir)
    argv[argv.index("--steps") + 1] = "999"
    argv.remove("--quiet")
    proc = subprocess.Popen([sys.executable, "-m", "moe_sr", *argv], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)  # fmt: skip
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_stream, args=(proc.stderr, chunks), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"steps" not in b"".join(chunks) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    reader.join(timeout=10)
    err = b"".join(chunks).decode()
    assert "Traceback" not in err
    assert "moe-sr: interrupted" in err


def test_release_script_without_a_virtualenv_says_what_to_do(tmp_path):
    """Issue: inf_moe_8x.sh without an activated venv ended in a ModuleNotFoundError."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "inf_moe_8x.sh"
    script.write_text((ROOT / "scripts" / "inf_moe_8x.sh").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"  # a system python3 without torch / moe_sr
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         cwd=tmp_path)  # fmt: skip
    assert res.returncode == 2
    assert "cannot import moe_sr" in res.stderr and "Traceback" not in res.stderr
    # an activated virtualenv is found without PYTHON
    env.update(VIRTUAL_ENV=str(Path(sys.executable).parent.parent), PYTHONPATH=str(ROOT))
    res = subprocess.run(["bash", str(script), "--help"], env=env, capture_output=True,
                         text=True, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0 and "--offload" in res.stdout, res.stderr


def test_moe_sr_eval_takes_the_same_documented_choices(tmp_path, capsys):
    """moe-sr-eval shares the pipeline options: its --tile on / off pass the real parser too."""
    pytest.importorskip("pyiqa")
    from moe_sr.cli.eval_pipeline import build_parser as eval_parser
    from moe_sr.cli.eval_pipeline import main as eval_main

    lr = _inputs(tmp_path / "lr", ("a.png",))
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(hr / "a.png")
    base = ["--lr", str(lr), "--hr", str(hr), "--out", str(tmp_path / "run"), "--config", CONFIG,
            "--metrics", "psnr", "--dry-run", "--quiet"]  # fmt: skip
    pairs = _choice_options(eval_parser())
    assert ("--tile", "on") in pairs
    for flag, value in pairs:
        argv = [*base, *_sampler_for(flag, value), flag, value]
        assert eval_main(argv) == 0, (flag, value, capsys.readouterr().err)
