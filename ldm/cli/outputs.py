"""The output side of the command-line tools, checked before any work starts.

A run that fails only when it writes its first result wastes the work before it (and a batch
that stops at one unwritable file loses the rest), and an output that lands on an input
destroys data. These checks run first: the output folder can be created and written, no
output path is one of the inputs (whatever ``--overwrite`` says), the output image type is one
:func:`ldm.data.image_io.write_image` writes. Each failure is an :class:`OutputError` with one
line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot or must not be written."""


def check_output_dir(folder: str | os.PathLike, *, flag: str = "-o") -> Path:
    """Prove that ``folder`` is, or can become, a writable folder: create it (and missing
    parents), create and remove a probe file in it, then remove again whatever folders the
    check created, so that a run that stops later leaves nothing behind. ``flag`` names the
    option in the message."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            f"{flag} {folder}: is a file, not a folder; name a folder for the outputs"
        )
    created: list[Path] = []
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".moe-sr-write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(
            f"{flag} {folder}: the output folder cannot be created or written ({reason}); "
            "choose another folder or fix its permissions"
        ) from None
    finally:
        for c in created:  # deepest first
            try:
                c.rmdir()
            except OSError:
                break
    return folder


def check_output_file(path: str | os.PathLike, *, flag: str = "--out") -> Path:
    """An output file path: not a folder, and its folder can be created and written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a folder; name the output file")
    check_output_dir(path.parent, flag=flag)
    return path


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuse_inputs_as_outputs(inputs: Iterable[Path], outputs: Iterable[Path]) -> None:
    """Raise when an output path is one of the input files (the same file after symlinks and
    ``..``, or a hard link to it): writing it would replace an input, whatever the flags."""
    by_path: dict[str, Path] = {}
    by_inode: dict[tuple[int, int], Path] = {}
    for p in inputs:
        by_path[os.path.realpath(p)] = Path(p)
        ino = _inode(Path(p))
        if ino is not None:
            by_inode[ino] = Path(p)
    clashes = []
    for out in outputs:
        src = by_path.get(os.path.realpath(out))
        if src is None:
            ino = _inode(Path(out))
            src = by_inode.get(ino) if ino is not None else None
        if src is not None:
            clashes.append(f"{out} (= input {src})")
    if clashes:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise OutputError(
            f"refusing to write over input files: {', '.join(clashes[:3])}{more}; choose an "
            "output folder apart from the inputs"
        )
