"""Evaluation commands: problems found before the work, what was computed is written
(issue: FID with one image failed after the other metrics and wrote nothing; an empty SR
folder; a grayscale HR against colour SR; --out checks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pyiqa")

from ldm.cli.compare import main as compare_main  # noqa: E402
from ldm.cli.eval_sr import main as eval_main  # noqa: E402
from ldm.evaluation import metric_weights as W  # noqa: E402


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def _pair(root: Path, names=("a",), gray_hr: bool = False) -> None:
    g = np.random.default_rng(0)
    for n in names:
        hr = g.integers(0, 256, (24, 32, 3))
        if gray_hr:
            hr = hr[..., 0]
        sr = np.clip(
            (hr if hr.ndim == 3 else hr[..., None]) + g.integers(-9, 10, (24, 32, 3)), 0, 255
        )
        _save(root / "hr" / f"{n}.png", hr)
        _save(root / "sr" / f"{n}.png", sr)


def _argv(root: Path, metrics: str) -> list[str]:
    return ["--hr", str(root / "hr"), "--sr", f"ours={root / 'sr'}", "--metrics", metrics,
            "--out", str(root / "out"), "--no-progress"]  # fmt: skip


def test_fid_with_one_image_writes_the_other_metrics(tmp_path, capsys):
    try:
        W.prepare_fid(None)
    except W.MissingMetricWeights:
        pytest.skip("no offline TF-FID Inception weights")
    _pair(tmp_path)
    assert eval_main(_argv(tmp_path, "psnr,fid")) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    ours = summary["models"]["ours"]["summary"]
    assert ours["psnr"] > 20 and ours["fid"] is None  # NaN is written as null
    text = capsys.readouterr()
    assert "fid not computed" in (tmp_path / "out" / "table.md").read_text()
    assert "moesr_fid" not in text.out + text.err  # no temporary folder named


def test_an_empty_sr_folder_says_so(tmp_path, capsys):
    _pair(tmp_path)
    for f in (tmp_path / "sr").iterdir():
        f.unlink()
    assert eval_main(_argv(tmp_path, "psnr")) == 2
    err = capsys.readouterr().err
    assert f"no images in {tmp_path / 'sr'}" in err and "is empty" in err


def test_a_grayscale_reference_against_colour_predictions_warns(tmp_path, caplog):
    _pair(tmp_path, gray_hr=True)
    caplog.set_level("WARNING")
    assert eval_main(_argv(tmp_path, "psnr")) == 0
    assert "grayscale but the predictions are colour" in caplog.text
    assert "grayscale but the predictions are colour" in (tmp_path / "out" / "table.md").read_text()


def test_an_out_that_is_a_file_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    import ldm.evaluation as E

    _pair(tmp_path)
    (tmp_path / "out").write_text("not a folder")
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    assert eval_main(_argv(tmp_path, "psnr")) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err


def test_compare_checks_the_output_name_before_reading(tmp_path, capsys):
    img = _save(tmp_path / "a.png", np.zeros((8, 8, 3)))
    assert compare_main(["--image", f"x={img}", "--out", str(tmp_path / "pic")]) == 2
    assert "no file extension" in capsys.readouterr().err
    assert compare_main(["--image", f"x={img}", "--out", str(tmp_path / "pic.xyz")]) == 2
    assert "cannot write images of type '.xyz'" in capsys.readouterr().err
    assert not (tmp_path / "pic").exists() and not (tmp_path / "pic.xyz").exists()
    assert compare_main(["--image", f"x={img}", "--out", str(tmp_path / "pic.png")]) == 0
    assert Image.open(tmp_path / "pic.png").mode == "RGB"
