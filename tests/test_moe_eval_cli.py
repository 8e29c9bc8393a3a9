"""moe-sr-eval: SR pipeline on an LR folder, then metrics against HR (tiny random weights)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from moe_sr.build import export_pipeline, load_pipeline_config, pipeline_from_parts
from moe_sr.cli.eval_pipeline import main
from tests.moe_sr_helpers import tiny_fa_vae, tiny_unets

CONFIG = "moe_sr/sr8x_tiny"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    cfg = load_pipeline_config(CONFIG)
    pipe = pipeline_from_parts(cfg, tiny_unets(), tiny_fa_vae())
    pipe.config = cfg
    folder = tmp_path_factory.mktemp("ours")
    export_pipeline(pipe, folder)
    return folder


def _data(root):
    rng = np.random.default_rng(0)
    for sub in ("lr", "hr", "bicubic"):
        (root / sub).mkdir()
    for name, (h, w) in (("a.png", (5, 6)), ("b.png", (4, 7))):
        lr = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        lr.save(root / "lr" / name)
        hr = rng.integers(0, 256, (8 * h, 8 * w, 3), dtype=np.uint8)
        Image.fromarray(hr).save(root / "hr" / name)
        lr.resize((8 * w, 8 * h), Image.BICUBIC).save(root / "bicubic" / name)


def test_one_command_sr_and_metrics(weights_dir, tmp_path, capsys):
    pytest.importorskip("pyiqa")
    from ldm.cli.eval_sr import main as eval_main
    from ldm.evaluation.report import read_csv

    _data(tmp_path)
    out = tmp_path / "run"
    argv = ["--lr", str(tmp_path / "lr"), "--hr", str(tmp_path / "hr"), "--out", str(out),
            "--weights-dir", str(weights_dir), "--config", CONFIG, "--steps", "2", "--quiet",
            "--metrics", "psnr,ssim", "--compare", f"bicubic={tmp_path / 'bicubic'}"]  # fmt: skip
    assert main(argv) == 0
    assert Image.open(out / "sr" / "a.png").size == (48, 40)
    assert Image.open(out / "sr" / "b.png").size == (56, 32)
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| Model | psnr ↑ | ssim ↑ |"
    assert table[2].startswith("| moe_sr |") and table[3].startswith("| bicubic |")
    rows = read_csv(out / "per_image.csv")
    assert [(r["model"], r["image"]) for r in rows] == [
        ("moe_sr", "a.png"), ("moe_sr", "b.png"), ("bicubic", "a.png"), ("bicubic", "b.png"),
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sr"]["moe_sr"] == str(out / "sr")

    # the same numbers as moe-sr-eval-sr on the written outputs
    ref_out = tmp_path / "ref"
    eval_argv = ["--hr", str(tmp_path / "hr"), "--sr", f"moe_sr={out / 'sr'}",
                 "--metrics", "psnr,ssim", "--out", str(ref_out), "--no-progress"]  # fmt: skip
    assert eval_main(eval_argv) == 0
    ref = json.loads((ref_out / "summary.json").read_text())["models"]["moe_sr"]["summary"]
    assert summary["models"]["moe_sr"]["summary"] == ref

    # a second run reuses the SR outputs (no re-sampling) and gives the same report
    stamp = (out / "sr" / "a.png").stat().st_mtime_ns - 10**9
    os.utime(out / "sr" / "a.png", ns=(stamp, stamp))
    capsys.readouterr()
    assert main(argv) == 0
    assert (out / "sr" / "a.png").stat().st_mtime_ns == stamp
    again = json.loads((out / "summary.json").read_text())
    assert again["models"]["moe_sr"]["summary"] == summary["models"]["moe_sr"]["summary"]


def test_errors(weights_dir, tmp_path, capsys):
    pytest.importorskip("pyiqa")
    _data(tmp_path)
    out = tmp_path / "run"
    base = ["--lr", str(tmp_path / "lr"), "--hr", str(tmp_path / "hr"), "--out", str(out),
            "--config", CONFIG, "--steps", "2", "--quiet", "--metrics", "psnr"]  # fmt: skip
    assert main([*base[:2], "--hr", str(tmp_path / "nope"), *base[4:]]) == 2
    assert "--hr" in capsys.readouterr().err
    assert main(base) == 2  # no weights: the pipeline cannot be built, nothing evaluated
    err = capsys.readouterr().err
    assert "--weights-dir" in err and "no evaluation" in err
    assert not (out / "summary.json").exists()
    assert main([*base, "--weights-dir", str(weights_dir), "--compare", f"moe_sr={out}"]) == 2
    assert "clashes with --name moe_sr" in capsys.readouterr().err
    # HR names that do not pair with the LR inputs: listed before the SR run (issue)
    (tmp_path / "hr" / "b.png").rename(tmp_path / "hr" / "b_hr.png")
    assert main([*base, "--weights-dir", str(weights_dir)]) == 2
    err = capsys.readouterr().err
    assert "b_hr.png: no LR image named b_hr" in err and "b.png: no HR image named b" in err
    assert not (out / "sr").exists()  # nothing was run
    # an --out that is a file: refused before the SR run
    (tmp_path / "hr" / "b_hr.png").rename(tmp_path / "hr" / "b.png")
    (tmp_path / "file").write_text("x")
    argv = [*base[:5], str(tmp_path / "file"), *base[6:], "--weights-dir", str(weights_dir)]
    assert main(argv) == 2
    assert "is a file" in capsys.readouterr().err
    # an HR image of the wrong size: the same, before the SR run
    Image.open(tmp_path / "hr" / "a.png").crop((0, 0, 8, 8)).save(tmp_path / "hr" / "a.png")
    assert main([*base, "--weights-dir", str(weights_dir)]) == 2
    assert "a.png: 8x8 is not 8x its LR image" in capsys.readouterr().err
    assert not (out / "sr").exists()
