"""Cooperative cancellation: a flag set by the page's Cancel button, checked at every step."""

from __future__ import annotations

import threading


class Cancelled(Exception):
    """Raised inside a job (from the sampler's step callback) once its run was cancelled.

    Not a ``RuntimeError``: the per-image error handling (which reports ``ValueError`` /
    ``RuntimeError`` as a failed image, as the CLI does) must let it through.
    """


class CancelToken:
    """Set once by :meth:`cancel`; :meth:`check` raises :class:`Cancelled` from then on."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; ``True`` as soon as the run is cancelled."""
        return self._event.wait(seconds)
