"""The demo: data preparation, exports, evaluation, the demo CLI (tiny random weights) and the
committed demo weights (assets/demo, skipped only while they are not committed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fa_vae.model import fa_vae_from_autoencoder
from ldm.checkpoint import CheckpointError, load_pretrained, save_pretrained
from ldm.config import CONFIG_ROOT, instantiate, load_config, to_plain
from ldm.data.resize import imresize
from moe_sr import demo_recipe
from moe_sr.checkpoints import save_expert
from moe_sr.cli.demo import main as demo_main
from moe_sr.export import export_autoencoder, release_copy

REPO = CONFIG_ROOT.parent
DEMO_WEIGHTS = REPO / "assets" / "demo"
EXAMPLES = REPO / "assets" / "examples"
TINY_UNET = "unet/sr8x_expert_tiny"
TINY_VAE = "fa_vae/vq_f4_fa_tiny"


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------- data


def test_recipe_tables_hold_out_coffee_chelsea_rocket_and_never_use_cat():
    train_src = {src for _, src in demo_recipe.TRAIN_IMAGES}
    held = {src for _, src in demo_recipe.HOLDOUT_IMAGES}
    assert held == {"skimage:coffee", "skimage:chelsea", "skimage:rocket"}
    assert not train_src & held
    assert "skimage:cat" not in train_src  # skimage's cat is the chelsea photograph
    for _, src in demo_recipe.TRAIN_IMAGES:  # every source ships in an installed package
        img = demo_recipe.package_photo(src)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3
    assert {stem for stem, _, _ in demo_recipe.EXAMPLE_CROPS} <= {
        s for s, _ in demo_recipe.HOLDOUT_IMAGES
    }


def test_prepare_demo_data_small(tmp_path, monkeypatch):
    monkeypatch.setattr(
        demo_recipe, "TRAIN_IMAGES", (("coins", "skimage:coins"), ("logo", "skimage:logo"))
    )
    monkeypatch.setattr(demo_recipe, "HOLDOUT_IMAGES", (("chelsea", "skimage:chelsea"),))
    out = demo_recipe.prepare_demo_data(tmp_path / "a", fa_crops=3, fa_crop_size=64, repeats=2)
    assert [p.name for p in out["train"]] == ["coins.png", "logo.png"]
    assert [p.name for p in out["holdout"]] == ["chelsea.png"]
    assert len(out["fa_crops"]) == 3
    for group in ("train", "holdout", "fa_crops"):
        for hr_path in out[group]:
            hr = _png(hr_path)
            lr = _png(hr_path.parent.parent / "lr" / hr_path.name)
            assert hr.shape[0] % 8 == 0 and hr.shape[1] % 8 == 0
            assert lr.shape == (hr.shape[0] // 8, hr.shape[1] // 8, 3)
            np.testing.assert_array_equal(lr, imresize(hr, output_shape=lr.shape[:2]))
    chelsea = _png(tmp_path / "a" / "holdout" / "hr" / "chelsea.png")
    assert chelsea.shape == (296, 448, 3)  # 300 x 451 centre-trimmed to multiples of 8
    logo = _png(tmp_path / "a" / "train" / "hr" / "logo.png")
    assert (logo[0, 0] == 255).all()  # transparent corner composited over white
    lines = (tmp_path / "a" / "train" / "epoch.txt").read_text().splitlines()
    assert [x for x in lines if not x.startswith("#")] == ["hr/coins.png", "hr/logo.png"] * 2
    # deterministic: a second run writes the same bytes
    demo_recipe.prepare_demo_data(tmp_path / "b", fa_crops=3, fa_crop_size=64, repeats=2)
    for p in sorted((tmp_path / "a").rglob("*.png")):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()


def test_bundled_examples_are_the_recipes_crops(tmp_path):
    written = demo_recipe.make_examples(tmp_path)
    assert [p.name for p in written] == ["coffee.png", "chelsea.png", "rocket.png"]
    for p in written:
        for kind in ("lr", "hr"):
            bundled = EXAMPLES / kind / p.name
            assert bundled.is_file(), (
                f"{bundled} is missing: python -m moe_sr.cli.demo_recipe examples"
            )
            np.testing.assert_array_equal(_png(bundled), _png(tmp_path / kind / p.name))
    assert _png(EXAMPLES / "lr" / "coffee.png").shape == (32, 32, 3)
    assert sum(f.stat().st_size for f in EXAMPLES.rglob("*.png")) < 500_000


# --------------------------------------------------------------------------- exports


def _tiny_vae():
    torch.manual_seed(0)
    cfg = load_config(TINY_VAE)
    return cfg, instantiate(cfg)


def test_export_autoencoder_roundtrip_and_wrong_checkpoint(tmp_path):
    cfg, vae = _tiny_vae()
    state = {"model." + k: v for k, v in vae.state_dict().items()}
    state["discriminator.main.0.weight"] = torch.zeros(1)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"autoencoder": to_plain(cfg)}, "state_dict": state}, ckpt)
    out = export_autoencoder(ckpt, tmp_path / "ae.safetensors")
    loaded = load_pretrained(out)
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    torch.save({"state_dict": state}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a training checkpoint of autoencoder_gan"):
        export_autoencoder(tmp_path / "other.ckpt", tmp_path / "x.safetensors")


def test_fa_vae_from_plain_autoencoder(tmp_path):
    torch.manual_seed(1)
    plain_cfg = load_config("autoencoder/vq_f4_tiny")
    plain = instantiate(plain_cfg)
    path = save_pretrained(plain, tmp_path / "vq.safetensors", plain_cfg)
    out = fa_vae_from_autoencoder(path, TINY_VAE, tmp_path / "fa.safetensors")
    fa = load_pretrained(out)
    assert type(fa).__name__ == "FAVQModel"
    fa_sd = fa.state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(fa_sd[k], v, rtol=0, atol=0)
    assert any(k.startswith("decoder.unet_1.") for k in fa_sd)
    with pytest.raises(CheckpointError, match="is not the base of"):
        fa_vae_from_autoencoder(path, "demo/autoencoder", tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- demo CLI


@pytest.fixture()
def tiny_weights(tmp_path) -> Path:
    """Random tiny 2-stage weights in our format (the demo config's stages [0, 500, 1000])."""
    folder = tmp_path / "weights"
    unet_cfg = load_config(TINY_UNET)
    for k, t_range in enumerate([(0, 500), (500, 1000)]):
        torch.manual_seed(k)
        unet = instantiate(unet_cfg)
        save_expert(
            unet,
            folder / f"expert_stage{k}.safetensors",
            config=unet_cfg,
            stage=k,
            num_stages=2,
            t_range=t_range,
        )
    cfg, vae = _tiny_vae()
    save_pretrained(vae, folder / "fa_vae.safetensors", cfg)
    return folder


def _examples(folder: Path, n: int = 2) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    for i in range(n):
        hr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        for kind, img in (("hr", hr), ("lr", imresize(hr, output_shape=(8, 8)))):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / kind / f"ex{i}.png")
    return folder / "lr", folder / "hr"


