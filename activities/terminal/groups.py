"""A command's process group: signalling it and making sure it is gone.

Every command is a session leader, so its pid is also its process-group id
and every descendant that did not call ``setsid`` itself is in that group.
On timeout, cancellation or any error the runner has ``terminate_group``
send the group SIGTERM, then SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from llmmixer.activities.terminal.child import Child
from llmmixer.activities.terminal.reaper import group_alive

__all__ = ["signal_group", "terminate_group"]


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def terminate_group(child: Child, grace_s: float) -> None:
    """SIGTERM the group, SIGKILL whatever is left after ``grace_s``.

    If this coroutine is itself cancelled mid-grace, the ``finally`` still
    sends SIGKILL: a second cancellation must never leave processes behind.
    """
    pgid = child.pid
    killed = False
    try:
        child.poll()
        if not group_alive(pgid):
            killed = True
            return
        signal_group(pgid, signal.SIGTERM)
        # A stopped process only acts on SIGTERM once continued.
        signal_group(pgid, signal.SIGCONT)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            child.poll()  # reap the direct child so it does not count as alive
            if not group_alive(pgid):
                killed = True
                return
            await asyncio.sleep(0.05)
    finally:
        if not killed:
            signal_group(pgid, signal.SIGKILL)
