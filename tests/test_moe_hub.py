"""The download helper for the released files (moe_sr/hub.py), offline behaviour."""

from __future__ import annotations

import pytest

from moe_sr.hub import RELEASED_FILES, ReleaseDownloadError, download_release, local_paths


def test_offline_message_names_url_files_sizes_and_destination(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ReleaseDownloadError) as err:
        download_release(tmp_path / "models")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg
    assert "https://huggingface.co/amandaa/moe_sr" in msg
    for k in range(4):
        assert f"https://huggingface.co/amandaa/moe_sr/resolve/main/Unet/moe_stage{k}.ckpt" in msg
        assert str(tmp_path / "models" / "Unet" / f"moe_stage{k}.ckpt") in msg
    assert "3,650,066,050 bytes" in msg
    assert "first_stage_models/vq-f4/fa_vae.pth" in msg and "288,603,915 bytes" in msg


def test_complete_files_are_not_downloaded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = local_paths(tmp_path, ["fa_vae_klf8"])
    paths["fa_vae_klf8"].parent.mkdir(parents=True)
    paths["fa_vae_klf8"].write_bytes(b"x")  # size unknown for kl-f8: presence is enough
    assert download_release(tmp_path, ["fa_vae_klf8"]) == paths
    # a wrong-size stage file counts as missing
    stage = local_paths(tmp_path, ["stage0"])["stage0"]
    stage.parent.mkdir(parents=True)
    stage.write_bytes(b"truncated")
    with pytest.raises(ReleaseDownloadError, match="moe_stage0.ckpt"):
        download_release(tmp_path, ["stage0"])


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown released file"):
        download_release("x", ["stage9"])
    assert set(RELEASED_FILES) >= {"stage0", "stage3", "fa_vae_vqf4"}
