"""The web app's callbacks without a browser: settings, limits, the pool, cancellation, bad
input, and results checked against the ``moe-sr`` CLI, on the bundled demo model."""

from __future__ import annotations

import shlex
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.config import CONFIG_ROOT
from ldm.data.image_io import ImageReadError, read_image
from moe_sr.app.cancel import Cancelled, CancelToken
from moe_sr.app.controller import AppController
from moe_sr.app.jobs import Finished, ImageFailed, ImageResult, Message, SRRunner, Step, stream
from moe_sr.app.options import MAX_SEED, RunSettings, SettingsError, SizeLimits, cli_command
from moe_sr.app.pool import PipelinePool
from moe_sr.cli import app as app_cli

REPO = CONFIG_ROOT.parent
COFFEE = REPO / "assets" / "examples" / "lr" / "coffee.png"
STEPS = 4  # a divisor of T: LDM's exact DDIM grid

FORM = {
    "steps": STEPS, "sampler": "ddim", "seed": 7, "eta": 1.0, "color_fix": "adain",
    "tile": "auto", "ffn_moe_routing": "random", "device": "cpu", "precision": "fp32",
}  # fmt: skip


def _settings(**kw) -> RunSettings:
    return RunSettings.from_form(max_steps=999, devices=["cpu"], **{**FORM, **kw})


def _png(path: Path, size: int = 16, mode: str = "RGB", seed: int = 0) -> Path:
    """A small LR image: a crop of the coffee example (a real photo, not noise)."""
    img = Image.open(COFFEE).convert("RGB").crop((8, 8, 8 + size, 8 + size))
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(128)
    img.save(path)
    return path


def _png16(path: Path, size: int = 16) -> Path:
    """A 16-bit RGB PNG (PIL cannot write those: encode it by hand)."""
    import struct
    import zlib

    rgb = np.asarray(Image.open(COFFEE).convert("RGB").crop((0, 0, size, size)), np.uint16) * 257
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )  # fmt: skip
    return path


# --------------------------------------------------------------------------- options
def test_settings_are_checked_with_clear_messages():
    s = _settings(steps=10.0, seed="12")
    assert (s.steps, s.seed) == (10, 12)
    for bad, words in (
        ({"steps": 0}, "steps must be between 1 and 999"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"seed": -1}, f"between 0 and {MAX_SEED}"),
        ({"seed": "abc"}, "seed must be a whole number"),
        ({"eta": 2}, "eta must be between 0 and 1"),
        ({"color_fix": "sepia"}, "unknown colour fix 'sepia'; choose one of adain, wavelet, none"),
        ({"device": "cuda:3"}, "unknown device 'cuda:3'; choose one of cpu"),
        ({"precision": "fp16"}, "unknown precision 'fp16'; choose one of fp32, bf16"),
        ({"sampler": "euler"}, "unknown sampler 'euler'; choose one of ddim"),
        ({"tile": "maybe"}, "unknown tiling mode"),
    ):
        with pytest.raises(SettingsError, match=words.replace("(", r"\(")):
            _settings(**bad)


def test_size_limits_refuse_or_allow_tiling():
    limits = SizeLimits(max_pixels=100 * 100, max_tiled_pixels=200 * 200)
    assert limits.refusal("a.png", 100, 100, "auto") is None
    msg = limits.refusal("a.png", 150, 150, "auto")
    assert "a.png is 150x150 = 22,500 pixels" in msg and "--max-pixels" in msg
    assert "set tiling to 'on'" in msg
    assert limits.refusal("a.png", 150, 150, "on") is None
    msg = limits.refusal("a.png", 300, 300, "on")
    assert "crop or downscale it first" in msg
    assert "tiling" not in SizeLimits(100, 0).refusal("a.png", 20, 20, "off")


def test_cli_command_is_a_moe_sr_command_line():
    cmd = cli_command(
        ["--config", "demo/sr8x_demo", "--weights-dir", "my weights"], _settings(), "a b.png"
    )
    argv = shlex.split(cmd)
    assert argv[0] == "moe-sr" and argv[argv.index("--weights-dir") + 1] == "my weights"
    from moe_sr.cli.sr import build_parser

    args = build_parser().parse_args(argv[1:])  # a valid moe-sr command line
    assert (args.input, args.steps, args.seed, args.eta) == (["a b.png"], STEPS, 7, 1.0)
    assert (args.color_fix, args.ffn_moe_routing, args.tile, args.dtype) == (
        "adain", "random", "auto", "fp32",
    )  # fmt: skip


