"""One run of the page: check the uploaded images, super-resolve them, report as events.

:meth:`SRRunner.run` does the work and tells what happens through ``emit(event)``;
:func:`stream` runs it on a worker thread and yields the events, so the page can show progress,
previews and results while sampling goes on. The pipeline is the one ``moe-sr`` uses, taken
from the :class:`~moe_sr.app.pool.PipelinePool`; images are read by ``read_image`` like the
CLI reads them (same messages for a non-image, a truncated file; 16-bit and alpha handled alike).
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from ldm.data.image_io import ImageReadError, read_image, write_image
from ldm.data.sr_inputs import lr_to_uint8_hwc
from moe_sr.app.cancel import Cancelled, CancelToken
from moe_sr.app.images import bicubic_x8, latent_preview, nearest_x8
from moe_sr.app.options import RunSettings, SizeLimits, cli_command
from moe_sr.app.pool import PipelinePool

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Message:
    """Something to tell the user; ``level``: ``info``, ``warning`` or ``error``."""

    text: str
    level: str = "info"


@dataclass(frozen=True)
class Step:
    """Sampling step ``step`` of ``steps`` done for image ``image`` of ``images`` (1-based);
    ``preview``: the current prediction as a picture (uint8 HWC), every few steps, to be shown
    against ``before`` (the bicubic x8 PNG of the same image)."""

    name: str
    image: int
    images: int
    step: int
    steps: int
    preview: Any = None
    before: Path | None = None


@dataclass(frozen=True)
class ImageResult:
    """One finished image: the PNG files written and how they were made."""

    name: str
    sr_path: Path
    nearest_path: Path
    bicubic_path: Path
    lr_size: tuple[int, int]  # (width, height)
    seconds: float
    timings: dict[str, float]
    settings: RunSettings
    command: str


@dataclass(frozen=True)
class ImageFailed:
    name: str
    message: str


@dataclass(frozen=True)
class Finished:
    results: list[ImageResult] = field(default_factory=list)
    failures: list[ImageFailed] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0


Event = Message | Step | ImageResult | ImageFailed | Finished
Emit = Callable[[Event], None]


# ----------------------------------------------------------------------------- the work
class SRRunner:
    """Runs the page's jobs with pipelines from ``pool``.

    Args:
        pool: built pipelines per device slot.
        model_args: the server's model options as ``moe-sr`` arguments (for the command shown).
        limits: input size limits, checked before any work.
        out_dir: where each run gets a folder for its PNGs.
        preview_every: a preview every this many steps (0: none).
    """

    def __init__(
        self,
        pool: PipelinePool,
        *,
        model_args: Sequence[str],
        limits: SizeLimits,
        out_dir: str | Path,
        preview_every: int = 5,
    ) -> None:
        self.pool = pool
        self.model_args = list(model_args)
        self.limits = limits
        self.out_dir = Path(out_dir)
        self.preview_every = max(0, int(preview_every))
        self._warnings_lock = threading.Lock()  # catch_warnings is process-wide

    # -- checks before any work
    def _refusal(self, path: Path, name: str, tile: str) -> str | None:
        """The size check, from the header only (nothing is decoded)."""
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Image.DecompressionBombError as err:
            return f"{name}: refused, too large to open safely ({err})"
        except Exception:  # noqa: BLE001 - not readable: read_image says why, as in the CLI
            return None
        return self.limits.refusal(name, width, height, tile)

    def _read(self, path: Path, name: str, emit: Emit):
        """``read_image`` as the CLI calls it; its warnings (alpha dropped) go to the page."""
        with self._warnings_lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                lr = read_image(path)
            except (ImageReadError, OSError, ValueError) as err:
                return None, str(err).replace(str(path), name)
        for w in caught:
            emit(Message(str(w.message).replace(str(path), name), "warning"))
        return lr, None

    def _accept(self, inputs: Sequence[str | Path], tile: str, emit: Emit):
        accepted, failures = [], []
        if len(inputs) > self.limits.max_files:
            failures.append(
                ImageFailed(
                    "(upload)",
                    f"{len(inputs)} images at once; this server takes at most "
                    f"{self.limits.max_files} per run (--max-files): the first "
                    f"{self.limits.max_files} are processed",
                )
            )
            inputs = inputs[: self.limits.max_files]
        for item in inputs:
            path = Path(item)
            name = path.name
            why = self._refusal(path, name, tile)
            lr = None
            if why is None:
                lr, why = self._read(path, name, emit)
            if why is not None:
                failures.append(ImageFailed(name, why))
            else:
                accepted.append((name, lr))
        return accepted, failures

    # -- the run
    def run(
        self, inputs: Sequence[str | Path], settings: RunSettings, cancel: CancelToken, emit: Emit
    ) -> Finished:
        """Super-resolve ``inputs`` with ``settings``; every event goes to ``emit``, the last
        one is the returned :class:`Finished`."""
        start = time.perf_counter()
        accepted, failures = self._accept(inputs, settings.tile, emit)
        for f in failures:
            emit(f)
        results: list[ImageResult] = []
        cancelled = False
        if accepted:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            out = Path(tempfile.mkdtemp(prefix="run-", dir=self.out_dir))
            wait_note = Message(f"waiting for a free slot on {settings.device} (another job runs)")
            try:
                with self.pool.acquire(
                    settings.device, settings.precision, cancel=cancel,
                    on_wait=lambda: emit(wait_note),
                ) as pipe:  # fmt: skip
                    pipe.set_ffn_moe_routing(settings.ffn_moe_routing)
                    pipe.tiling = replace(pipe.tiling, mode=settings.tile)
                    for k, (name, lr) in enumerate(accepted, start=1):
                        cancel.check()
                        emit(Step(name, k, len(accepted), 0, settings.steps))
                        try:
                            res = self._sr_one(pipe, lr, name, settings, out, cancel, emit, k,
                                               len(accepted))  # fmt: skip
                        except (ValueError, RuntimeError) as err:  # as the CLI: one image fails
                            failures.append(ImageFailed(name, str(err)))
                            emit(failures[-1])
                            continue
                        results.append(res)
                        emit(res)
            except Cancelled:
                cancelled = True
            except (ValueError, OSError, RuntimeError) as err:  # the pipeline could not be built
                failures.append(
                    ImageFailed(
                        "(model)",
                        f"cannot run on {settings.device} in {settings.precision}: {err}",
                    )
                )
                emit(failures[-1])
        done = Finished(results, failures, cancelled, time.perf_counter() - start)
        emit(done)
        return done

    def _sr_one(self, pipe, lr, name, settings, out: Path, cancel, emit, k, n) -> ImageResult:
        h, w = lr.shape[-2:]
        every = self.preview_every
        stem = _unique_stem(out, Path(name).stem)
        lr_u8 = lr_to_uint8_hwc(lr)
        nearest_path = write_image(nearest_x8(lr_u8), out / f"{stem}_lr_nearest.png")
        bicubic_path = write_image(bicubic_x8(lr_u8), out / f"{stem}_bicubic.png")

        def on_step(i: int, t: int, x, pred_x0) -> None:
            cancel.check()  # the Cancel button: stop sampling at the next step
            done = i + 1
            preview = None
            if every and done % every == 0 and done < settings.steps:
                preview = latent_preview(pred_x0, h, w)
            emit(Step(name, k, n, done, settings.steps, preview, bicubic_path))

        clock = time.perf_counter()
        result = pipe(
            lr, sampler=settings.sampler, steps=settings.steps, seed=settings.seed,
            eta=settings.sampler_eta,
            color_fix=settings.color_fix, callback=on_step,
        )  # fmt: skip
        seconds = time.perf_counter() - clock
        return ImageResult(
            name=name,
            sr_path=write_image(result.image, out / f"{stem}_sr8x.png"),
            nearest_path=nearest_path,
            bicubic_path=bicubic_path,
            lr_size=(int(w), int(h)),
            seconds=seconds,
            timings=dict(result.timings),
            settings=settings,
            command=cli_command(self.model_args, settings, name),
        )


def _unique_stem(folder: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3`` ... when a file of that stem was already written."""
    candidate, n = stem, 1
    while (folder / f"{candidate}_bicubic.png").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


# ----------------------------------------------------------------------------- streaming
def stream(work: Callable[[Emit], Any], cancel: CancelToken) -> Iterator[Event]:
    """Run ``work(emit)`` on a worker thread and yield what it emits, as it emits it.

    An exception in ``work`` is logged and ends the stream with an error :class:`Message` and
    a :class:`Finished` (the server keeps serving). Closing the generator early cancels the work
    and waits for it to stop (the job releases its device before the next one starts).
    """
    events: queue.Queue = queue.Queue()
    end = object()

    def target() -> None:
        try:
            work(events.put)
        except Exception as err:  # noqa: BLE001 - reported in the page, logged with traceback
            logger.exception("the job failed")
            events.put(Message(f"internal error: {type(err).__name__}: {err}", "error"))
            events.put(Finished())
        finally:
            events.put(end)

    thread = threading.Thread(target=target, name="moe-sr-app-job", daemon=True)
    thread.start()
    try:
        while True:
            item = events.get()
            if item is end:
                return
            yield item
    finally:
        if thread.is_alive():
            cancel.cancel()
        thread.join()
