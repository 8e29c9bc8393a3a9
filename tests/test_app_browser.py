"""End to end in a real browser: ``moe-sr-app`` on a free localhost port with the demo model,
Debian's chromium driven by Playwright (``playwright`` from PyPI, the system chromium; no browser
download). ``make test`` installs both; where chromium is missing, the test is skipped with the
reason (never passed without running).

``MOESR_APP_SCREENSHOT=docs/app.png`` also saves a screenshot of the page with a result, at the
model's default step count (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from ldm.config import CONFIG_ROOT

REPO = CONFIG_ROOT.parent
EXAMPLE = REPO / "assets" / "examples" / "lr" / "coffee.png"
STEPS = 4  # few DDIM steps: the test checks the plumbing, not the quality
#: written by ``make browser`` when chromium could not be installed
INSTALL_NOTE = Path(sys.prefix) / "chromium-unavailable.txt"
CHROMIUM_FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    # no connections to Google's services on a closed network
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def _chromium() -> str:
    found = os.environ.get("MOESR_CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    note = INSTALL_NOTE.read_text().strip() if INSTALL_NOTE.is_file() else ""
    pytest.skip(
        "Debian's chromium is not installed (`make test` installs it with apt-get; "
        f"MOESR_CHROMIUM names another binary){': ' + note if note else ''}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moe-sr-app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(
        f"moe-sr-app did not answer on {url} in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
    )


@pytest.fixture
def server(tmp_path):
    """``(url, results_dir)`` of a running ``moe-sr-app``; stopped afterwards."""
    port = _free_port()
    shot = os.environ.get("MOESR_APP_SCREENSHOT")
    results = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "moe_sr.cli.app", "--port", str(port), "--device", "cpu",
        "--devices", "cpu", "--results-dir", str(results), "--preview-every", "2",
    ]  # fmt: skip
    if not shot:
        cmd += ["--steps", str(STEPS)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
    }
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_served(url, proc, log, timeout=240)
        yield url, results
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def chromium() -> str:
    """The chromium binary (checked before the server starts: a skip costs nothing)."""
    return _chromium()


@pytest.fixture
def page(chromium, server):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            tab.set_default_timeout(120_000)
            tab.goto(server[0])
            tab.wait_for_selector("#run")
            yield tab
        finally:
            browser.close()


def _status(tab) -> str:
    return tab.locator("#status").inner_text()


def _wait_status(tab, text: str, timeout: float = 180_000) -> None:
    tab.wait_for_function(
        "t => (document.querySelector('#status') || {}).innerText?.includes(t)",
        arg=text,
        timeout=timeout,
    )


def test_upload_run_download_cancel_in_chromium(chromium, server, page, tmp_path):
    results = server[1]
    lr = Image.open(EXAMPLE)
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    page.locator("#lr-files input[type=file]").set_input_files([str(EXAMPLE), str(notes)])
    page.wait_for_selector("#lr-files >> text=notes")  # shown as "notes" + ".png"
    page.locator("#run").click()
    _wait_status(page, "Finished")

    status = _status(page)
    assert "1 image(s) done, 1 problem(s)" in status
    assert "notes.png: not an image file PIL can read" in status  # read_image's own message
    assert page.locator("#command").inner_text().count("moe-sr --config demo/sr8x_demo") == 1
    with page.expect_download() as info:
        page.locator("#download").click()
    saved = tmp_path / "download.png"
    info.value.save_as(saved)
    assert info.value.suggested_filename == "coffee_sr8x.png"
    with Image.open(saved) as sr:
        assert sr.format == "PNG" and sr.size == (8 * lr.width, 8 * lr.height)
    written = sorted(results.rglob("*_sr8x.png"))
    assert len(written) == 1 and written[0].read_bytes() == saved.read_bytes()
    shot = os.environ.get("MOESR_APP_SCREENSHOT")
    if shot:
        page.locator("#compare").scroll_into_view_if_needed()
        page.screenshot(path=shot, full_page=True)
        return

    # the server keeps serving; a run of 500 steps (about a minute on 2 cores) stops on Cancel
    page.locator("#steps input[type=number]").fill("500")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#run").click()
    _wait_status(page, "DDIM step 3/500")
    clicked = time.monotonic()
    page.locator("#cancel").click()
    _wait_status(page, "Cancelled", timeout=60_000)
    assert time.monotonic() - clicked < 60
    assert "0 image(s) done" in _status(page)
    assert len(list(results.rglob("*_sr8x.png"))) == 1  # nothing more was written