def test_app_cli_defaults_to_the_demo_model_and_lists_model_args(tmp_path):
    args = app_cli.resolve_model(app_cli.build_parser().parse_args([]))
    assert args.config == "demo/sr8x_demo" and Path(args.weights_dir).resolve() == (
        REPO / "assets" / "demo"
    )
    assert (args.host, args.share) == ("127.0.0.1", False)
    other = app_cli.resolve_model(
        app_cli.build_parser().parse_args(["--weights-dir", "w", "--offload", "--set", "a=1"])
    )
    assert app_cli.model_cli_args(other) == [
        "--config", "moe_sr/sr8x", "--set", "a=1", "--weights-dir", "w", "--offload",
    ]  # fmt: skip


def test_app_cli_bad_weights_exit_2_with_a_message(tmp_path, capsys):
    assert app_cli.main(["--weights-dir", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "moe-sr-app: cannot build the pipeline:" in err and "not a folder" in err


# --------------------------------------------------------------------------- pool
class _FakePipe:
    def __init__(self, device, precision):
        self.device, self.precision = device, precision


def test_pool_one_job_per_device_and_rebuild_on_precision_change():
    built = []
    pool = PipelinePool(lambda d, p: built.append((d, p)) or _FakePipe(d, p), per_device=1)
    inside, waited, order = threading.Event(), threading.Event(), []

    def first():
        with pool.acquire("cpu", "fp32") as pipe:
            order.append("first in")
            inside.set()
            assert waited.wait(60)
            time.sleep(0.05)
            order.append("first out")
            assert pipe.precision == "fp32"

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(60)
    with pool.acquire("other", "fp32"):  # another device: no waiting
        order.append("other device")
    with pool.acquire("cpu", "bf16", on_wait=waited.set) as pipe:  # waits for the first job
        order.append("second in")
        assert pipe.precision == "bf16"
    t.join()
    assert order == ["first in", "other device", "first out", "second in"]
    assert built == [("cpu", "fp32"), ("other", "fp32"), ("cpu", "bf16")]


def test_pool_wait_ends_on_cancel_and_build_errors_leave_the_slot_usable():
    pool = PipelinePool(lambda d, p: _FakePipe(d, p))
    token = CancelToken()
    with pool.acquire("cpu", "fp32"):
        threading.Timer(0.2, token.cancel).start()
        with pytest.raises(Cancelled):
            with pool.acquire("cpu", "fp32", cancel=token):
                pass
    calls = []

    def flaky(d, p):
        calls.append(p)
        if len(calls) == 1:
            raise RuntimeError("no such precision")
        return _FakePipe(d, p)

    pool = PipelinePool(flaky)
    with pytest.raises(RuntimeError):
        with pool.acquire("cpu", "fp32"):
            pass
    with pool.acquire("cpu", "fp32") as pipe:
        assert pipe.precision == "fp32"


def test_stream_reports_a_crash_and_closing_it_cancels_the_work():
    events = list(stream(lambda emit: (emit(Message("hi")), 1 / 0), CancelToken()))
    assert events[0] == Message("hi")
    assert events[1].level == "error" and "ZeroDivisionError" in events[1].text
    assert isinstance(events[2], Finished)

    token, stopped = CancelToken(), threading.Event()

    def work(emit):
        while not token.wait(0.01):
            emit(Message("tick"))
        stopped.set()

    gen = stream(work, token)
    next(gen)
    gen.close()
    assert token.cancelled and stopped.is_set()


# --------------------------------------------------------------------------- on the demo model
@pytest.fixture(scope="module")
def demo_args():
    return app_cli.resolve_model(app_cli.build_parser().parse_args(["--device", "cpu"]))


@pytest.fixture(scope="module")
def pool(demo_args):
    calls = []
    build = app_cli.make_builder(demo_args)
    pool = PipelinePool(lambda d, p: calls.append((d, p)) or build(d, p))
    pool.builds = calls
    return pool


def _controller(pool, demo_args, tmp_path, **limits) -> AppController:
    runner = SRRunner(
        pool, model_args=app_cli.model_cli_args(demo_args), limits=SizeLimits(**limits),
        out_dir=tmp_path / "results", preview_every=2,
    )  # fmt: skip
    return AppController(runner, devices=["cpu"], max_steps=999)


def _run(controller, files, session="s", **form):
    return list(controller.run(session, [str(f) for f in files], None, {**FORM, **form}))


@pytest.mark.parametrize("sampler", ["ddim", "unipc"])
def test_run_gives_an_8x_png_that_the_shown_command_reproduces(
    pool, demo_args, tmp_path, monkeypatch, sampler
):
    lr_path = _png(tmp_path / "crop.png", 16)
    views = _run(_controller(pool, demo_args, tmp_path), [lr_path], sampler=sampler)
    bars = [v["progress"] for v in views if v.get("progress")]
    assert [b[0] for b in bars] == [0, 0, 1, 2, 3, 4] and all(b[1] == STEPS for b in bars)
    previews = [v["slider"] for v in views if "slider" in v and not isinstance(v["slider"][1], str)]
    assert len(previews) == 1 and previews[0][1].shape == (128, 128, 3)  # step 2 of 4
    final = [v for v in views if "download" in v][-1]
    sr = np.asarray(Image.open(final["download"]))
    assert sr.shape == (128, 128, 3)
    assert [c for _, c in final["compare"]] == ["LR (nearest)", "bicubic", "SR (moe-sr)"]
    for path, _ in final["compare"]:
        assert Image.open(path).size == (128, 128)
    assert "crop.png**: 16x16 → 128x128" in final["details"]
    assert "Finished**: 1 image(s) done" in views[-1]["status"]
    assert views[-1]["progress"] is None

    # the equivalent command computes the same image with the CLI
    from moe_sr.cli.sr import main as sr_main

    argv = shlex.split(final["command"])[1:]
    assert argv[argv.index("--sampler") + 1] == sampler
    assert ("--eta" in argv) == (sampler == "ddim")  # the solvers take no eta
    argv[argv.index("-i") + 1] = str(lr_path)
    argv[argv.index("-o") + 1] = str(tmp_path / "cli")
    monkeypatch.chdir(REPO)
    assert sr_main([*argv, "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli" / "crop.png")), sr)


def test_cancel_stops_sampling_and_the_next_run_is_unaffected(pool, demo_args, tmp_path):
    lr_path = _png(tmp_path / "c.png", 8)
    controller = _controller(pool, demo_args, tmp_path)
    before = [v for v in _run(controller, [lr_path]) if "download" in v][-1]["download"]
    steps, views = 500, []
    for v in controller.run("tab", [str(lr_path)], None, {**FORM, "steps": steps}):
        views.append(v)
        if "DDIM step 3/" in v.get("status", ""):  # the Cancel click (another request)
            assert controller.cancel("tab")["status"].startswith("Cancelling")
    done = [v["progress"][0] for v in views if v.get("progress")]
    assert 3 <= max(done) < steps // 2, f"sampling went on after cancel: {max(done)} steps"
    assert "**Cancelled**: sampling stopped. 0 image(s) done" in views[-1]["status"]
    assert not any("download" in v for v in views)
    assert controller.cancel("tab")["status"] == "Nothing to cancel."

    # the interrupted pipeline gives the same result as before
    after = [v for v in _run(controller, [lr_path]) if "download" in v][-1]["download"]
    np.testing.assert_array_equal(np.asarray(Image.open(before)), np.asarray(Image.open(after)))


def test_cancel_before_the_queued_run_starts(pool, demo_args, tmp_path):
    controller = _controller(pool, demo_args, tmp_path)
    controller.submit("tab")  # the click; the run still waits in the queue
    controller.cancel("tab")
    builds = len(pool.builds)
    views = _run(controller, [_png(tmp_path / "q.png", 8)], session="tab")
    assert views == [{"status": "**Cancelled** before it started."}]
    assert len(pool.builds) == builds


def test_bad_inputs_are_reported_as_the_cli_does_and_good_ones_run(
    pool, demo_args, tmp_path, capsys, monkeypatch
):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png(tmp_path / "whole.png", 16).read_bytes()[:120])
    rgba = _png(tmp_path / "alpha.png", 8, mode="RGBA")
    deep = _png16(tmp_path / "deep.png", 8)
    assert read_image(deep).shape == (3, 8, 8)
    views = _run(_controller(pool, demo_args, tmp_path), [text, truncated, rgba, deep])
    status = views[-1]["status"]
    for bad in (text, truncated):
        with pytest.raises(ImageReadError) as err:
            read_image(bad)
        assert str(err.value).replace(str(bad), bad.name) in status
    assert "alpha.png: alpha channel dropped (image mode RGBA)" in status
    assert "2 image(s) done, 2 problem(s)" in status
    final = [v for v in views if "downloads" in v][-1]
    assert [Path(p).name for p in final["downloads"]] == ["alpha_sr8x.png", "deep_sr8x.png"]
    assert [c for _, c in final["gallery"]] == ["alpha.png", "deep.png"]

    # the CLI says the same about the same files
    from moe_sr.cli.sr import main as sr_main

    argv = ["-i", str(text), str(truncated), "-o", str(tmp_path / "cli"), "--quiet"]
    monkeypatch.chdir(REPO)
    assert sr_main(argv + app_cli.model_cli_args(demo_args) + ["--steps", "4"]) == 1
    err = capsys.readouterr().err
    for bad in (text, truncated):
        with pytest.raises(ImageReadError) as e:
            read_image(bad)
        assert str(e.value) in err


