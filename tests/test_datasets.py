"""SR datasets (ldm.data.datasets), the release's SR inputs (ldm.data.sr_inputs) and the
optional Real-ESRGAN degradations (ldm.data.degradations)."""

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.config import instantiate
from ldm.data.datasets import PairedFolderDataset, SRFolderDataset, collect_image_paths
from ldm.data.resize import imresize_np
from ldm.data.sr_inputs import make_sr_inputs


def _write(path, hw, seed):
    arr = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _signed_to_u8(t: torch.Tensor) -> np.ndarray:
    v = ((t + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.allclose(((t + 1) / 2 * 255).numpy(), v.transpose(2, 0, 1), atol=1e-3)
    return v


@pytest.fixture
def hr_folder(tmp_path):
    folder = tmp_path / "hr"
    folder.mkdir()
    for i in range(3):
        _write(folder / f"img{i}.png", (40, 48), seed=i)
    return folder


def test_sr_folder_shapes_ranges_and_official_lr(hr_folder):
    ds = SRFolderDataset(hr_folder, crop_size=32, scale=8, seed=0)
    assert len(ds) == 3
    item = ds[1]
    shapes = {k: tuple(v.shape) for k, v in item.items() if k != "path"}
    assert shapes == {
        "hr": (3, 32, 32),
        "lr": (3, 4, 4),
        "lr_up2": (3, 8, 8),
        "lr_up8": (3, 32, 32),
    }
    for k in ("hr", "lr", "lr_up2", "lr_up8"):
        assert item[k].dtype == torch.float32
        assert item[k].min() >= -1 and item[k].max() <= 1
    assert item["path"].endswith("img1.png")
    # the release's uint8 chain: LR = imresize(hr_u8, 1/8), up2 / up8 = imresize(lr_u8)
    hr_u8 = _signed_to_u8(item["hr"])
    lr_u8 = imresize_np(hr_u8, output_shape=(4, 4))
    assert np.array_equal(_signed_to_u8(item["lr"]), lr_u8)
    assert np.array_equal(_signed_to_u8(item["lr_up2"]), imresize_np(lr_u8, output_shape=(8, 8)))
    assert np.array_equal(_signed_to_u8(item["lr_up8"]), imresize_np(lr_u8, output_shape=(32, 32)))
    # the HR crop is a window of the file (up to a horizontal flip)
    src = np.asarray(Image.open(hr_folder / "img1.png"))
    windows = [src[t : t + 32, x : x + 32] for t in range(9) for x in range(17)]
    assert any(np.array_equal(hr_u8, w) or np.array_equal(hr_u8[:, ::-1], w) for w in windows)


def test_sr_folder_seed_reproduces_and_float_mode(hr_folder):
    a = SRFolderDataset(hr_folder, crop_size=16, scale=8, seed=3)[0]
    b = SRFolderDataset(hr_folder, crop_size=16, scale=8, seed=3)[0]
    assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr_up8"], b["lr_up8"])
    f = SRFolderDataset(hr_folder, crop_size=16, scale=8, seed=3, uint8=False)[0]
    assert torch.equal(f["hr"], a["hr"])  # 8-bit source: same HR
    assert (f["lr"] - a["lr"]).abs().max() <= 1 / 255 + 1e-6  # float LR, no uint8 rounding
    full = SRFolderDataset(hr_folder, crop_size=None, scale=8, flip=False)[0]
    assert full["hr"].shape == (3, 40, 48) and full["lr"].shape == (3, 5, 6)


def test_sr_folder_batches_and_config(hr_folder):
    ds = instantiate(
        {"target": "sr_folder", "params": {"root_or_filelist": str(hr_folder), "crop_size": 16}}
    )
    assert isinstance(ds, SRFolderDataset)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["hr"].shape == (2, 3, 16, 16) and batch["lr_up2"].shape == (2, 3, 4, 4)
    assert len(batch["path"]) == 2


def test_corrupt_and_small_images_are_skipped_and_counted(hr_folder, caplog):
    (hr_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _write(hr_folder / "tiny.png", (8, 8), seed=9)
    ds = SRFolderDataset(hr_folder, crop_size=32, scale=8)
    assert len(ds) == 5
    with caplog.at_level(logging.WARNING, logger="ldm.data.datasets"):
        items = [ds[i] for i in range(len(ds))]  # a full "epoch" without a crash
    assert all(it["hr"].shape == (3, 32, 32) for it in items)
    assert ds.num_skipped == 2
    assert "broken.png" in caplog.text and "tiny.png" in caplog.text
    assert set(ds.bad_paths) == {str(hr_folder / "broken.png"), str(hr_folder / "tiny.png")}
    ds[3]  # known-bad files are not retried nor recounted
    assert ds.num_skipped == 2


def test_all_images_bad_raises(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.jpg").write_bytes(b"garbage")
    ds = SRFolderDataset(tmp_path, crop_size=16)
    with pytest.raises(RuntimeError, match="all 2 images failed"):
        ds[0]


def test_file_lists_and_bad_arguments(hr_folder, tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("# training images\nhr/img2.png\n" + str(hr_folder / "img0.png") + "\n")
    assert collect_image_paths(lst) == [hr_folder / "img2.png", hr_folder / "img0.png"]
    assert len(collect_image_paths([hr_folder, lst])) == 5
    with pytest.raises(ValueError, match="multiple of scale 8"):
        SRFolderDataset(hr_folder, crop_size=36)
    with pytest.raises(FileNotFoundError, match="no images found"):
        SRFolderDataset(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        SRFolderDataset(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


@pytest.fixture
def paired(tmp_path):
    lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
    lr_dir.mkdir()
    hr_dir.mkdir()
    for i, name in enumerate(["a", "b"]):
        hr = _write(hr_dir / f"{name}.png", (32, 24), seed=i)
        Image.fromarray(imresize_np(hr, output_shape=(4, 3))).save(lr_dir / f"{name}.png")
    return lr_dir, hr_dir


def test_paired_dataset(paired):
    lr_dir, hr_dir = paired
    ds = PairedFolderDataset(lr_dir, hr_dir, scale=8)
    item = ds[0]
    assert item["hr"].shape == (3, 32, 24) and item["lr"].shape == (3, 4, 3)
    assert item["lr_up2"].shape == (3, 8, 6) and item["lr_up8"].shape == (3, 32, 24)
    lr_file = np.asarray(Image.open(lr_dir / "a.png"))
    assert np.array_equal(_signed_to_u8(item["lr"]), lr_file)
    cropped = PairedFolderDataset(lr_dir, hr_dir, scale=8, crop_size=16, flip=True, seed=1)[1]
    assert cropped["hr"].shape == (3, 16, 16) and cropped["lr"].shape == (3, 2, 2)
    # the crops are aligned: the LR crop is the bicubic 1/8 of the HR crop's source region
    assert (cropped["lr_up8"] - cropped["hr"]).abs().mean() < 0.7


def test_paired_unmatched_names_error(paired):
    lr_dir, hr_dir = paired
    _write(lr_dir / "c.png", (4, 3), seed=5)
    _write(hr_dir / "d.png", (32, 24), seed=6)
    with pytest.raises(ValueError, match=r"1 only in LR \['c'\], 1 only in HR \['d'\]"):
        PairedFolderDataset(lr_dir, hr_dir)


def test_paired_size_mismatch_is_skipped(paired):
    lr_dir, hr_dir = paired
    _write(hr_dir / "a.png", (30, 24), seed=7)  # no longer 8x its LR
    ds = PairedFolderDataset(lr_dir, hr_dir, scale=8)
    assert ds[0]["path"].endswith("b.png")
    assert ds.num_skipped == 1 and "is not 8x the LR" in next(iter(ds.bad_paths.values()))


def test_make_sr_inputs_shapes_and_inputs():
    lr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    cond, enc = make_sr_inputs(lr)
    assert cond.shape == (1, 3, 10, 14) and enc.shape == (1, 3, 40, 56)
    cond_t, enc_t = make_sr_inputs(torch.from_numpy(lr).permute(2, 0, 1).float() / 255)
    assert torch.equal(cond, cond_t) and torch.equal(enc, enc_t)
    gray_cond, _ = make_sr_inputs(lr[:, :, 0])
    assert torch.equal(gray_cond[:, 0], gray_cond[:, 2])
    cond4, enc4 = make_sr_inputs(lr, factor=4)  # the release keeps the LR itself for x4
    assert cond4.shape == (1, 3, 5, 7) and enc4.shape == (1, 3, 20, 28)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_sr_inputs(torch.full((3, 4, 4), 2.0))


# ------------------------------------------------------------------------- degradations


def test_degradation_missing_basicsr_message(monkeypatch):
    from ldm.data import degradations

    monkeypatch.setitem(sys.modules, "basicsr", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install --no-build-isolation basicsr==1.4.2"):
        degradations.import_basicsr()


@pytest.mark.slow  # importing basicsr takes ~5-8 s
def test_realesrgan_degradation_seeded(hr_folder):
    pytest.importorskip("cv2")
    from ldm.data.degradations import RealESRGANDegradation, import_basicsr

    try:
        import_basicsr()
    except ImportError as err:
        pytest.skip(str(err))
    deg = RealESRGANDegradation()
    hr = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0))
    a = deg(hr, 8, torch.Generator().manual_seed(5))
    b = deg(hr, 8, torch.Generator().manual_seed(5))
    c = deg(hr, 8, torch.Generator().manual_seed(6))
    assert a.shape == (3, 6, 6) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    ds = SRFolderDataset(
        hr_folder,
        crop_size=32,
        seed=0,
        degradation={"target": "realesrgan_degradation", "params": {"second_order": False}},
    )
    item = ds[0]
    assert item["lr"].shape == (3, 4, 4) and item["lr_up8"].shape == (3, 32, 32)
    assert torch.equal(item["lr"], ds[0]["lr"])


def test_channel_shuffle_permutes_rgb_and_keeps_lr_consistent(hr_folder):
    plain = SRFolderDataset(hr_folder, crop_size=16, scale=8, flip=False, seed=3)
    shuffled = SRFolderDataset(
        hr_folder, crop_size=16, scale=8, flip=False, seed=3, channel_shuffle=True
    )
    perms = set()
    for i in range(len(plain)):
        a, b = plain[i], shuffled[i]
        # the same crop, channels permuted (the crop draw comes first from the same generator)
        match = [next(j for j in range(3) if torch.equal(b["hr"][c], a["hr"][j])) for c in range(3)]
        assert sorted(match) == [0, 1, 2]
        perms.add(tuple(match))
        assert torch.equal(b["lr"], a["lr"][match])  # LR made from the shuffled HR
    assert len(perms) > 1 or perms != {(0, 1, 2)}


def test_image_cache_decodes_each_file_once(hr_folder, monkeypatch):
    import ldm.data.datasets as datasets

    calls = []
    real = datasets.read_image
    monkeypatch.setattr(datasets, "read_image", lambda p: calls.append(p) or real(p))
    ds = SRFolderDataset(hr_folder, crop_size=16, scale=8, cache_images=True, seed=0)
    first = [ds[i]["hr"] for i in range(len(ds))]
    again = [ds[i]["hr"] for i in range(len(ds))]
    assert len(calls) == len(ds)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
