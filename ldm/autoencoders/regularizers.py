"""Latent regularizers: the VQ codebook (VQ-f4) and the diagonal Gaussian posterior (KL-f8).

``VectorQuantizer`` reproduces taming-transformers ``VectorQuantizer2`` (the one
LDM's ``VQModel`` uses, ``legacy=True``, no index remapping); ``DiagonalGaussian``
reproduces LDM's ``DiagonalGaussianDistribution``.
"""

from __future__ import annotations

import torch
from torch import nn

#: Tokens per chunk in the nearest-code search (bounds the [tokens, n_embed] distance matrix).
_CHUNK = 4096


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient.

    ``forward(z)`` with ``z`` ``[B, C, H, W]`` returns ``(z_q, loss, indices)``:
    ``z_q`` the nearest codes (value of the codes, gradient of ``z``),
    ``loss`` the codebook + commitment loss, ``indices`` ``[B, H, W]`` int64.
    With ``legacy=True`` (LDM's checkpoints) the loss is
    ``mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``, i.e. the beta sits on
    the codebook term, as in taming's ``VectorQuantizer2``; ``legacy=False``
    puts it on the commitment term (VQ-VAE paper).
    """

    def __init__(
        self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True
    ) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def nearest_indices(self, z_flat: torch.Tensor) -> torch.Tensor:
        """argmin_k ||z - e_k||^2 for rows of ``z_flat`` ``[N, C]`` (taming's expansion of the norm)."""
        codes = self.embedding.weight
        code_sq = codes.pow(2).sum(1)
        out = torch.empty(z_flat.shape[0], dtype=torch.long, device=z_flat.device)
        for start in range(0, z_flat.shape[0], _CHUNK):
            zc = z_flat[start : start + _CHUNK]
            d = zc.pow(2).sum(1, keepdim=True) + code_sq - 2.0 * zc @ codes.t()
            out[start : start + _CHUNK] = d.argmin(1)
        return out

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for ``indices`` ``[B, H, W]`` as a latent ``[B, C, H, W]``."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if z.shape[1] != self.embed_dim:
            raise ValueError(
                f"latent has {z.shape[1]} channels but the codebook has dimension {self.embed_dim}"
            )
        b, _, hgt, wid = z.shape
        z_bhwc = z.permute(0, 2, 3, 1)
        indices = self.nearest_indices(z_bhwc.reshape(-1, self.embed_dim)).view(b, hgt, wid)
        z_q = self.embedding(indices)  # [B, H, W, C]
        codebook = torch.mean((z_q - z_bhwc.detach()) ** 2)
        commit = torch.mean((z_q.detach() - z_bhwc) ** 2)
        loss = commit + self.beta * codebook if self.legacy else codebook + self.beta * commit
        z_q = z_bhwc + (z_q - z_bhwc).detach()  # straight-through estimator
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices


class DiagonalGaussian:
    """``N(mean, diag(exp(logvar)))`` from ``moments = cat([mean, logvar], dim=1)``.

    ``logvar`` is clamped to ``[-30, 20]`` as in LDM.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL divergence to ``other`` (default N(0, I)), summed over C, H, W: shape ``[B]``."""
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``x``, summed over C, H, W: shape ``[B]``."""
        dims = list(range(1, self.mean.ndim))
        log_two_pi = 1.8378770664093453
        return 0.5 * torch.sum(log_two_pi + self.logvar + (x - self.mean) ** 2 / self.var, dim=dims)
