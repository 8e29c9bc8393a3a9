"""Grouping images into batches of one padded size (the policy of ``moe-sr --batch-size``).

The pipeline samples a batch of images together only when they have the same padded size
(:meth:`~moe_sr.pipeline.MoESRPipeline.batch_key`); an image that needs tiling is its own batch
(its tiles already batch the UNet calls). Images arrive in sorted-name order and are kept
pending per size until a batch is full; when more than ``max_pending`` images wait (a folder of
many different sizes), the oldest size's group goes as it is. So memory holds at most
``max_pending`` decoded LR images, and every image is processed exactly once. An image's result
does not depend on its batch (its own seed and generators; see ``moe_sr.pipeline``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

__all__ = ["group_batches"]

T = TypeVar("T")


def group_batches(
    items: Iterable[T],
    key: Callable[[T], Hashable | None],
    batch_size: int,
    max_pending: int | None = None,
) -> Iterator[list[T]]:
    """Lists of up to ``batch_size`` items with equal ``key`` (``None``: always alone), each
    list as soon as it is full; the rest at the end, oldest group first."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive int, got {batch_size!r}")
    max_pending = 4 * batch_size if max_pending is None else max_pending
    pending: dict[Hashable, list[T]] = {}
    waiting = 0
    for item in items:
        k = key(item)
        if k is None or batch_size == 1:
            yield [item]
            continue
        group = pending.setdefault(k, [])
        group.append(item)
        waiting += 1
        if len(group) == batch_size:
            waiting -= len(group)
            yield pending.pop(k)
        elif waiting > max_pending:
            oldest = next(iter(pending))
            waiting -= len(pending[oldest])
            yield pending.pop(oldest)
    yield from pending.values()
