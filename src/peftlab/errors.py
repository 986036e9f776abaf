"""User-facing errors: one exception type whose message is printed as a single stderr line.

Anything the user can fix (a missing file, a malformed row, a config typo, too few rows) raises
`UserError`; the CLI prints `peftlab: error: <message>` and exits with status 2. Everything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


def one_line(exc: BaseException) -> str:
    """An exception as `Type: first line of its message` (at most 300 characters), for a record of a
    fallback (a CUDA-graph capture, a kernel warm-up) that is reported rather than raised."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
