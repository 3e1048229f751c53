"""Helpers for tests that must prove processes are gone and fds are closed."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (it runs nothing and,
    where PID 1 does not reap, an orphaned zombie never disappears)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in ("Z", "X")


async def wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """Wait until none of ``pids`` runs; return those still alive at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive or loop.time() >= deadline:
            return alive
        await asyncio.sleep(0.05)


def open_fds() -> set[str]:
    """This process's open fds with what they point at."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
        except OSError:
            continue  # the fd listdir itself used
    return found


def pids_in(text: str, label: str = "PIDS") -> list[int]:
    """The pids a test program printed as ``PIDS 12 34``."""
    match = re.search(rf"{label} ([\d ]+)", text)
    assert match, f"no {label} line in output: {text!r}"
    return [int(pid) for pid in match.group(1).split()]


# A program that starts a grandchild (optionally ignoring SIGTERM), prints both
# pids, then sleeps: for timeout and cancellation tests.
SPAWN_TREE = r"""
import os, signal, subprocess, sys, time
ignore = len(sys.argv) > 1 and sys.argv[1] == "stubborn"
code = "import signal, time\n" + (
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore else "") + "time.sleep(120)"
grandchild = subprocess.Popen([sys.executable, "-c", code])
if ignore:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(0.3)  # let the grandchild install its handler
print("PIDS", os.getpid(), grandchild.pid, flush=True)
time.sleep(120)
"""
