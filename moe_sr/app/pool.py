"""Built pipelines per device, and at most ``per_device`` jobs on one device at a time.

Each device has ``per_device`` slots; a slot holds at most one built pipeline (the precision
last asked for on it). A job takes a slot for the whole run, so nothing else touches that
pipeline's settings meanwhile, and two browser tabs never run two models on one GPU at once
with the default of one slot per device. The page's queue (Gradio's concurrency limit) keeps
the number of running jobs at the number of slots; this pool is the guarantee per device.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from moe_sr.app.cancel import CancelToken

logger = logging.getLogger(__name__)

#: ``build(device, precision) -> pipeline``
Builder = Callable[[str, str], Any]


class _Slot:
    def __init__(self, device: str, index: int) -> None:
        self.device, self.index = device, index
        self.precision: str | None = None
        self.pipe: Any = None


class PipelinePool:
    def __init__(self, build: Builder, per_device: int = 1) -> None:
        if per_device < 1:
            raise ValueError(f"per_device must be >= 1, got {per_device}")
        self._build = build
        self.per_device = per_device
        self._free: dict[str, queue.Queue[_Slot]] = {}
        self._lock = threading.Lock()

    def _slots(self, device: str) -> queue.Queue[_Slot]:
        with self._lock:
            if device not in self._free:
                slots: queue.Queue[_Slot] = queue.Queue()
                for i in range(self.per_device):
                    slots.put(_Slot(device, i))
                self._free[device] = slots
            return self._free[device]

    def _take(self, device: str, cancel: CancelToken | None, on_wait) -> _Slot:
        slots = self._slots(device)
        try:
            return slots.get_nowait()
        except queue.Empty:
            pass
        if on_wait is not None:
            on_wait()
        while True:
            if cancel is not None:
                cancel.check()
            try:
                return slots.get(timeout=0.1)
            except queue.Empty:
                continue

    @contextmanager
    def acquire(
        self,
        device: str,
        precision: str,
        *,
        cancel: CancelToken | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Iterator[Any]:
        """A pipeline on ``device`` in ``precision``, owned by the caller inside the block.

        Waits while every slot of ``device`` is busy (``on_wait`` is called once first; a
        cancelled ``cancel`` ends the wait with :class:`~moe_sr.app.cancel.Cancelled`).
        """
        slot = self._take(device, cancel, on_wait)
        try:
            if slot.pipe is None or slot.precision != precision:
                if slot.pipe is not None:
                    logger.info(
                        "%s slot %d: %s -> %s", device, slot.index, slot.precision, precision
                    )
                    slot.pipe, slot.precision = None, None
                    gc.collect()  # free the old pipeline before building the next one
                slot.pipe = self._build(device, precision)
                slot.precision = precision
            yield slot.pipe
        finally:
            self._slots(device).put(slot)

    def preload(self, device: str, precision: str) -> None:
        """Build one pipeline now (at start-up: weight problems show before the page opens)."""
        with self.acquire(device, precision):
            pass
