"""Where llmmixer keeps local state: the embedded server's SQLite file and log.

``LLMMIXER_HOME`` wins; otherwise the platform's per-user data directory. The
directory is private (0700) because the SQLite file holds workflow history:
prompts and model outputs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from llmmixer.runtime.settings import ConnectionEnv

__all__ = ["HomeDirectoryError", "default_home", "llmmixer_home"]


class HomeDirectoryError(OSError):
    """The state directory cannot be created; the message says the fix."""


def default_home(environ: Mapping[str, str], platform: str = sys.platform) -> Path:
    """The directory :func:`llmmixer_home` uses when ``LLMMIXER_HOME`` is not set."""
    user_home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    if platform == "darwin":
        return user_home / "Library" / "Application Support" / "llmmixer"
    if platform == "win32":
        local = environ.get("LOCALAPPDATA")
        base = Path(local) if local else user_home / "AppData" / "Local"
        return base / "llmmixer"
    # XDG says a relative XDG_DATA_HOME is invalid and must be ignored.
    xdg = environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else user_home / ".local" / "share"
    return base / "llmmixer"


def llmmixer_home(
    environ: Mapping[str, str] | None = None, *, platform: str = sys.platform
) -> Path:
    """``$LLMMIXER_HOME`` or the user's data directory, created on demand.

    ``environ`` defaults to ``os.environ``; tests pass their own mapping.
    """
    env = os.environ if environ is None else environ
    home = ConnectionEnv.from_env(env).home or default_home(env, platform)
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise HomeDirectoryError(
            f"cannot create the llmmixer state directory {home}: {exc.strerror or exc}: "
            "set LLMMIXER_HOME to a writable directory"
        ) from exc
    if not os.access(home, os.W_OK):
        raise HomeDirectoryError(
            f"the llmmixer state directory {home} is not writable: "
            "set LLMMIXER_HOME to a writable directory"
        )
    return home.resolve()
