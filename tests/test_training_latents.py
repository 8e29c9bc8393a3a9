"""Latent cache + latent_folder dataset (aligned crops/flips), training from the cache, and the
committed train configs resolving to valid module parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm.cli.cache_latents import main as cache_main
from ldm.cli.train import main as train_main
from ldm.config import CONFIG_ROOT, check_params, instantiate
from ldm.training.data import LatentFolderDataset

TINY = str(CONFIG_ROOT / "train" / "tiny_sr.yaml")


def _whole_images(folder):
    return {"target": "sr_folder",
            "params": {"root_or_filelist": str(folder), "crop_size": None, "flip": False}}  # fmt: skip


def test_latent_folder_crops_and_flips_stay_aligned(tmp_path):
    from test_training_run import make_hr_folder

    hr_dir = make_hr_folder(tmp_path / "hr", n=2)
    base = instantiate(_whole_images(hr_dir))
    lat_dir = tmp_path / "lat"
    lat_dir.mkdir()
    for i in range(len(base)):  # fake "latents": the HR image average-pooled by 4
        item = base[i]
        z = F.avg_pool2d(item["hr"][None], 4)[0]
        save_file({"latent": z.contiguous()}, str(lat_dir / f"img{i}.safetensors"))
    ds = LatentFolderDataset(_whole_images(hr_dir), lat_dir, crop_size=32, flip=True, seed=1)
    flipped = 0
    for i in range(len(ds)):
        for _ in range(4):
            ds.seed += 1
            item = ds[i]
            assert item["hr"].shape == (3, 32, 32) and item["latent"].shape == (3, 8, 8)
            assert item["lr_up2"].shape == (3, 8, 8) and item["lr"].shape == (3, 4, 4)
            torch.testing.assert_close(item["latent"], F.avg_pool2d(item["hr"][None], 4)[0])
            full = base[i]["hr"]
            flipped += int(not any(torch.equal(item["hr"], full[:, t : t + 32, c : c + 32])
                                   for t in range(0, full.shape[1] - 31, 8)
                                   for c in range(0, full.shape[2] - 31, 8)))  # fmt: skip
    assert 0 < flipped < 8
    with pytest.raises(FileNotFoundError, match="save-latents"):
        LatentFolderDataset(_whole_images(hr_dir), tmp_path)[0]


def test_cache_then_train_from_cache(tmp_path):
    from test_training_run import FAST, make_hr_folder

    hr_dir = make_hr_folder(tmp_path / "hr", n=3)
    out = tmp_path / "latents"
    assert cache_main(["--base", TINY, "--images", str(hr_dir), "--out", str(out)]) == 0
    files = sorted(out.glob("*.safetensors"))
    assert [f.stem for f in files] == ["img0", "img1", "img2"]
    from safetensors.torch import load_file

    z = load_file(str(files[0]))["latent"]
    assert z.shape == (3, 18, 20)  # 72x80 HR (a multiple of 8) / 4 (tiny vq-f4)
    data = (
        "data.train:={target: latent_folder, params: {latent_dir: '" + str(out) + "', "
        "crop_size: 64, flip: true, dataset: {target: sr_folder, params: {root_or_filelist: '"
        + str(hr_dir) + "', crop_size: null, flip: false}}}}"
    )  # fmt: skip
    logdir = tmp_path / "logs"
    assert train_main(["--base", TINY, "-l", str(logdir), data, "model.params.first_stage=null",
                       "model.params.scale_factor=1.0", *FAST, "lightning.image_logger=null",
                       "lightning.trainer.max_steps=2"]) == 0  # fmt: skip
    (run_dir,) = logdir.iterdir()
    sd = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("first_stage_model.") for k in sd)


@pytest.mark.parametrize(
    "name",
    [
        "sr8x_unet",
        "sr8x_stage",
        "tiny_sr",
        "tiny_stage",
        "fa_vae_vq_f4",
        "fa_vae_tiny",
        "fa_vae_kl_f8",
        "fa_vae_kl_tiny",
    ],  # fmt: skip
)
def test_train_configs_resolve_to_valid_parameters(name):
    import ldm.training.targets  # noqa: F401
    from ldm.registry import lookup
    from ldm.training.data import DataModuleFromConfig
    from ldm.training.run import compose_config

    cfg = compose_config([str(CONFIG_ROOT / "train" / f"{name}.yaml")], [])
    check_params(lookup(cfg.model.target), cfg.model.params, cfg.model.target)
    check_params(DataModuleFromConfig, cfg.data, "data")
    params = cfg.model.params
    for key in ("unet", "autoencoder", "first_stage", "timestep_sampler"):
        spec = params.get(key)
        if spec is not None:
            check_params(lookup(spec.target), spec.get("params", {}), spec.target)
    if "stage" in cfg:
        assert params.timestep_sampler.params.stage == cfg.stage


def test_stage_override_reaches_the_sampler():
    from ldm.training.run import compose_config

    cfg = compose_config([str(CONFIG_ROOT / "train" / "sr8x_stage.yaml")], ["stage=2"])
    sampler = instantiate(cfg.model.params.timestep_sampler)
    assert sampler.interval == (500, 750)
