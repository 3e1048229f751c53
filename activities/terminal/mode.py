"""Whether this worker can give commands a pseudo-terminal, decided once.

A worker in a minimal container may lack ``/dev/ptmx``; commands then run on
plain pipes, and each ``CommandResult.mode`` records which one was used. The
answer lives in a ``TerminalCapability`` instance that the worker builds and
hands to ``CommandActivities``, not in a module global, so tests and several
workers in one process never share a stale probe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from llmmixer.activities.terminal.child import TerminalMode

__all__ = ["ModeSetting", "TerminalCapability", "probe_pty"]

ModeSetting = Literal["auto", "pty", "pipe"]
MODE_SETTINGS: tuple[ModeSetting, ...] = ("auto", "pty", "pipe")


def probe_pty() -> str | None:
    """None if a pty can be had here; otherwise the reason it cannot."""
    try:
        master, slave = os.openpty()
    except OSError as exc:
        return f"opening a pseudo-terminal failed ({exc}); is /dev/ptmx available?"
    os.close(master)
    os.close(slave)
    return None


@dataclass
class TerminalCapability:
    """The worker's terminal mode: the setting, plus one probe when it is ``auto``.

    ``setting`` comes from ``LLMMIXER_PTY_MODE``. ``pipe`` never probes;
    ``pty`` fails on first use if no pty can be opened, rather than silently
    changing how commands behave.
    """

    setting: ModeSetting = "auto"
    _mode: TerminalMode | None = field(default=None, init=False, repr=False)
    _reason: str | None = field(default=None, init=False, repr=False)

    @property
    def mode(self) -> TerminalMode:
        if self._mode is None:
            self._mode, self._reason = self._decide()
        return self._mode

    @property
    def reason(self) -> str:
        """Why the mode is what it is, for ``llmmixer doctor`` and logs."""
        mode = self.mode
        return self._reason or f"{mode} (LLMMIXER_PTY_MODE={self.setting})"

    def _decide(self) -> tuple[TerminalMode, str | None]:
        if self.setting == "pipe":
            return "pipe", "pipe (forced by LLMMIXER_PTY_MODE=pipe)"
        problem = probe_pty()
        if problem is None:
            return "pty", None
        if self.setting == "pty":
            raise RuntimeError(
                f"LLMMIXER_PTY_MODE=pty but {problem}; fix that, or set "
                "LLMMIXER_PTY_MODE=auto (or pipe) to run commands on pipes"
            )
        return "pipe", f"pipe ({problem})"
