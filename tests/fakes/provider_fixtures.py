"""Fixtures for provider tests: the fake server, its environment, a loopback-only guard.

``provider_server``  a started :class:`FakeProviderServer` for one test
                     (``.url``, ``.openai_base_url``, ``.script(...)``, ``.calls``).
``other_server``     a second fake server for one test: the one a spec or plan
                     would like the worker's key to reach (it must never get it).
``provider_env``     sets ``OPENAI_BASE_URL``/``ANTHROPIC_BASE_URL``/
                     ``GOOGLE_GEMINI_BASE_URL`` to the fake server and the three
                     keys to fake values; returns the mapping it set.
``provider_settings`` ``ProviderSettings.from_env`` of that environment.
``provider_pool``    a ``ProviderPool`` (closed after the test); get adapters with
                     ``provider_pool.get(provider_settings.config_for("openai"))``.
``_loopback_only``   autouse: any socket connection (or name lookup) to a host
                     that is not loopback fails the test loudly, so a test
                     that forgot to point an SDK at the fake server can never
                     reach (or bill) a real provider.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fakes.provider_server import FAKE_KEYS, FakeProviderServer, RecordedCall, Reply

from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.core.contracts import ChatMessage, LlmCall

__all__ = [
    "FAKE_KEYS",
    "FakeProviderServer",
    "NonLoopbackTraffic",
    "RecordedCall",
    "Reply",
    "llm_call",
    "other_server",
    "provider_env",
    "provider_pool",
    "provider_server",
    "provider_settings",
]


class NonLoopbackTraffic(RuntimeError):
    """A test tried to reach a host outside this machine."""


def _allowed_host(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%", 1)[0]
    if host in ("localhost", "localhost.localdomain", ""):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a real name: DNS itself would be outside traffic
    return address.is_loopback or address.is_unspecified


def _refuse(host: Any) -> NonLoopbackTraffic:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return NonLoopbackTraffic(
        f"test tried to reach non-loopback host {host!r}: point the SDK at the fake server "
        "(the provider_server / provider_env fixtures) instead of a real provider"
    )


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _allowed_host(host):
            raise _refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            if not _allowed_host(address[0]):
                raise _refuse(address[0])

    def connect(self: socket.socket, address: Any) -> None:
        check(self, address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self, address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture
def provider_server() -> Iterator[FakeProviderServer]:
    server = FakeProviderServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def other_server() -> Iterator[FakeProviderServer]:
    server = FakeProviderServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def provider_env(
    provider_server: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    env = provider_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def provider_settings(provider_env: dict[str, str]) -> ProviderSettings:
    return ProviderSettings.from_env(os.environ)


@pytest.fixture
async def provider_pool(provider_settings: ProviderSettings) -> AsyncIterator[ProviderPool]:
    pool = ProviderPool(secrets=provider_settings.secrets())
    try:
        yield pool
    finally:
        await pool.aclose()


def llm_call(provider: str, model: str, prompt: str = "hello there", **fields: Any) -> LlmCall:
    """A rendered call as the workflow would send it (ids are fixed for tests)."""
    return LlmCall(
        workflow_id="wf-test",
        step_id="step",
        provider=provider,
        model=model,
        messages=[ChatMessage(role="user", content=prompt)],
        **fields,
    )
