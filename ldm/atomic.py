"""Atomic file writes: the one place that writes a file under a temporary name and renames it.

``with atomic_write(path) as tmp: save(tmp)`` hands out a fresh temporary path next to ``path``
(same folder, so the final rename is atomic), then gives the file the usual mode (``0666`` minus
the umask: ``mkstemp`` and safetensors create ``0600`` files) and renames it over ``path``. On
an error the temporary file is removed and ``path`` keeps its old content. Readers therefore
see the old file or the complete new one, never half of one.

Temporary names are unique per call (``tempfile.mkstemp``), so two processes writing the same
file never trip over each other's temporary (the last rename wins, both files are complete).
They look like ``.<name>.<host>-<pid>.<random>.tmp``: a process killed mid-write leaves such a
file behind, and the next write into that folder removes the ones whose process (on this host)
no longer runs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: ``.<name>.<host>-<pid>.<random>.tmp``; ``<random>`` is mkstemp's (letters, digits, ``_``).
_TEMP_RE = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
#: Folders whose orphaned temporary files this process has already removed.
_CLEANED: set[str] = set()


def _host() -> str:
    """This machine's name, reduced to characters that cannot confuse :data:`_TEMP_RE`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (``0666`` minus the umask)."""
    try:  # Linux: the umask without changing it (os.umask would race with other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def clean_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files that :func:`atomic_write` left in ``folder`` when its process
    was killed (same host, process gone); returns what was removed. Files of live processes
    and of other hosts are left alone."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process cleaned it first
            try:
                os.unlink(entry.path)
            except IsADirectoryError:
                continue
            removed.append(Path(entry.path))
    if removed:
        logger.info(
            "%s: removed %d temporary file(s) of an interrupted earlier run", folder, len(removed)
        )
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a unique temporary path in ``path``'s folder; when the block ends without an
    error, give the file the usual mode and rename it to ``path`` (else remove it).

    The first write of a process into a folder also removes orphaned temporary files of
    killed earlier runs there (:func:`clean_orphans`).
    """
    path = Path(path)
    folder = path.parent
    if make_parents:
        folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key not in _CLEANED:
        _CLEANED.add(key)
        clean_orphans(folder)
    # the name part is cut so that the temporary name stays within the usual 255-byte limit
    prefix = f".{path.name[:120]}.{_host()}-{os.getpid()}."
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(errno.ENOENT, "the writer removed the temporary file", tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """``path.write_text(text)``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``path.write_bytes(data)``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
