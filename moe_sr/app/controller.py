"""The page's callbacks as plain functions: form values in, view updates (dicts) out.

The Gradio layer (:mod:`moe_sr.app.ui`) only maps the keys of these dicts to its components:

``status`` (markdown), ``progress`` (``(done, total, text)`` for the progress bar),
``slider`` (before/after pair), ``compare`` (LR nearest / bicubic / SR with captions),
``gallery`` (every SR result of the run), ``download`` (the shown result's PNG), ``downloads``
(every PNG of the run), ``details`` (markdown: sizes, time, settings), ``command`` (the
equivalent ``moe-sr`` command), ``results`` (the run's results, kept per browser session).
Keys that do not change are left out.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from moe_sr.app.cancel import CancelToken
from moe_sr.app.jobs import (
    Finished,
    ImageFailed,
    ImageResult,
    Message,
    SRRunner,
    Step,
    stream,
)
from moe_sr.app.options import MAX_SEED, RunSettings, SettingsError

View = dict[str, Any]
#: words, not emoji: a browser without an emoji font shows those as empty boxes
_LABELS = {"info": "", "warning": "**Warning:** ", "error": "**Error:** "}


class AppController:
    """Callbacks of one server: runs, cancel, seeds, showing a chosen result.

    Args:
        runner: does the work (pipelines, checks, files).
        devices: the devices offered (``RunSettings`` refuses others).
        max_steps: the most DDIM steps a run may ask for.
    """

    def __init__(self, runner: SRRunner, *, devices: Sequence[str], max_steps: int) -> None:
        self.runner = runner
        self.devices = list(devices)
        self.max_steps = max_steps
        self._tokens: dict[str, list[CancelToken]] = {}  # per session, oldest first
        self._claimed: set[int] = set()  # ids of tokens a run has taken
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ run and cancel
    def submit(self, session: str) -> None:
        """Called on the Run click itself, before the job waits in the queue: from then on the
        session's Cancel also stops this run, even before it starts."""
        with self._lock:
            self._tokens.setdefault(session, []).append(CancelToken())

    def _claim(self, session: str) -> CancelToken:
        """The oldest token submitted for ``session`` that no run has taken (or a new one)."""
        with self._lock:
            pending = self._tokens.setdefault(session, [])
            token = next((t for t in pending if id(t) not in self._claimed), None)
            if token is None:
                token = CancelToken()
                pending.append(token)
            self._claimed.add(id(token))
            return token

    def _release(self, session: str, token: CancelToken) -> None:
        with self._lock:
            self._claimed.discard(id(token))
            pending = self._tokens.get(session, [])
            if token in pending:
                pending.remove(token)
            if not pending:
                self._tokens.pop(session, None)

    def run(
        self, session: str, files: Sequence[str] | None, pasted: str | None, form: dict
    ) -> Iterator[View]:
        """Super-resolve the uploaded (``files``) and pasted images with the form's settings."""
        token = self._claim(session)
        try:
            inputs = [str(f) for f in (files or [])] + ([str(pasted)] if pasted else [])
            if not inputs:
                yield {"status": "Add one or more LR images first (drop them on the upload box)."}
                return
            try:
                settings = RunSettings.from_form(
                    max_steps=self.max_steps, devices=self.devices, **form
                )
            except SettingsError as err:
                yield {"status": f"{_LABELS['error']}{err}"}
                return
            if token.cancelled:
                yield {"status": "**Cancelled** before it started."}
                return
            yield from self._follow(inputs, settings, token)
        finally:
            self._release(session, token)

    def cancel(self, session: str) -> View:
        """Stop this session's runs: a running one at its next sampling step, a queued one
        before it starts."""
        with self._lock:
            tokens = list(self._tokens.get(session, []))
        if not tokens:
            return {"status": "Nothing to cancel."}
        for token in tokens:
            token.cancel()
        return {"status": "Cancelling: sampling stops at the next step…"}

    def _follow(self, inputs: list[str], settings: RunSettings, token: CancelToken):
        notes: list[str] = []
        results: list[ImageResult] = []
        total = len(inputs) * settings.steps
        yield {"status": f"Starting {len(inputs)} image(s)…", "progress": (0, total, "starting")}
        work = lambda emit: self.runner.run(inputs, settings, token, emit)  # noqa: E731
        for event in stream(work, token):
            if isinstance(event, Message):
                notes.append(f"{_LABELS.get(event.level, '')}{event.text}")
                yield {"status": _status(notes)}
            elif isinstance(event, ImageFailed):
                notes.append(f"{_LABELS['error']}{event.message}")
                yield {"status": _status(notes)}
            elif isinstance(event, Step):
                done = (event.image - 1) * event.steps + event.step
                line = (
                    f"Image {event.image}/{event.images} ({event.name}): "
                    f"DDIM step {event.step}/{event.steps}"
                )
                view: View = {"status": _status(notes, line), "progress": (done, total, line)}
                if event.preview is not None:
                    view["slider"] = (str(event.before), event.preview)
                yield view
            elif isinstance(event, ImageResult):
                results.append(event)
                view = self.show(results, len(results) - 1)
                view["status"] = _status(notes, f"{event.name}: done in {event.seconds:.1f} s")
                yield view
            elif isinstance(event, Finished):
                yield {"status": _status(notes, _summary(event)), "progress": None}

    # ------------------------------------------------------------------ other callbacks
    @staticmethod
    def random_seed(rng: random.Random | None = None) -> int:
        return (rng or random.SystemRandom()).randint(0, MAX_SEED)

    @staticmethod
    def show(results: Sequence[ImageResult], index: int | None) -> View:
        """The views of result ``index`` (comparison, download, details, command)."""
        if not results:
            return {}
        index = len(results) - 1 if index is None else max(0, min(int(index), len(results) - 1))
        r = results[index]
        return {
            "slider": (str(r.bicubic_path), str(r.sr_path)),
            "compare": [
                (str(r.nearest_path), "LR (nearest)"),
                (str(r.bicubic_path), "bicubic"),
                (str(r.sr_path), "SR (moe-sr)"),
            ],
            "gallery": [(str(x.sr_path), x.name) for x in results],
            "download": str(r.sr_path),
            "downloads": [str(x.sr_path) for x in results],
            "details": _details(r),
            "command": r.command,
            "results": list(results),
        }


def _status(notes: list[str], line: str | None = None) -> str:
    return "\n\n".join([*notes, *([line] if line else [])])


def _summary(done: Finished) -> str:
    parts = [f"{len(done.results)} image(s) done"]
    if done.failures:
        parts.append(f"{len(done.failures)} problem(s)")
    text = ", ".join(parts) + f" in {done.seconds:.1f} s"
    if done.cancelled:
        return f"**Cancelled**: sampling stopped. {text}."
    return f"**Finished**: {text}."


def _details(r: ImageResult) -> str:
    w, h = r.lr_size
    s = r.settings
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in r.timings.items())
    return (
        f"**{r.name}**: {w}x{h} → {8 * w}x{8 * h} in {r.seconds:.1f} s ({timing})\n\n"
        f"sampler {s.sampler} · {s.steps} steps · eta {s.eta:g} · seed {s.seed} · "
        f"colour fix {s.color_fix} · tiling {s.tile} · FFN-MoE routing {s.ffn_moe_routing} · "
        f"{s.device} · {s.precision}"
    )