def test_too_large_inputs_are_refused_before_any_work(tmp_path):
    calls = []
    pool = PipelinePool(lambda d, p: calls.append(1))
    runner = SRRunner(pool, model_args=[], limits=SizeLimits(100, 0, 2), out_dir=tmp_path)
    big = tmp_path / "big.png"
    Image.new("RGB", (11, 10)).save(big)
    events = []
    done = runner.run([big, big, big], _settings(), CancelToken(), events.append)
    assert calls == [] and not list(tmp_path.glob("run-*"))
    assert done.failures[0].message.startswith("3 images at once; this server takes at most 2")
    assert (
        "big.png is 11x10 = 110 pixels, over this server's limit of 100" in done.failures[1].message
    )
    assert len(done.failures) == 3 and isinstance(events[-1], Finished)
    assert [type(e) for e in events] == [ImageFailed] * 3 + [Finished]


def test_images_pil_will_not_open_are_refused_by_size(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 11x10 > 2x: a "decompression bomb"
    big = tmp_path / "bomb.png"
    Image.new("RGB", (11, 10)).save(big)
    runner = SRRunner(PipelinePool(lambda d, p: None), model_args=[], limits=SizeLimits(),
                      out_dir=tmp_path)  # fmt: skip
    done = runner.run([big], _settings(), CancelToken(), lambda e: None)
    assert done.failures[0].message.startswith("bomb.png: refused, too large to open safely")


def test_form_errors_and_no_input_answer_without_running(pool, demo_args, tmp_path):
    controller = _controller(pool, demo_args, tmp_path)
    assert _run(controller, [], steps=4) == [
        {"status": "Add one or more LR images first (drop them on the upload box)."}
    ]
    views = _run(controller, [COFFEE], steps=0)
    assert views == [{"status": "**Error:** steps must be between 1 and 999, got 0"}]


def test_show_picks_a_result_and_random_seeds_are_in_range(tmp_path):
    import random

    rs = [
        ImageResult(
            f"{k}.png",
            tmp_path / f"{k}_sr8x.png",
            tmp_path / "n.png",
            tmp_path / "b.png",
            (4, 4),
            1.0,
            {"sample": 0.5},
            _settings(),
            f"moe-sr {k}",
        )  # fmt: skip
        for k in range(3)
    ]
    view = AppController.show(rs, 1)
    assert view["command"] == "moe-sr 1" and view["download"].endswith("1_sr8x.png")
    assert len(view["gallery"]) == 3 and AppController.show(rs, 9)["command"] == "moe-sr 2"
    assert AppController.show([], 0) == {}
    seeds = {AppController.random_seed(random.Random(k)) for k in range(20)}
    assert len(seeds) == 20 and all(0 <= s <= MAX_SEED for s in seeds)


def test_step_events_and_the_latent_preview(pool, demo_args, tmp_path):
    runner = SRRunner(pool, model_args=[], limits=SizeLimits(), out_dir=tmp_path, preview_every=1)
    events = []
    runner.run([_png(tmp_path / "p.png", 8)], _settings(steps=2), CancelToken(), events.append)
    steps = [e for e in events if isinstance(e, Step)]
    assert [(e.step, e.preview is not None) for e in steps] == [(0, False), (1, True), (2, False)]
    preview = steps[1].preview
    assert preview.dtype == np.uint8 and preview.shape == (64, 64, 3)
    assert preview.min() == 0 and preview.max() == 255  # each channel stretched
    assert steps[1].before.name == "p_bicubic.png"


def test_the_page_builds_with_the_controller(pool, demo_args, tmp_path):
    pytest.importorskip("gradio")
    from moe_sr.app.ui import PageInfo, build_page

    page = build_page(
        _controller(pool, demo_args, tmp_path), _settings(), PageInfo("t", "m", "l"),
        max_steps=999,
    )  # fmt: skip
    ids = {b.elem_id for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert {"lr-files", "run", "cancel", "status", "slider", "download", "command"} <= ids


def test_make_server_serves_localhost_with_one_job_per_device(tmp_path):
    pytest.importorskip("gradio")
    args = app_cli.resolve_model(
        app_cli.build_parser().parse_args(
            ["--device", "cpu", "--devices", "cpu", "--results-dir", str(tmp_path)]
        )
    )
    page, launch = app_cli.make_server(args)
    assert launch["server_name"] == "127.0.0.1" and launch["share"] is False
    assert page._queue.default_concurrency_limit == 1


def test_device_names_are_one_per_device():
    from moe_sr.app.options import available_devices, device_name

    assert device_name("cpu") == "cpu" and device_name("cuda:1") == "cuda:1"
    assert device_name("cuda") == "cuda:0" or torch_has_accelerator()
    assert available_devices()[0] == "cpu"


def torch_has_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available()


class _CountingPipe:
    """Stands in for the pipeline: counts how many runs are inside it at once."""

    def __init__(self, shared):
        from moe_sr.tiling import TilingConfig

        self.shared, self.tiling = shared, TilingConfig()

    def set_ffn_moe_routing(self, mode):
        self.routing = mode

    def __call__(self, lr, *, sampler, steps, eta, seed, color_fix, callback):
        import torch

        from moe_sr.pipeline import SRResult

        with self.shared["lock"]:
            self.shared["inside"] += 1
            self.shared["most"] = max(self.shared["most"], self.shared["inside"])
        try:
            for i in range(steps):
                time.sleep(0.02)
                callback(i, 999 - i, None, torch.zeros(1, 3, 2 * lr.shape[1], 2 * lr.shape[2]))
        finally:
            with self.shared["lock"]:
                self.shared["inside"] -= 1
        image = torch.rand(3, 8 * lr.shape[1], 8 * lr.shape[2])
        return SRResult(image=image, latent=torch.zeros(3, 1, 1), timings={"sample": 0.1})


def test_two_tabs_never_run_two_jobs_on_one_device_at_once(tmp_path):
    shared = {"lock": threading.Lock(), "inside": 0, "most": 0}
    pool = PipelinePool(lambda d, p: _CountingPipe(shared), per_device=1)
    runner = SRRunner(pool, model_args=[], limits=SizeLimits(), out_dir=tmp_path)
    controller = AppController(runner, devices=["cpu"], max_steps=999)
    lr_path = _png(tmp_path / "x.png", 8)
    views = {}

    def tab(name):
        views[name] = _run(controller, [lr_path], session=name, steps=25)

    threads = [threading.Thread(target=tab, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert shared["most"] == 1
    assert all("Finished**: 1 image(s) done" in v[-1]["status"] for v in views.values())
    waited = [
        n
        for n, v in views.items()
        if any("waiting for a free slot" in x.get("status", "") for x in v)
    ]
    assert len(waited) >= 1
