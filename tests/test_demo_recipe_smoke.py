"""The demo recipe end to end, every stage shortened (STEPS_SCALE=0.01): it runs, writes a
float16 release and its RESULTS.md into OUT, and never touches the committed assets/demo."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_recipe_smoke_run(tmp_path):
    committed = _digest(REPO / "assets" / "demo")
    out = tmp_path / "release"
    env = dict(
        os.environ,
        STEPS_SCALE="0.01",
        FA_CROPS="4",
        EVAL_STEPS="2",
        DATA=str(tmp_path / "data"),
        WORK=str(tmp_path / "work"),
        OUT=str(out),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    run = subprocess.run(
        ["bash", "scripts/train_demo.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["expert_stage0.safetensors", "expert_stage1.safetensors", "fa_vae.safetensors"]
    assert not list(out.glob(".staging*"))  # staged and renamed into place
    from safetensors.torch import load_file

    for f in files:
        dtypes = {t.dtype for t in load_file(str(out / f)).values() if t.is_floating_point()}
        assert dtypes == {torch.float16}, f
    results = (out / "RESULTS.md").read_text()
    for needle in (
        "| chelsea |",
        "| check | result | value |",
        "autoencoder alone",
        "b_autoencoder",
    ):
        assert needle in results, needle
    assert _digest(REPO / "assets" / "demo") == committed  # the committed weights are untouched
