"""Scaling the SR CLI: batches (--batch-size), sharding over torchrun processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.diffusion.schedule import NoiseSchedule
from moe_sr.batching import group_batches
from moe_sr.build import build_pipeline, export_pipeline
from moe_sr.cli.sr import main
from moe_sr.distributed import Shard
from tests.moe_sr_helpers import released_state_dict, tiny_fa_vae, tiny_unets

CONFIG = "moe_sr/sr8x_tiny"
ROOT = Path(__file__).resolve().parent.parent
SIZES = [(5, 6), (6, 6), (5, 6), (7, 4), (5, 6)]  # three of one size, two others


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    buffers = NoiseSchedule.linear().ldm_buffers()
    paths = []
    for k, unet in enumerate(tiny_unets()):
        paths.append(folder / f"moe_stage{k}.ckpt")
        torch.save(released_state_dict(unet.state_dict(), unet.state_dict(), buffers), paths[-1])
    torch.save(tiny_fa_vae().state_dict(), folder / "fa_vae.pth")
    ours = tmp_path_factory.mktemp("ours")
    export_pipeline(build_pipeline(CONFIG, paths, folder / "fa_vae.pth"), ours)
    return ours


@pytest.fixture(scope="module")
def lr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lr")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _argv(src, out, weights_dir, *extra):
    return ["-i", str(src), "-o", str(out), "--weights-dir", str(weights_dir), "--config",
            CONFIG, "--steps", "3", "--quiet", *extra]  # fmt: skip


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


# ----------------------------------------------------------------------------- batches
def test_group_batches_by_size_in_order():
    items = ["a1", "b1", "a2", "c1", "a3", "b2", "x", "a4"]
    key = {"a": "A", "b": "B", "c": "C", "x": None}
    got = list(group_batches(items, lambda s: key[s[0]], 3))
    assert got == [["a1", "a2", "a3"], ["x"], ["b1", "b2"], ["c1"], ["a4"]]
    assert list(group_batches(items, lambda s: key[s[0]], 1)) == [[i] for i in items]
    # more than max_pending waiting: the oldest group goes as it is
    got = list(group_batches(["a1", "b1", "c1", "a2"], lambda s: s[0], 3, max_pending=2))
    assert got == [["a1"], ["b1"], ["c1"], ["a2"]]
    with pytest.raises(ValueError, match="batch size"):
        list(group_batches(items, str, 0))


def test_cli_batches_give_the_images_of_single_runs(weights_dir, lr_folder, tmp_path):
    """--batch-size 3 groups the three 5x6 images; every output equals the one-at-a-time run
    (up to one 8-bit level where batched kernels round differently)."""
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(_argv(lr_folder, one, weights_dir)) == 0
    assert main(_argv(lr_folder, three, weights_dir, "--batch-size", "3")) == 0
    a, b = _pixels(one), _pixels(three)
    assert list(a) == [f"{i}.png" for i in range(5)] == list(b)
    for name in a:
        diff = np.abs(a[name].astype(int) - b[name].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, name


def test_cli_sampler_options(weights_dir, lr_folder, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_argv(lr_folder, out, weights_dir, "--sampler", "dpmpp-2m", "--spacing",
                      "karras")) == 0  # fmt: skip
    assert len(_pixels(out)) == 5
    assert main(_argv(lr_folder, out, weights_dir, "--sampler", "unipc", "--eta", "1")) == 2
    assert "deterministic" in capsys.readouterr().err
    assert main(_argv(lr_folder, out, weights_dir, "--spacing", "karras")) == 2
    assert "ddim spacing" in capsys.readouterr().err
    assert main(_argv(lr_folder, out, weights_dir, "--batch-size", "0")) == 2
    assert "--batch-size" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sharding
def test_shards_split_the_sorted_list_and_pick_devices(monkeypatch):
    items = list(range(7))
    shards = [Shard(r, 3, r) for r in range(3)]
    parts = [s.take(items) for s in shards]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]] and sorted(sum(parts, [])) == items
    assert Shard().take(items) == items and not Shard().distributed
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Shard.from_env() == Shard(1, 2, 1)
    assert Shard(1, 2, 1).device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert Shard(1, 2, 1).device(None) is None
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 WORLD_SIZE=2"):
        Shard.from_env()


@pytest.mark.slow
def test_torchrun_two_processes_write_the_files_of_one(weights_dir, lr_folder, tmp_path):
    """torchrun with 2 CPU processes on 5 images: exactly the files and bytes of one process;
    rank 0 prints one summary; a second run skips everything."""
    single = tmp_path / "single"
    assert main(_argv(lr_folder, single, weights_dir)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "moe_sr", *_argv(lr_folder, sharded, weights_dir)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("2 processes") == 1
    assert "rank 0: 3 done" in proc.stdout and "rank 1: 2 done" in proc.stdout
    files = sorted(p.name for p in single.iterdir())
    assert files == sorted(p.name for p in sharded.iterdir())
    for name in files:
        assert (single / name).read_bytes() == (sharded / name).read_bytes(), name
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "rank 1: 0 done, 2 skipped" in again.stdout
