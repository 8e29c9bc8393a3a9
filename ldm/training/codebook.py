"""Keeping a VQ codebook alive while it trains: initialisation from encoder outputs, dead-code
re-initialisation, an optional EMA update, and usage statistics.

A VQ autoencoder trained with the plain recipe (codebook loss + commitment, codes initialised
uniformly in ``[-1/K, 1/K]``) easily collapses: a handful of codes win every nearest-neighbour
search, the others never receive a gradient, and every image is painted from a few dozen
colours. Current VQ practice fixes this with three well-known measures, each a switch here:

* **initialisation from encoder outputs** (k-means, SoundStream, Zeghidour et al. 2021, or a
  random sample of them): the codebook starts where the latents are;
* **dead-code re-initialisation** (Jukebox, Dhariwal et al. 2020): a code unused for
  ``dead_code_steps`` steps is moved onto a recent encoder output;
* **EMA codebook update** (VQ-VAE, van den Oord et al. 2017, appendix; VQ-VAE-2): the codes
  follow the running mean of the latents assigned to them instead of a gradient (the codebook
  term of the loss then has no effect and the codebook is frozen for the optimizer).

This is training-only state (a reservoir of recent latents, usage counters, EMA sums): it lives
in the LightningModule next to the model, never in the model's state dict, so checkpoints of
the model load exactly as before (released and LDM files included).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

INIT_MODES = ("kmeans", "sample", "none")


@dataclass(frozen=True)
class CodebookStats:
    """Usage of the codebook in one step and over the recent window."""

    used_in_batch: float  #: fraction of codes chosen at least once in the batch
    perplexity: float  #: exp(entropy) of the batch's code histogram (K = all codes in use)
    used_recently: float  #: fraction of codes chosen within the last ``usage_window`` steps
    restarted: int  #: codes re-initialised in this step


class CodebookTrainer(nn.Module):
    """Training-time companion of a :class:`~ldm.autoencoders.regularizers.VectorQuantizer`.

    Call :meth:`update` after each quantisation of a training batch with the encoder outputs
    ``z`` ``[B, C, H, W]`` (pre-quantisation) and the chosen ``indices`` ``[B, H, W]``; it
    returns the step's :class:`CodebookStats`. Before the codebook is initialised (the first
    ``init`` collects at least ``init_min_vectors`` latents) nothing else happens.

    Args:
        embedding: the codebook, ``nn.Embedding(K, C)`` (updated in place).
        init: ``"kmeans"`` (k-means on the collected latents), ``"sample"`` (random distinct
            latents) or ``"none"`` (keep the initialisation).
        init_min_vectors: latents to collect before the initialisation (default ``4 K``).
        kmeans_iters: Lloyd iterations of the k-means initialisation.
        dead_code_steps: re-initialise codes unused for this many steps (0: never).
        ema_decay: EMA codebook update with this decay (``None``: the codebook trains by its
            gradient); ``ema_eps`` is the Laplace smoothing of the cluster sizes.
        reservoir_size: recent latents kept for initialisation and restarts.
        usage_window: steps over which ``used_recently`` counts the codes chosen.
        warn_below: log a warning when the recently used fraction falls below this (checked
            every ``usage_window`` steps, from one window after the initialisation on).
    """

    def __init__(
        self,
        embedding: nn.Embedding,
        *,
        init: str = "kmeans",
        init_min_vectors: int | None = None,
        kmeans_iters: int = 10,
        dead_code_steps: int = 200,
        ema_decay: float | None = None,
        ema_eps: float = 1e-5,
        reservoir_size: int = 65536,
        usage_window: int = 200,
        warn_below: float = 0.25,
    ) -> None:
        super().__init__()
        if init not in INIT_MODES:
            raise ValueError(f"codebook init must be one of {INIT_MODES}, got {init!r}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        if dead_code_steps < 0:
            raise ValueError(f"dead_code_steps must be >= 0, got {dead_code_steps}")
        if usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {usage_window}")
        object.__setattr__(self, "embedding", embedding)  # not a submodule: not our state
        k, c = embedding.weight.shape
        self.init_mode = init
        self.init_min_vectors = int(init_min_vectors or 4 * k)
        self.kmeans_iters = kmeans_iters
        self.dead_code_steps = dead_code_steps
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.usage_window = usage_window
        self.warn_below = warn_below
        device = embedding.weight.device
        self.register_buffer("initialised", torch.tensor(init == "none", device=device))
        self.register_buffer("reservoir", torch.zeros(reservoir_size, c, device=device))
        self.register_buffer("reservoir_fill", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("reservoir_pos", torch.zeros((), dtype=torch.long, device=device))
        # step at which each code was last chosen / last (re)initialised
        self.register_buffer("last_used", torch.full((k,), -(2**40), device=device))
        self.register_buffer("last_reset", torch.zeros(k, dtype=torch.long, device=device))
        self.register_buffer("init_step", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("ema_size", torch.ones(k, device=device))
        self.register_buffer("ema_sum", embedding.weight.detach().clone())
        if ema_decay is not None:
            embedding.weight.requires_grad_(False)  # the EMA moves the codes, not the optimizer

    @property
    def num_codes(self) -> int:
        return self.embedding.weight.shape[0]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def update(self, z: torch.Tensor, indices: torch.Tensor) -> CodebookStats:
        """Observe a batch's encoder outputs and code choices; init / EMA / restart as set."""
        z_flat = _gather(z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float())
        idx = _gather(indices.detach().reshape(-1))
        self._observe(z_flat)
        self.step += 1
        counts = torch.bincount(idx, minlength=self.num_codes).float()
        if not bool(self.initialised):
            if int(self.reservoir_fill) >= self.init_min_vectors:
                self._initialise()
            return self._stats(counts, restarted=0)
        self.last_used[counts > 0] = self.step
        if self.ema_decay is not None:
            self._ema_step(z_flat, idx, counts)
        restarted = 0
        if self.dead_code_steps and int(self.step) % max(1, self.dead_code_steps // 4) == 0:
            restarted = self._restart_dead()
        stats = self._stats(counts, restarted)
        since_init = int(self.step - self.init_step)
        if (
            since_init >= self.usage_window
            and since_init % self.usage_window == 0
            and stats.used_recently < self.warn_below
        ):
            logger.warning(
                "codebook: only %.0f%% of %d codes used in the last %d steps (collapse?): "
                "enable init/dead-code restarts or lower the learning rate",
                100 * stats.used_recently, self.num_codes, self.usage_window,
            )  # fmt: skip
        return stats

    def _stats(self, counts: torch.Tensor, restarted: int) -> CodebookStats:
        recent = (self.step - self.last_used) < self.usage_window
        return CodebookStats(
            used_in_batch=float((counts > 0).float().mean()),
            perplexity=perplexity_of_counts(counts),
            used_recently=float(recent.float().mean()),
            restarted=restarted,
        )

    # ------------------------------------------------------------------ parts
    def _observe(self, z_flat: torch.Tensor) -> None:
        """Ring buffer of recent latents (a random subset when a batch exceeds it)."""
        size = self.reservoir.shape[0]
        if z_flat.shape[0] > size:
            z_flat = z_flat[torch.randperm(z_flat.shape[0], device=z_flat.device)[:size]]
        n = z_flat.shape[0]
        pos = int(self.reservoir_pos)
        first = min(n, size - pos)
        self.reservoir[pos : pos + first] = z_flat[:first]
        if n > first:
            self.reservoir[: n - first] = z_flat[first:]
        self.reservoir_pos.fill_((pos + n) % size)
        self.reservoir_fill.fill_(min(size, int(self.reservoir_fill) + n))

    def _samples(self) -> torch.Tensor:
        return self.reservoir[: int(self.reservoir_fill)]

    def _initialise(self) -> None:
        data = self._samples()
        if self.init_mode == "sample":
            codes = _distinct_sample(data, self.num_codes)
        else:
            codes = kmeans(data, self.num_codes, iters=self.kmeans_iters)
        codes = _broadcast(codes)
        self.embedding.weight.data.copy_(codes)
        self.ema_sum.copy_(codes)
        self.ema_size.fill_(1.0)
        self.last_reset.fill_(int(self.step))
        self.init_step.fill_(int(self.step))
        self.initialised.fill_(True)
        logger.info(
            "codebook: initialised %d codes by %s from %d encoder outputs",
            self.num_codes, self.init_mode, data.shape[0],
        )  # fmt: skip

    def _ema_step(self, z_flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """``N <- d N + (1-d) n``, ``m <- d m + (1-d) sum z``, ``e = m / N~`` (Laplace-smoothed)."""
        d = float(self.ema_decay)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, z_flat)
        self.ema_size.mul_(d).add_(counts, alpha=1.0 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1.0 - d)
        total = self.ema_size.sum()
        smoothed = (self.ema_size + self.ema_eps) / (total + self.num_codes * self.ema_eps) * total
        self.embedding.weight.data.copy_(self.ema_sum / smoothed[:, None])

    def _restart_dead(self) -> int:
        dead = (self.step - torch.maximum(self.last_used, self.last_reset)) >= self.dead_code_steps
        n_dead = int(dead.sum())
        if n_dead == 0 or int(self.reservoir_fill) == 0:
            return 0
        data = self._samples()
        pick = torch.randint(0, data.shape[0], (n_dead,), device=data.device)
        spread = data.std(0, keepdim=True).clamp_min(1e-6) * 0.01
        new = _broadcast(data[pick] + spread * torch.randn_like(data[pick]))
        self.embedding.weight.data[dead] = new.to(self.embedding.weight.dtype)
        self.ema_sum[dead] = new
        self.ema_size[dead] = 1.0
        self.last_reset[dead] = self.step
        return n_dead


# --------------------------------------------------------------------------- helpers


@torch.no_grad()
def kmeans(data: torch.Tensor, k: int, *, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """``k`` centroids of the rows of ``data`` by Lloyd's algorithm from a random start
    (empty clusters are re-seeded on random points); fewer rows than ``k`` repeat rows."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = data.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one vector")
    start = (
        torch.randperm(n, generator=gen)[:k] if n >= k else torch.randint(0, n, (k,), generator=gen)
    )
    centroids = data[start.to(data.device)].clone()
    for _ in range(iters):
        assign = _nearest(data, centroids)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1.0)[:, None])
        if bool(empty.any()):
            refill = torch.randint(0, n, (int(empty.sum()),), generator=gen).to(data.device)
            centroids[empty] = data[refill]
    return centroids


def _nearest(data: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    c_sq = centroids.pow(2).sum(1)
    out = torch.empty(data.shape[0], dtype=torch.long, device=data.device)
    for s in range(0, data.shape[0], chunk):
        x = data[s : s + chunk]
        out[s : s + chunk] = (c_sq - 2.0 * x @ centroids.t()).argmin(1)
    return out


def _distinct_sample(data: torch.Tensor, k: int) -> torch.Tensor:
    n = data.shape[0]
    pick = torch.randperm(n, device=data.device)[:k]
    if n < k:
        pick = torch.cat([pick, torch.randint(0, n, (k - n,), device=data.device)])
    return data[pick].clone()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(t: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (so every rank sees the same statistics); identity in one process."""
    if not _distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (new codes must agree across processes)."""
    if _distributed():
        t = t.contiguous()
        dist.broadcast(t, src=0)
    return t


def perplexity(indices: torch.Tensor, num_codes: int) -> float:
    """``exp(entropy)`` of the code histogram of ``indices`` (any shape)."""
    return perplexity_of_counts(torch.bincount(indices.reshape(-1), minlength=num_codes).float())


def perplexity_of_counts(counts: torch.Tensor) -> float:
    """``exp(entropy)`` of a histogram: the number of equally used codes it is worth."""
    p = counts / counts.sum().clamp_min(1.0)
    nz = p[p > 0]
    return float(math.exp(float(-(nz * nz.log()).sum())))
