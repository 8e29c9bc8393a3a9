"""What the command-line tools print: one-line errors on stderr, a single line on Ctrl-C
(exit status 130), help texts that show each default once."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

#: The exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., int])


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


def interruptible(prog: str) -> Callable[[F], F]:
    """Decorator for a CLI's ``main``: Ctrl-C prints ``<prog>: interrupted ...`` and returns
    130 instead of a traceback. Outputs are written atomically, so the ones finished before
    stay complete and a rerun resumes after them."""

    def decorator(main: F) -> F:
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                stderr_line(f"{prog}: interrupted (finished outputs are kept; run again to resume)")
                return INTERRUPTED

        return wrapper  # type: ignore[return-value]

    return decorator


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the default is empty (None, False,
    []) or the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)
