"""User-facing errors: one exception type whose message is printed as a single stderr line.

Anything the user can fix (a missing file, a malformed row, a config typo, too few rows) raises
`UserError`; the CLI prints `peftlab: error: <message>` and exits with status 2. Everything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""
