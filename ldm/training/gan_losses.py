"""Adversarial and frequency losses of the autoencoder (FA-VAE) training.

* :class:`NLayerDiscriminator`: the PatchGAN of pix2pix as used by taming-transformers and
  latent-diffusion (``taming/modules/discriminator/model.py``; 3 layers, 64 filters, BatchNorm,
  ``N(0, 0.02)`` init). Parameter names ``main.<i>.*`` as there.
* :func:`hinge_d_loss`, :func:`adopt_weight`, :func:`adaptive_weight`: the pieces of taming's
  ``VQLPIPSWithDiscriminator`` (the loss of LDM's autoencoders): the generator's GAN term is
  weighted by ``||grad nll|| / (||grad g|| + 1e-4)`` at the last layer, clamped to [0, 1e4], and
  switched on at ``disc_start``.
* :class:`FocalFrequencyLoss`: Jiang et al., "Focal Frequency Loss for Image Reconstruction and
  Synthesis", ICCV 2021 (2-D orthonormal FFT, spectrum weight ``|F_pred - F_true|^alpha``
  normalised to [0, 1] per image and channel, detached).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming layout)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kw, padw = 4, 1
        seq: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            seq += [
                nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [
            nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw),
        ]
        self.main = nn.Sequential(*seq)
        self.apply(_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _weights_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from ``step >= threshold`` on, ``value`` before (taming)."""
    return value if step < threshold else weight


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """``scale * clamp(||d nll / d w|| / (||d g / d w|| + 1e-4), 0, 1e4)`` (detached)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(w, 0.0, 1e4).detach() * scale


class FocalFrequencyLoss(nn.Module):
    """Focal frequency loss (Jiang et al. 2021), whole-image spectrum (patch factor 1).

    Args:
        alpha: exponent of the spectrum weight.
        log_matrix: weight ``log(1 + w)`` instead of ``w``.
        batch_matrix: normalise the weight by its maximum over the whole batch instead of per
            image and channel.
        ave_spectrum: compare batch-averaged spectra.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        log_matrix: bool = False,
        batch_matrix: bool = False,
        ave_spectrum: bool = False,
    ):
        super().__init__()
        self.alpha = alpha
        self.log_matrix = log_matrix
        self.batch_matrix = batch_matrix
        self.ave_spectrum = ave_spectrum

    @staticmethod
    def spectrum(x: torch.Tensor) -> torch.Tensor:
        f = torch.fft.fft2(x.float(), norm="ortho")
        return torch.stack([f.real, f.imag], dim=-1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fp, ft = self.spectrum(pred), self.spectrum(target)
        if self.ave_spectrum:
            fp, ft = fp.mean(0, keepdim=True), ft.mean(0, keepdim=True)
        dist = ((fp - ft) ** 2).sum(-1)  # squared magnitude of the complex difference
        with torch.no_grad():
            w = dist.sqrt() ** self.alpha
            if self.log_matrix:
                w = torch.log(w + 1.0)
            if self.batch_matrix:
                w = w / w.max()
            else:
                w = w / w.amax(dim=(-2, -1), keepdim=True)
            w = torch.nan_to_num(w, nan=0.0).clamp(0.0, 1.0)
        return (w * dist).mean()


def grid_frequency_mask(h: int, w: int, periods: Sequence[int] = (4, 8)) -> torch.Tensor:
    """``[h, w]`` bool mask of the 2-D FFT bins at ``(k/p, l/p)`` cycles per pixel for every
    ``p`` in ``periods`` (bins that fall between two FFT bins are left out), DC excluded."""
    rows = torch.zeros(h, dtype=torch.bool)
    cols = torch.zeros(w, dtype=torch.bool)
    for p in periods:
        if p < 2:
            raise ValueError(f"grid periods must be >= 2 pixels, got {p}")
        rows[[k * h // p for k in range(p) if k * h % p == 0]] = True
        cols[[k * w // p for k in range(p) if k * w % p == 0]] = True
    mask = rows[:, None] & cols[None, :]
    mask[0, 0] = False
    return mask


def grid_frequency_loss(
    pred: torch.Tensor, target: torch.Tensor, periods: Sequence[int] = (4, 8)
) -> torch.Tensor:
    """Mean ``|F pred - F target|`` over the latent-grid frequencies (:func:`grid_frequency_mask`;
    orthonormal 2-D FFT per image and channel): an L1 loss restricted to those frequencies.

    A decoder that upsamples by 4 (and a UNet that downsamples twice more) can print a faint
    periodic pattern of period 4 and 8 px: extra power at exactly these bins. The complex
    difference is used on purpose: a loss on the magnitudes alone is met by *adding* a pattern
    of the HR image's power at these bins, whatever its phase (measured on the demo: the
    pattern grew), while a pattern of the wrong phase raises the complex difference.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    mask = grid_frequency_mask(*pred.shape[-2:], periods).to(pred.device)
    if not mask.any():
        raise ValueError(f"no FFT bin of a {tuple(pred.shape[-2:])} image is at periods {periods}")
    diff = torch.fft.fft2(pred.float() - target.float(), norm="ortho")[..., mask]
    return diff.abs().mean()
