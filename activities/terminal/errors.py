"""The one error the terminal package raises on purpose.

``CommandRefusedError``: the command cannot be started as given (executable
missing or not executable, cwd missing, bad respond regex, empty argv, or the
policy refused it); nothing ran, retrying won't help. ``commands.py`` turns it
into a non-retryable ``CommandRefused`` activity failure.
"""

from __future__ import annotations

__all__ = ["CommandRefusedError"]


class CommandRefusedError(Exception):
    """The command cannot be started as given; the message says what to change."""
