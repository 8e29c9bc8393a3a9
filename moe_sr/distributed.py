"""Sharding an SR run over processes started by ``torchrun`` (one GPU each, any number of nodes).

``torchrun --nproc_per_node N [--nnodes M ...] -m moe_sr -i lr/ -o sr/ ...`` starts ``N * M``
copies of the CLI with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each copy:

* takes every ``WORLD_SIZE``-th image of the full sorted input list, starting at its ``RANK``
  (:meth:`Shard.take`): a deterministic split that does not depend on which outputs exist, so
  ranks never disagree even while other ranks write; then skips its own existing outputs;
* runs on its own device (``cuda:LOCAL_RANK`` when CUDA is used);
* needs no collective during the work. At the end the ranks send their counts and failures to
  rank 0 over a gloo process group (CPU, TCP; no NCCL), which prints one summary.

Every image's result equals a one-process run with the same seed: the seed belongs to the
image, not to the rank (and with ``--batch-size 1`` the bytes are identical; larger batches
are identical up to kernel rounding, see ``moe_sr.pipeline``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

__all__ = ["Shard", "gather_to_rank0"]

T = TypeVar("T")
#: how long rank 0 waits for the slowest rank's summary (images can take minutes each)
SUMMARY_TIMEOUT = datetime.timedelta(hours=24)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class Shard:
    """This process's part of the work: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """From torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process when unset)."""
        shard = cls(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
        if shard.world_size < 1 or not 0 <= shard.rank < shard.world_size:
            raise ValueError(
                f"bad torchrun environment: RANK={shard.rank} WORLD_SIZE={shard.world_size}"
            )
        return shard

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def take(self, items: Sequence[T]) -> list[T]:
        """Items ``rank, rank + world_size, ...`` of the (sorted) list."""
        return list(items[self.rank :: self.world_size])

    def device(self, requested: str | None) -> str | None:
        """The device of this rank: ``cuda:LOCAL_RANK`` for ``None``/``"cuda"`` when several
        processes share CUDA devices; otherwise ``requested`` unchanged."""
        if not self.distributed or requested not in (None, "cuda"):
            return requested
        if not torch.cuda.is_available():
            return requested
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"


def gather_to_rank0(shard: Shard, value: Any) -> list[Any] | None:
    """Every rank's ``value`` (picklable) on rank 0, in rank order; ``None`` on the others.

    One process: ``[value]``. Several: a gloo process group from torchrun's rendezvous
    variables (``MASTER_ADDR``, ``MASTER_PORT``), used once and torn down; it also acts as the
    final barrier.
    """
    if not shard.distributed:
        return [value]
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group(
            "gloo", rank=shard.rank, world_size=shard.world_size, timeout=SUMMARY_TIMEOUT
        )
    try:
        out: list[Any] | None = [None] * shard.world_size if shard.rank == 0 else None
        dist.gather_object(value, out, dst=0)
        dist.barrier()
        return out
    finally:
        if own:
            dist.destroy_process_group()
