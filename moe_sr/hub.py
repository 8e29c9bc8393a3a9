"""Download the released checkpoints from the Hugging Face Hub into a local folder.

The official README (tencent-ailab/Frequency_Aug_VAE_MoESR) links the files in the Hub
repository ``amandaa/moe_sr``: the four stage experts under ``Unet/`` and the FA-VAE decoders under
``first_stage_models/``. When the network (or ``HF_HUB_OFFLINE=1``) does not allow a download,
:class:`ReleaseDownloadError` says where to get each file, its size, and where to put it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ID = "amandaa/moe_sr"
REPO_URL = f"https://huggingface.co/{REPO_ID}"


@dataclass(frozen=True)
class ReleasedFile:
    """One file of the release: path inside the Hub repository and its size."""

    filename: str
    size_bytes: int | None
    size_text: str
    what: str

    @property
    def url(self) -> str:
        return f"{REPO_URL}/resolve/main/{self.filename}"


_STAGE_SIZE = 3_650_066_050  # exact (reproduced from the manifest, see shared/reference/README.md)

RELEASED_FILES: dict[str, ReleasedFile] = {
    **{
        f"stage{k}": ReleasedFile(
            f"Unet/moe_stage{k}.ckpt",
            _STAGE_SIZE,
            "3.65 GB",
            f"SS-MoE stage expert {k} (timesteps {250 * k}..{250 * (k + 1) - 1})",
        )
        for k in range(4)
    },
    "fa_vae_vqf4": ReleasedFile(
        "first_stage_models/vq-f4/fa_vae.pth", 288_603_915, "289 MB", "FA-VAE VQ-f4 (8x SR)"
    ),
    "fa_vae_klf8": ReleasedFile(
        "first_stage_models/kl-f8/fa_vae.pth", None, "360 MB", "FA-VAE KL-f8 (SD 1.5 decoder)"
    ),
}

#: The files 8x SR needs.
SR8X_FILES = ("stage0", "stage1", "stage2", "stage3", "fa_vae_vqf4")


class ReleaseDownloadError(RuntimeError):
    """The released files could not be downloaded; the message says how to get them by hand."""


def manual_download_message(names: Iterable[str], local_dir: str | os.PathLike, reason: str) -> str:
    local_dir = Path(local_dir)
    lines = [
        f"Cannot download the released checkpoints ({reason}).",
        f"Get them from {REPO_URL} (files: {REPO_URL}/tree/main) and put them here:",
    ]
    for name in names:
        f = RELEASED_FILES[name]
        size = f"{f.size_bytes:,} bytes" if f.size_bytes else f"about {f.size_text}"
        lines.append(f"  {f.url}\n      -> {local_dir / f.filename}  ({size}; {f.what})")
    lines.append(
        "For example: huggingface-cli download "
        f"{REPO_ID} <file> --local-dir {local_dir}   (on a machine with network access)"
    )
    return "\n".join(lines)


def local_paths(local_dir: str | os.PathLike, names: Iterable[str] = SR8X_FILES) -> dict[str, Path]:
    """Where each released file lives under ``local_dir`` (the Hub layout is kept)."""
    return {n: Path(local_dir) / RELEASED_FILES[n].filename for n in names}


def _complete(path: Path, f: ReleasedFile) -> bool:
    return path.is_file() and (f.size_bytes is None or path.stat().st_size == f.size_bytes)


def download_release(
    local_dir: str | os.PathLike,
    names: Iterable[str] = SR8X_FILES,
    *,
    revision: str | None = None,
) -> dict[str, Path]:
    """Download the named released files into ``local_dir`` (skipping complete ones).

    Returns ``name -> local path``. Raises :class:`ReleaseDownloadError` with a manual-download
    message when offline or when the Hub cannot be reached.
    """
    names = list(names)
    unknown = [n for n in names if n not in RELEASED_FILES]
    if unknown:
        raise ValueError(f"unknown released file(s) {unknown}; known: {sorted(RELEASED_FILES)}")
    paths = local_paths(local_dir, names)
    todo = [n for n in names if not _complete(paths[n], RELEASED_FILES[n])]
    if not todo:
        return paths
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ReleaseDownloadError(
            manual_download_message(todo, local_dir, "HF_HUB_OFFLINE is set")
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ReleaseDownloadError(
            manual_download_message(todo, local_dir, "huggingface_hub is not installed")
        ) from None
    for n in todo:
        f = RELEASED_FILES[n]
        logger.info("downloading %s (%s) into %s", f.filename, f.size_text, local_dir)
        try:
            got = hf_hub_download(REPO_ID, f.filename, revision=revision, local_dir=str(local_dir))
        except Exception as err:  # noqa: BLE001 - network errors come in many classes
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise ReleaseDownloadError(manual_download_message(todo, local_dir, reason)) from err
        if f.size_bytes is not None and Path(got).stat().st_size != f.size_bytes:
            raise ReleaseDownloadError(
                f"{got} has {Path(got).stat().st_size:,} bytes, expected {f.size_bytes:,}: "
                "the download is incomplete or the release changed; delete it and retry"
            )
    return paths
