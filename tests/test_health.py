"""The worker's health endpoint, over real HTTP on 127.0.0.1.

Probers (kubelet, Docker, Compose) only see status codes and bodies, so these
tests speak HTTP to a bound socket: a real client for ordinary requests and raw
sockets for the malformed or stalled ones a buggy prober could send.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import httpx
import pytest

from llmmixer.workers.health import (
    HEALTH_PORT_ENV,
    HealthServer,
    ReadinessState,
    health_port_from_env,
)


@pytest.fixture
async def state() -> ReadinessState:
    return ReadinessState()


@pytest.fixture
async def server(state: ReadinessState) -> AsyncIterator[HealthServer]:
    # port 0: the OS picks a free port, so parallel runs never collide
    async with HealthServer("127.0.0.1", 0, state, read_timeout_s=0.5) as running:
        yield running


@pytest.fixture
async def http(server: HealthServer) -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: a developer's HTTP_PROXY must not route loopback probes
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.port}", trust_env=False, timeout=5
    ) as client:
        yield client


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send bytes as-is and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()


async def test_healthz_answers_ok(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok\n"
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["connection"] == "close"


async def test_healthz_is_ok_even_when_not_ready(http: httpx.AsyncClient) -> None:
    # liveness must not depend on Temporal: a worker waiting for its server is
    # alive, and restarting it would not bring Temporal back
    assert (await http.get("/readyz")).status_code == 503
    assert (await http.get("/healthz")).status_code == 200


async def test_readyz_follows_the_readiness_state(
    http: httpx.AsyncClient, state: ReadinessState
) -> None:
    first = await http.get("/readyz")
    assert (first.status_code, first.text) == (503, "starting\n")

    state.set_ready()
    ready = await http.get("/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")

    state.set_not_ready("shutting down: draining activities")
    draining = await http.get("/readyz")
    assert (draining.status_code, draining.text) == (503, "shutting down: draining activities\n")


async def test_plain_bool_readiness() -> None:
    answers = iter([False, True])
    async with HealthServer("127.0.0.1", 0, lambda: next(answers)) as server:
        async with httpx.AsyncClient(trust_env=False) as client:
            url = f"http://127.0.0.1:{server.port}/readyz"
            not_ready = await client.get(url)
            assert (not_ready.status_code, not_ready.text) == (503, "not ready\n")
            assert (await client.get(url)).status_code == 200


async def test_reason_is_one_short_line() -> None:
    reason = "connection refused\r\nX-Injected: yes\n" + "x" * 1000
    async with HealthServer("127.0.0.1", 0, lambda: (False, reason)) as server:
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/readyz")
    assert response.status_code == 503
    body = response.text
    assert body.endswith("\n") and body.count("\n") == 1
    assert body.startswith("connection refused X-Injected: yes x")
    assert len(body) <= 201
    assert "x-injected" not in response.headers


async def test_failing_readiness_is_503_without_the_message() -> None:
    def explode() -> bool:
        raise ConnectionError("dial tcp user:hunter2@temporal:7233 refused")

    async with HealthServer("127.0.0.1", 0, explode) as server:
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/readyz")
    assert response.status_code == 503
    assert response.text == "readiness check failed: ConnectionError\n"
    assert "hunter2" not in response.text


async def test_query_string_is_ignored(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz?verbose=1")).status_code == 200


@pytest.mark.parametrize("path", ["/", "/health", "/healthz/", "/readyz/x", "/metrics"])
async def test_other_paths_are_404(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    assert response.status_code == 404


async def test_head_has_headers_and_no_body(server: HealthServer) -> None:
    raw = await raw_exchange(server.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 3" in head
    assert body == b""


async def test_other_methods_are_405(http: httpx.AsyncClient) -> None:
    response = await http.post("/healthz", content=b"")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "request_bytes",
    [b"garbage\r\n\r\n", b"GET /healthz\r\n\r\n", b"GET /healthz SPDY/3\r\n\r\n"],
)
async def test_malformed_request_is_400(server: HealthServer, request_bytes: bytes) -> None:
    raw = await raw_exchange(server.port, request_bytes)
    assert raw.startswith(b"HTTP/1.1 400 ")


async def test_overlong_request_line_is_refused(server: HealthServer) -> None:
    raw = await raw_exchange(server.port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")


async def test_endless_headers_are_refused(server: HealthServer) -> None:
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(200))
    raw = await raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")


async def test_a_silent_client_neither_blocks_others_nor_lingers(
    server: HealthServer, http: httpx.AsyncClient
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        # the stalled connection does not hold up a real probe...
        assert (await http.get("/healthz")).status_code == 200
        # ...and is closed by the server after read_timeout_s (0.5 s here)
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    finally:
        writer.close()


async def test_a_bare_tcp_connect_gets_no_error(server: HealthServer) -> None:
    # what a TCP-socket probe does: connect and close without sending
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.close()
    await writer.wait_closed()
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"http://127.0.0.1:{server.port}/healthz")).status_code == 200


async def test_stop_closes_the_port_and_open_connections() -> None:
    server = HealthServer("127.0.0.1", 0, lambda: True, read_timeout_s=60)
    await server.start()
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)  # let the server accept it
    await asyncio.wait_for(server.stop(), timeout=5)
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await server.stop()  # idempotent


async def test_the_worker_keeps_its_signals_and_nothing_is_revealed() -> None:
    # The worker drains on SIGTERM; a web server that took the signal for
    # itself would stop the probes and leave the worker running undrained.
    signals = (signal.SIGINT, signal.SIGTERM)
    before = [signal.getsignal(number) for number in signals]
    async with HealthServer("127.0.0.1", 0, lambda: True) as server:
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/healthz")
        assert [signal.getsignal(number) for number in signals] == before
    assert response.status_code == 200
    assert "server" not in response.headers and "date" not in response.headers


async def test_port_is_known_only_after_start() -> None:
    server = HealthServer("127.0.0.1", 0, lambda: True)
    with pytest.raises(RuntimeError, match="after start"):
        _ = server.port
    async with server:
        assert server.port > 0
        with pytest.raises(RuntimeError, match="already started"):
            await server.start()


async def test_many_concurrent_probes(server: HealthServer, http: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(*(http.get("/healthz") for _ in range(50)))
    assert {r.status_code for r in responses} == {200}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("  ", None), ("8081", 8081), (" 9000 ", 9000), ("0", 0)],
)
def test_health_port_from_env(value: str | None, expected: int | None) -> None:
    environ = {} if value is None else {HEALTH_PORT_ENV: value}
    assert health_port_from_env(environ) == expected


@pytest.mark.parametrize("value", ["http", "80a", "-1", "65536", "8081.0"])
def test_health_port_from_env_rejects_non_ports(value: str) -> None:
    with pytest.raises(ValueError, match=HEALTH_PORT_ENV):
        health_port_from_env({HEALTH_PORT_ENV: value})


def test_health_port_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HEALTH_PORT_ENV, "8123")
    assert health_port_from_env() == 8123
    monkeypatch.delenv(HEALTH_PORT_ENV)
    assert health_port_from_env() is None
