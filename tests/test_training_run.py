"""The tiny SR training config end to end: train, resume, dry-run, DDP on two CPU processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.train import main
from ldm.config import CONFIG_ROOT

TINY = str(CONFIG_ROOT / "train" / "tiny_sr.yaml")
FAST = [
    "lightning.image_logger.every_n_steps=2",
    "lightning.image_logger.sample_steps=2",
    "lightning.checkpoint.every_n_train_steps=2",
    "lightning.loggers=[csv]",
]


def make_hr_folder(folder: Path, n: int = 4, size: tuple[int, int] = (72, 80)) -> Path:
    """A few random smooth-ish RGB images (bigger than the 64 px crop)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size[1], size[0]), Image.BICUBIC)
        img.save(folder / f"img{i}.png")
    return folder


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_dry_run_prints_resolved_config(tmp_path, capsys):
    rc = main(
        ["--base", TINY, "--dry-run", "--logdir", str(tmp_path / "logs"), "data.batch_size=3"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "target: diffusion_sr" in out
    assert "batch_size: 3" in out
    assert "${" not in out  # resolved (presets and interpolations)
    assert "ffn_moe_experts: 4" in out  # the UNet preset was pulled in
    assert not (tmp_path / "logs").exists()


def test_bad_config_section_is_a_clear_error(tmp_path, capsys):
    rc = main(["--base", TINY, "--dry-run", "modle.params.x=1"])
    assert rc == 2
    assert "unknown top-level config section(s) ['modle']" in capsys.readouterr().err


def _csv_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")})


def _tensorboard_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: set[int] = set()
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            steps |= {e.step for e in acc.Scalars("train/loss")}
    return sorted(steps)


def test_tiny_train_then_resume(tmp_path):
    hr = make_hr_folder(tmp_path / "hr")
    logdir = tmp_path / "logs"
    common = [f"data.train.params.folder={hr}", *FAST, "lightning.loggers=[tensorboard,csv]"]
    assert main(["--base", TINY, "-l", str(logdir), "-n", "tiny", *common,
                 "lightning.trainer.max_steps=3"]) == 0  # fmt: skip
    (run_dir,) = logdir.iterdir()
    assert run_dir.name.endswith("_tiny")
    last = run_dir / "checkpoints" / "last.ckpt"
    ck = _ckpt(last)
    assert ck["global_step"] == 3
    sd = ck["state_dict"]
    assert int(sd["model_ema.num_updates"]) == 3
    assert sd["model_ema.num_updates"].dtype == torch.int32
    # LDM layout: schedule buffers, raw UNet, EMA, first stage
    assert list(sd)[0] == "betas"
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd)
    assert any(k.startswith("first_stage_model.encoder.") for k in sd)
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert len(list((run_dir / "configs").glob("*-project.yaml"))) == 1
    grid = run_dir / "images" / "train" / "step-000002.png"
    assert grid.is_file()
    w, h = Image.open(grid).size
    assert w > h  # one row per image, three columns: LR | sample | HR
    ema_before = sd["model_ema.diffusion_modelout2weight"].clone()
    assert _csv_steps(run_dir) == [0, 1, 2] == _tensorboard_steps(run_dir)

    # resume from the run folder: counters continue from step 3 to 5
    assert main(["-r", str(run_dir), *common, "lightning.trainer.max_steps=5"]) == 0
    assert [p.name for p in logdir.iterdir()] == [run_dir.name]  # same run folder
    ck2 = _ckpt(last)
    assert ck2["global_step"] == 5
    assert int(ck2["state_dict"]["model_ema.num_updates"]) == 5
    assert not torch.equal(ck2["state_dict"]["model_ema.diffusion_modelout2weight"], ema_before)
    assert len(list((run_dir / "configs").glob("*-project.yaml"))) >= 1
    # the first run's history survives the resume (Lightning deleted metrics.csv), and the
    # logged steps go on past the first run's last
    assert _csv_steps(run_dir) == [0, 1, 2, 3, 4] == _tensorboard_steps(run_dir)
    with open(run_dir / "csv" / "metrics.csv") as f:
        lrs = {float(r["lr-AdamW"]) for r in csv.DictReader(f) if r.get("lr-AdamW")}
    # LDM scaling: 1 accumulation x 1 device x batch 2 x base rate 2.5e-5
    assert lrs and all(v == pytest.approx(2 * 2.5e-5) for v in lrs)


def test_resume_errors_are_clear(tmp_path, capsys):
    assert main(["-r", str(tmp_path / "nope")]) == 2
    assert "no such run folder or checkpoint" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["-r", str(tmp_path / "run")]) == 2
    assert "last.ckpt does not exist" in capsys.readouterr().err