def test_demo_cli_on_tiny_random_weights(tmp_path, tiny_weights, monkeypatch, capsys):
    monkeypatch.delenv("MOESR_WEIGHTS", raising=False)
    lr_dir, hr_dir = _examples(tmp_path / "ex")
    out = tmp_path / "out"
    argv = ["--demo-weights", str(tiny_weights), "-i", str(lr_dir), "--hr", str(hr_dir),
            "-o", str(out), "--steps", "2", "--device", "cpu", "--quiet"]  # fmt: skip
    assert demo_main(argv) == 0
    for i in range(2):
        assert _png(out / f"ex{i}.png").shape == (64, 64, 3)
        compare = Image.open(out / f"ex{i}_compare.png")
        assert compare.width > 4 * 64  # LR nearest | bicubic | SR | reference
    assert Image.open(out / "comparison.png").height > 2 * 64
    printed = capsys.readouterr().out
    assert str(out / "comparison.png") in printed


def test_demo_cli_missing_weights_names_the_training_script(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MOESR_WEIGHTS", raising=False)
    lr_dir, _ = _examples(tmp_path / "ex", n=1)
    argv = ["--demo-weights", str(tmp_path / "none"), "-i", str(lr_dir), "-o", str(tmp_path)]
    assert demo_main(argv) == 2
    assert "scripts/train_demo.sh" in capsys.readouterr().err
    monkeypatch.setenv("MOESR_WEIGHTS", str(tmp_path))
    assert demo_main(argv) == 2
    assert "moe_stage0..3.ckpt" in capsys.readouterr().err


def test_release_weights_folder_layouts(tmp_path):
    from moe_sr.cli.demo import DemoError, _release_files

    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(4):
        (flat / f"moe_stage{k}.ckpt").touch()
    with pytest.raises(DemoError, match="fa_vae.pth"):
        _release_files(flat)
    (flat / "fa_vae.pth").touch()
    experts, vae = _release_files(flat)
    assert [p.name for p in experts] == [f"moe_stage{k}.ckpt" for k in range(4)]
    assert vae == flat / "fa_vae.pth"
    hub = tmp_path / "hub"
    (hub / "Unet").mkdir(parents=True)
    (hub / "first_stage_models" / "vq-f4").mkdir(parents=True)
    for k in range(4):
        (hub / "Unet" / f"moe_stage{k}.ckpt").touch()
    (hub / "first_stage_models" / "vq-f4" / "fa_vae.pth").touch()
    experts, vae = _release_files(hub)
    assert experts[3] == hub / "Unet" / "moe_stage3.ckpt"
    assert vae == hub / "first_stage_models" / "vq-f4" / "fa_vae.pth"


def test_evaluate_demo_on_tiny_weights(tmp_path, tiny_weights):
    from moe_sr import demo_eval
    from moe_sr.build import build_pipeline_from_folder

    _examples(tmp_path / "holdout", n=2)
    pipe = build_pipeline_from_folder(tiny_weights, "demo/sr8x_demo", device="cpu")
    pairs = demo_eval.holdout_pairs(tmp_path / "holdout")
    report = demo_eval.evaluate_images(pipe, pairs, steps=2, sr_out=tmp_path / "sr")
    row = report.rows[0]
    assert row["image"] == "ex0" and row["size"] == "64x64"
    assert 0 < row["bicubic_psnr"] < 20  # random images: bicubic cannot restore them
    for key in ("sr", "bicubic"):
        for metric in ("psnr", "ssim", "lpips", "dists", "border", "grid", "delta_e"):
            assert np.isfinite(row[f"{key}_{metric}"]), (key, metric)
    assert (tmp_path / "sr" / "ex0.png").is_file()
    assert not report.passed  # random weights miss the targets, and the report says so
    names = [what for what, _, _ in report.checks]
    assert "mean: LPIPS <= 0.8 x bicubic" in names and "ex1: DISTS below bicubic" in names
    md = demo_eval.results_markdown(report, settings="ddim, 2 steps")
    assert "| ex0 | 64x64 |" in md and "**FAIL**" in md and "| **mean** |" in md


def test_targets_hold_per_image_and_the_mean_grid_check_averages_ratios():
    from moe_sr import demo_eval

    good = {"sr_lpips": 0.4, "bicubic_lpips": 0.55, "sr_dists": 0.28, "bicubic_dists": 0.3,
            "sr_psnr": 26.0, "bicubic_psnr": 26.5, "sr_border": 0.9, "bicubic_border": 0.8,
            "sr_delta_e": 0.7, "fa_psnr": 30.5, "ae_psnr": 30.0, "sr_grid": 1.6,
            "bicubic_grid": 1.5}  # fmt: skip
    rows = [
        # a detailed outer band: bicubic's own ratio (1.33) is the bound, and 1.29 is below it
        {"image": "a", **good, "grid_ratio": 1.6 / 1.5, "sr_border": 1.29, "bicubic_border": 1.33},
        # a periodic pattern bicubic lacks; a mean of raw values would hide it behind "b"
        # and a frame of worse pixels that bicubic does not have
        {"image": "c", **good, "sr_grid": 9.0, "bicubic_grid": 1.2, "grid_ratio": 7.5,
         "sr_border": 1.3, "bicubic_border": 0.9},
        {"image": "b", **good, "sr_grid": 5.0, "bicubic_grid": 40.0, "grid_ratio": 0.125},
    ]  # fmt: skip
    report = demo_eval.DemoReport(rows, codebook_usage=0.6)
    checks = {what: ok for what, ok, _ in demo_eval.check_targets(report)}
    grid = "grid peakiness <= 1.5 x bicubic"
    assert checks[f"a: {grid}"] and checks[f"b: {grid}"] and not checks[f"c: {grid}"]
    border = "border error <= 1.25 x interior (or bicubic's ratio, if higher)"
    assert checks[f"a: {border}"] and checks[f"b: {border}"] and not checks[f"c: {border}"]
    assert not checks[f"mean: {grid}"]  # mean ratio 2.9, though mean SR 5.2 < mean bicubic 14.2
    assert checks["mean: LPIPS <= 0.8 x bicubic"] and checks["codebook usage >= 50% of the codes"]
    assert checks["mean: PSNR >= bicubic - 1.0 dB"]


def test_release_copy_halves_and_loads_back(tmp_path, tiny_weights):
    src = tiny_weights / "fa_vae.safetensors"
    dst = release_copy(src, tmp_path / "fa_vae.safetensors")
    assert dst.stat().st_size < 0.6 * src.stat().st_size
    a, b = load_pretrained(src), load_pretrained(dst)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert y.dtype == x.dtype  # loaded back as the model's float32
        assert torch.allclose(x, y, atol=1e-2 * max(1.0, float(x.abs().max()))), k


# --------------------------------------------------------------------------- committed weights


def _committed() -> list[Path]:
    return sorted(DEMO_WEIGHTS.glob("*.safetensors"))


@pytest.mark.skipif(
    not _committed(),
    reason="assets/demo/*.safetensors are not committed yet (train them: scripts/train_demo.sh)",
)
def test_committed_demo_weights_run_the_pipeline():
    from moe_sr.build import build_pipeline_from_folder

    files = _committed()
    assert {p.name for p in files} == {
        "expert_stage0.safetensors",
        "expert_stage1.safetensors",
        "fa_vae.safetensors",
    }
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert (DEMO_WEIGHTS / "RESULTS.md").is_file()
    pipe = build_pipeline_from_folder(DEMO_WEIGHTS, "demo/sr8x_demo", device="cpu")
    assert pipe.stages.num_stages == 2
    lr = _png(EXAMPLES / "lr" / "chelsea.png")[:16, :16]
    out = pipe(lr, steps=4).image
    assert out.shape == (3, 128, 128) and torch.isfinite(out).all()
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0

    # Trained, not random: each expert predicts the noise of the held-out crop's latent in its
    # own stage far better than chance (MSE 1 for eps = 0; random experts give > 1).
    from ldm.data.sr_inputs import make_sr_inputs

    hr = torch.from_numpy(_png(EXAMPLES / "hr" / "chelsea.png")[:128, :128].copy())
    hr = hr.permute(2, 0, 1)[None].float() / 127.5 - 1
    inputs = make_sr_inputs(lr, factor=8)
    with torch.no_grad():
        z0 = pipe.vae.encode(hr)
        gen = torch.Generator().manual_seed(0)
        for k, t_value in ((0, 250), (1, 750)):
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.full((1,), t_value, dtype=torch.long)
            x_t = pipe.schedule.q_sample(z0 * pipe.vae.scale_factor, t, noise)
            eps = pipe.unets[k](torch.cat([x_t, inputs.cond_x2], 1), t)
            assert float(torch.mean((eps - noise) ** 2)) < 0.5, f"expert {k}"


def _from_current_recipe() -> bool:
    """The committed experts were trained with today's demo UNet config (older weights, made
    before the recipe of issue 12, carry another config in their metadata)."""
    from moe_sr.checkpoints import read_expert_metadata

    files = [p for p in _committed() if p.name.startswith("expert_stage")]
    want = to_plain(load_config("demo/unet"))
    return bool(files) and all(read_expert_metadata(p).get("config") == want for p in files)


@pytest.mark.slow
@pytest.mark.skipif(
    not _from_current_recipe(),
    reason="the committed demo weights predate the current recipe (their UNet config is not "
    "configs/demo/unet.yaml): retrain them with OUT=assets/demo bash scripts/train_demo.sh",
)
def test_committed_demo_weights_meet_the_targets_on_a_held_out_photo():
    """Issue 12's quality checks (LPIPS, DISTS, PSNR against bicubic, border, latent-grid
    pattern, colour, FA-VAE above the plain decode) on chelsea, never trained on, at the demo's
    default sampling settings: a regression in the pipeline or the weights fails CI."""
    from moe_sr import demo_eval
    from moe_sr.build import build_pipeline_from_folder

    stem, source = next(x for x in demo_recipe.HOLDOUT_IMAGES if x[0] == "chelsea")
    hr = demo_recipe.trim_to_multiple(demo_recipe.package_photo(source))
    pipe = build_pipeline_from_folder(DEMO_WEIGHTS, "demo/sr8x_demo", device="cpu")
    report = demo_eval.evaluate_images(pipe, [(stem, hr, demo_recipe.downscale(hr))])
    usage = [c for c in report.checks if c[0].startswith("codebook usage")]
    per_image = [c for c in report.checks if c not in usage]  # usage is a held-out-set target
    missed = [f"{what}: {detail}" for what, ok, detail in per_image if not ok]
    assert not missed, missed


@pytest.mark.skipif(len(_committed()) < 3, reason="assets/demo/*.safetensors are not committed yet")
def test_inf_moe_8x_script_with_the_demo_weights(tmp_path):
    """The release-style script runs end to end on weights made by our own training."""
    import os
    import subprocess
    import sys

    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    lr = _png(REPO / "assets" / "examples" / "lr" / "coffee.png")[:12, :20]
    Image.fromarray(lr).save(lr_dir / "crop.png")
    env = dict(
        os.environ,
        WEIGHTS_DIR=str(REPO / "assets" / "demo"),
        CONFIG_PATH=str(REPO / "configs" / "demo" / "sr8x_demo.yaml"),
        INPUT_PATH=str(lr_dir),
        OUTPUT_PATH=str(tmp_path / "sr"),
        SAMPLE_STEPS="2",
        DEVICE="cpu",
        PYTHON=sys.executable,
    )
    subprocess.run(
        ["bash", str(REPO / "scripts" / "inf_moe_8x.sh"), "--quiet"], env=env, check=True
    )
    out = np.asarray(Image.open(tmp_path / "sr" / "crop.png"))
    assert out.shape == (96, 160, 3)
