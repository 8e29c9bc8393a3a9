"""Lightning callbacks of the training runs: image logs and a DDP replica check."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid

from ldm.atomic import write_text
from ldm.data.image_io import to_uint8_hwc, write_image
from ldm.registry import register

logger = logging.getLogger(__name__)


def to_uint8_grid(rows: list[torch.Tensor], nrow: int) -> np.ndarray:
    """Images in [-1, 1] (concatenated along the batch) -> one HWC uint8 grid."""
    x = torch.cat([r.detach().float().cpu() for r in rows], dim=0)
    grid = make_grid(((x.clamp(-1, 1) + 1) / 2), nrow=nrow, padding=2, pad_value=1.0)
    return to_uint8_hwc(grid)


class ImageLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps: a grid of LR / sample / HR columns.

    Calls ``pl_module.log_images(batch, n=max_images)`` (a dict of image batches in [-1, 1], in
    column order), writes ``<out_dir>/step-XXXXXX.png`` and, with a TensorBoard logger, adds the
    grid there too. Rank zero only. ``log_first_step`` also logs after the first batch of a
    fit (catches broken sampling early).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        every_n_steps: int = 1000,
        max_images: int = 4,
        log_first_step: bool = False,
        sample_steps: int | None = None,
    ):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.out_dir = Path(out_dir)
        self.every_n_steps = int(every_n_steps)
        self.max_images = int(max_images)
        self.log_first_step = bool(log_first_step)
        self.sample_steps = sample_steps
        self._last_logged = -1

    def should_log(self, step: int) -> bool:
        """``step`` = optimizer steps done (Lightning's ``global_step`` after the batch)."""
        if step == self._last_logged:
            return False
        if self.log_first_step and self._last_logged < 0:
            return True  # the first batch of this fit
        return step > 0 and step % self.every_n_steps == 0

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.should_log(step) or not hasattr(pl_module, "log_images"):
            return
        self._last_logged = step
        kwargs = {"n": self.max_images}
        if self.sample_steps is not None:
            kwargs["steps"] = self.sample_steps
        images = pl_module.log_images(batch, **kwargs)
        if not images:
            return
        n = next(iter(images.values())).shape[0]
        # one row per sample: [lr, sample, hr]
        cols = list(images.values())
        rows = [torch.stack([c[i] for c in cols]) for i in range(n)]
        grid = to_uint8_grid(rows, nrow=len(cols))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step-{step:06d}.png"
        write_image(grid, path)
        logger.info("image log: %s (%s)", path, " | ".join(images))
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("train/" + "_".join(images), grid, step, dataformats="HWC")


class SaveLastOnTrainEnd(L.Callback):
    """Write ``last.ckpt`` when fit ends (``ModelCheckpoint`` saves only every N steps).

    So that ``-r RUN_DIR`` continues from the final step, not from the last periodic save.
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        super().__init__()
        self.ckpt_dir = Path(ckpt_dir)

    def on_train_end(self, trainer, pl_module):
        if trainer.interrupted:
            return
        trainer.save_checkpoint(self.ckpt_dir / "last.ckpt", weights_only=False)


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, bytes), in state_dict order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ReplicaDigest(L.Callback):
    """At the end of fit, each rank writes ``<out_dir>/rank<r>.json`` with a weight digest.

    DDP keeps the replicas identical; this makes it checkable (the DDP test compares ranks).
    """

    def __init__(self, out_dir: str | os.PathLike):
        super().__init__()
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "digest": parameter_digest(pl_module),
        }
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        write_text(path, json.dumps(info, indent=1))


class ReseedPerRank(L.Callback):
    """When training starts, seed torch / numpy / random from (global seed, rank, step).

    ``seed_everything`` gives every DDP process the same seed, so all ranks would draw the same
    noise and timesteps for their (different) images, and a resumed run would replay the noise
    of its first steps. Mixing in the rank and the global step avoids both; the model's
    initialisation (done before) is unaffected.
    """

    def on_train_start(self, trainer, pl_module):
        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        seed = (base + 1_000_003 * trainer.global_rank + 7_919 * trainer.global_step) % 2**31
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


@register("step_timer")
class StepTimer(L.Callback):
    """Time training steps (median after ``warmup``) and the peak CUDA memory; log and save.

    ``lightning.callbacks.timer={target: step_timer, params: {out: timing.json}}``.
    """

    def __init__(self, out: str | None = None, warmup: int = 5):
        super().__init__()
        self.out = out
        self.warmup = int(warmup)
        self.times: list[float] = []
        self._t0 = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    def summary(self) -> dict:
        t = sorted(self.times[self.warmup :])
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        return {
            "steps": len(self.times),
            "median_step_s": t[len(t) // 2] if t else None,
            "peak_cuda_mem_gib": peak,
        }

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        res = self.summary()
        logger.info("step timing: %s", res)
        if self.out:
            write_text(self.out, json.dumps(res, indent=1))
