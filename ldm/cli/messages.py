"""Error output shared by the command-line tools (stderr, one line per message)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def stderr_line(line: str) -> None:
    """Write one line to stderr."""
    sys.stderr.write(line + "\n")


def report_failures(header: str, lines: Sequence[str]) -> int:
    """``header`` and the indented ``lines`` on stderr when there are any; the exit status
    (1 when something failed, else 0)."""
    if not lines:
        return 0
    stderr_line(header)
    for line in lines:
        stderr_line(f"  {line}")
    return 1
