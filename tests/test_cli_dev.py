"""`llmmixer dev` and the intervention commands, as processes a person runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmmixer.runtime.address import free_port


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def llmmixer(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmmixer.client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[dict[str, str], int, int]]:
    port, ui_port = free_port(), free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LLMMIXER_HOME": str(tmp_path / "home"),
        "TEMPORAL_ADDRESS": f"127.0.0.1:{port}",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "llmmixer.client.cli", "dev", "--ui-port", str(ui_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not listening(port):
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "llmmixer dev did not start its server"
            time.sleep(0.2)
        yield env, port, ui_port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_dev_serves_runs_and_ctrl_c_stops_server_and_worker(
    dev: tuple[dict[str, str], int, int], tmp_path: Path
) -> None:
    env, _, ui_port = dev
    # The Web UI comes up a moment after the server's port on a busy machine.
    deadline = time.monotonic() + 30
    while not listening(ui_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert listening(ui_port), "the Web UI is not up"
    spec = tmp_path / "flaky.yaml"
    marker = tmp_path / "ready"
    spec.write_text(
        "name: flaky\ndefaults: {retry: {max_attempts: 1}}\nsteps:\n"
        f"  - id: check\n    kind: pty\n    command: [test, -f, {marker}]\n"
        "  - id: gate\n    kind: approval\n    needs: [check]\n"
    )
    run = llmmixer("run", str(spec), "--id", "flaky-1", env=env)
    assert run.returncode == 3, run.stderr
    assert "llmmixer retry flaky-1 check" in run.stderr

    refused = llmmixer("approve", "flaky-1", "check", env=env)
    assert refused.returncode == 1 and "not an approval" in refused.stderr
    marker.write_text("")
    retried = llmmixer("retry", "flaky-1", "check", env=env)
    assert retried.returncode == 0, retried.stderr
    assert "retry check: will run again" in retried.stdout
    for _ in range(100):
        status = llmmixer("status", "flaky-1", env=env)
        if "llmmixer approve flaky-1 gate" in status.stdout:
            break
        time.sleep(0.2)
    assert status.returncode == 3 and "llmmixer approve flaky-1 gate" in status.stdout
    approved = llmmixer("approve", "flaky-1", "gate", "--comment", "ship", env=env)
    assert approved.returncode == 0, approved.stderr
    watched = llmmixer("watch", "flaky-1", env=env)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.strip() == "ship"


def test_dev_ctrl_c_leaves_nothing_behind(dev: tuple[dict[str, str], int, int]) -> None:
    env, port, ui_port = dev
    leftovers = subprocess.run(
        ["pgrep", "-f", env["LLMMIXER_HOME"]], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip(), "the dev server should be running inside the fixture"
    # the fixture's finalizer sends Ctrl-C; check its effect here by doing it ourselves
    pids = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-f", "llmmixer.client.cli dev"], capture_output=True, text=True, check=False
        ).stdout.split()
    ]
    for pid in pids:
        if str(port) in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"):
            os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while (listening(port) or listening(ui_port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listening(port) and not listening(ui_port)
    while time.monotonic() < deadline:
        gone = subprocess.run(
            ["pgrep", "-f", env["LLMMIXER_HOME"]], capture_output=True, text=True, check=False
        )
        if not gone.stdout.strip():
            break
        time.sleep(0.2)
    assert gone.stdout.strip() == "", "a process of `llmmixer dev` outlived Ctrl-C"
