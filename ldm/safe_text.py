"""Text from untrusted files (tensor names, config keys, decoder messages) made safe to print.

A name inside a weight file can hold newlines or terminal escape sequences; printed as it is,
it would break the one-line error messages (or forge lines of its own). :func:`printable`
escapes every non-printable character and shortens very long text.
"""

from __future__ import annotations


def printable(text: object, limit: int = 300) -> str:
    """``str(text)`` with non-printable characters escaped (``\\n``, ``\\x1b``) and cut to
    ``limit`` characters."""
    s = str(text)
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return out if len(out) <= limit else out[: limit - 3] + "..."