class _Payload:
    """Unpickling this runs code (what a malicious checkpoint would do)."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_resume_from_a_truncated_or_malicious_checkpoint_is_one_line(tmp_path, capsys):
    """Issue: resuming gave torch's advice to set weights_only=False; now the message of every
    other loader, before Lightning opens the file, and nothing of the run changes."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "a-project.yaml").write_text(Path(TINY).read_text())
    last = run / "checkpoints" / "last.ckpt"
    good = {"state_dict": {"w": torch.zeros(64, 64)}, "global_step": 3}
    torch.save(good, last)
    last.write_bytes(last.read_bytes()[:300])  # truncated
    assert main(["-r", str(run), *FAST]) == 2
    err = capsys.readouterr().err
    assert "last.ckpt is not a readable PyTorch checkpoint" in err
    assert "weights_only" not in err and len(err.strip().splitlines()) == 1
    torch.save({**good, "evil": _Payload()}, last)
    assert main(["-r", str(run), *FAST]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "posix.system" in err
    assert "weights_only=False" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in run.rglob("*")) == [
        "a-project.yaml", "checkpoints", "configs", "last.ckpt"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.params.ema_decay=fast", "parameter 'ema_decay' of target 'diffusion_sr' must be float"),
        ("lightning.trainer.max_steps=twenty", "parameter 'max_steps' of section 'lightning.trainer' must be int"),
        ("data.batch_size=two", "parameter 'batch_size' of section 'data' must be int"),
        ("model.target=difusion_sr", "unknown config target 'difusion_sr'. Did you mean 'diffusion_sr'"),
        ("data.train.params.dataset.target=sr_foldr", "data.train.params.dataset: unknown config target 'sr_foldr'"),
        ("model.params.unet=${preset:unet/nope}", "config 'unet/nope' not found"),
        ("lightning.trainer.max_step=3", "unknown parameter(s) ['max_step'] for section 'lightning.trainer'"),
        ("lightning.checkpoint.every_n_steps=3", "unknown parameter(s) ['every_n_steps'] for section 'lightning.checkpoint'"),
        ("lightning.loggers=[wandb]", "lightning.loggers must be a list of tensorboard, csv"),
        ("data.train.params=[1,", "bad override 'data.train.params=[1,'"),
    ],
)  # fmt: skip
def test_config_mistakes_are_one_line_even_with_dry_run(tmp_path, capsys, override, message):
    """Issue: misspelled targets, bad presets, wrong types and malformed overrides gave
    tracebacks (or passed --dry-run); the run folder of a failed start stayed behind."""
    logdir = tmp_path / "logs"
    for dry in (["--dry-run"], []):
        assert main(["--base", TINY, "-l", str(logdir), *dry, override]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not logdir.exists()


def test_a_start_that_fails_inside_fit_leaves_no_run_folder(tmp_path, capsys):
    logdir = tmp_path / "logs"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "note.txt").write_text("no images here")
    args = ["--base", TINY, "-l", str(logdir), f"data.train.params.folder={empty}", *FAST,
            "data.train.target=sr_folder", f"data.train.params:={{root_or_filelist: {empty}}}"]  # fmt: skip
    with pytest.raises(Exception):  # noqa: B017 - the dataset's own error (no images)
        main(args)
    assert not logdir.exists() or not any(logdir.iterdir())


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path):
    """Lightning DDP (gloo) with 2 CPU processes; both replicas end with identical weights."""
    hr = make_hr_folder(tmp_path / "hr", n=4)
    logdir = tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MOESR_RUN_DIR", None)
    cmd = [
        sys.executable, "-m", "ldm.cli.train", "--base", TINY, "-l", str(logdir), "-n", "ddp",
        f"data.train.params.folder={hr}", "lightning.loggers=[csv]", "lightning.image_logger=null",
        "lightning.replica_digest=true", "lightning.trainer.max_steps=3",
        "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = logdir.iterdir()
    digests = [
        json.loads((run_dir / "replica_digest" / f"rank{r}.json").read_text()) for r in (0, 1)
    ]
    assert digests[0]["world_size"] == 2
    assert digests[0]["global_step"] == digests[1]["global_step"] == 3
    assert digests[0]["digest"] == digests[1]["digest"]
    ck = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 3
    assert "2 (devices)" in proc.stderr  # LDM learning-rate scaling counted both processes
