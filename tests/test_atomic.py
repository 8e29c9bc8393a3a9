"""ldm.atomic: unique temporary names, the usual file mode, cleanup after a killed run.

Issue: two processes writing the same weight or latent file used one fixed ``.tmp`` name and
raced (``FileNotFoundError``); safetensors files were created ``0600``; a killed run left its
temporary files behind for good.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.atomic import atomic_write, clean_orphans, file_mode, write_bytes
from ldm.checkpoint import save_pretrained

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_two_processes_writing_the_same_weight_file_both_succeed(tmp_path):
    target = tmp_path / "w.safetensors"
    script = textwrap.dedent(
        f"""
        import pathlib, sys, time, torch
        from ldm.checkpoint import save_pretrained
        m = torch.nn.Linear(64, 64)
        torch.nn.init.constant_(m.weight, float(sys.argv[1]))
        ready = pathlib.Path({str(tmp_path)!r}, "ready" + sys.argv[1])
        ready.touch()
        while len(list(ready.parent.glob("ready*"))) < 2:  # start together
            time.sleep(0.01)
        for _ in range(300):
            save_pretrained(m, {str(target)!r}, {{"target": "linear"}})
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(v)], env=_env(), stderr=subprocess.PIPE)
        for v in (1.0, 2.0)
    ]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    weight = load_file(str(target))["weight"]  # complete, one writer's values throughout
    assert weight.unique().numel() == 1 and float(weight[0, 0]) in (1.0, 2.0)
    assert sorted(os.listdir(tmp_path)) == ["ready1.0", "ready2.0", "w.safetensors"]


def test_written_weights_get_the_usual_mode_not_0600(tmp_path):
    out = save_pretrained(torch.nn.Linear(2, 2), tmp_path / "w.safetensors", {"target": "x"})
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask == file_mode()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_bytes(tmp_path / "a.bin", b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_temporary_names_are_unique_and_hidden(tmp_path):
    with atomic_write(tmp_path / "a.png") as t1, atomic_write(tmp_path / "a.png") as t2:
        assert t1 != t2 and t1.parent == t2.parent == tmp_path
        assert t1.name.startswith(".a.png.") and t1.suffix == ".tmp"
        t1.write_bytes(b"1")
        t2.write_bytes(b"2")
    assert (tmp_path / "a.png").read_bytes() == b"1"  # the outer block ends last
    assert os.listdir(tmp_path) == ["a.png"]


def test_a_killed_writer_s_temporary_is_removed_by_the_next_run(tmp_path):
    folder = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal
        from ldm.atomic import atomic_write
        with atomic_write({str(folder / "x.safetensors")!r}) as tmp:
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), check=False)
    assert proc.returncode == -9
    (orphan,) = folder.iterdir()
    assert orphan.name.startswith(".x.safetensors.") and orphan.name.endswith(".tmp")
    # temporaries of a live process (this one) and of another host are left alone
    live = folder / f".y.png.{orphan.name.split('.')[-3].rsplit('-', 1)[0]}-{os.getpid()}.ab_c.tmp"
    other_host = folder / ".z.png.elsewhere-1.abc.tmp"
    live.write_bytes(b"")
    other_host.write_bytes(b"")
    write_bytes(folder / "next.bin", b"done")  # the next run's first write into the folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [live.name, other_host.name, "next.bin"]
    )
    assert clean_orphans(folder) == []
