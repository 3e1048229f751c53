"""MCP sessions a worker keeps open, one per server configuration, started under its policy.

A stdio server is a command like any other: its executable must be in
``LLMMIXER_PTY_ALLOW``, it gets the scrubbed environment of ``CommandPolicy``
(plus the tool's ``env``, which may not set hook variables) and starts
without capabilities. Its stderr is discarded: it may print what the worker
must not log. An HTTP server is reached only when its URL lies under an entry
of ``LLMMIXER_ALLOWED_MCP_URLS`` (comma list of origins or URL prefixes); no
key of the worker is ever sent to it.

The pool is one object per worker (``McpSessionPool``), closed when the
worker stops. A session is reused by every call with the same server
configuration; one whose server died is noticed before the next call and
started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import IO, Any

from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CONNECTION_CLOSED

from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.core.contracts import CommandCall
from llmmixer.core.endpoints import parse_endpoint
from llmmixer.core.tools import McpTool
from llmmixer.runtime.settings import CommandEnv

__all__ = [
    "ALLOWED_MCP_URLS_VARIABLE",
    "McpRefusedError",
    "McpSessionPool",
    "McpUnavailableError",
    "parse_allowed_mcp_urls",
]

log = logging.getLogger("llmmixer.mcp")

ALLOWED_MCP_URLS_VARIABLE = "LLMMIXER_ALLOWED_MCP_URLS"
_EXAMPLE = f"{ALLOWED_MCP_URLS_VARIABLE}=http://127.0.0.1:8000/mcp,https://tools.internal.example"
# Servers kept open at once; the least recently used one is closed beyond it,
# so specs naming many servers cannot pile up processes on a shared worker.
DEFAULT_MAX_SESSIONS = 16
START_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 10.0


class McpRefusedError(Exception):
    """The worker does not allow this server; the message names the setting to change."""


class McpUnavailableError(Exception):
    """The server could not be started or reached, or died during a call."""


def parse_allowed_mcp_urls(raw: str) -> tuple[str, ...]:
    """``LLMMIXER_ALLOWED_MCP_URLS`` as a tuple; a bad entry raises ValueError naming it."""
    entries: list[str] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            parse_endpoint(item)
        except ValueError as error:
            raise ValueError(
                f"{ALLOWED_MCP_URLS_VARIABLE}: {item!r} is not an origin or URL prefix "
                f"({error}); list http(s) origins or URL prefixes separated by commas, for "
                f"example {_EXAMPLE}"
            ) from None
        entries.append(item)
    return tuple(entries)


def _server_key(server: McpTool) -> str:
    return json.dumps(
        {"command": server.command, "cwd": server.cwd, "env": server.env, "url": server.url},
        sort_keys=True,
    )


class _Session:
    """One connected ``mcp.Client``, owned by a task of its own.

    The SDK's transports hold task groups that must be left by the task that
    entered them; calls from activities only send on its streams.
    """

    def __init__(self, key: str, transport: Any, errlog: IO[str] | None) -> None:
        self.key = key
        self._transport = transport
        self._errlog = errlog
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.client: Client | None = None

    async def start(self, timeout_s: float) -> Client:
        ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(ready, timeout_s), name="mcp-session")
        try:
            # The SDK times the handshake out itself (read_timeout_seconds) and
            # unwinds its transport, which stops the server; this outer limit
            # only guards against a transport that hangs anyway.
            self.client = await asyncio.wait_for(ready, timeout_s + 10)
        except BaseException:
            await self.close()
            raise
        return self.client

    async def _run(self, ready: asyncio.Future[Client], timeout_s: float) -> None:
        try:
            async with Client(
                self._transport, cache=None, read_timeout_seconds=timeout_s
            ) as client:
                if not ready.done():
                    ready.set_result(client)
                await self._stop.wait()
        except BaseException as error:  # reported to whoever waits
            if not ready.done():
                ready.set_exception(error)
            elif not isinstance(error, asyncio.CancelledError):
                log.debug("an MCP session ended: %s", type(error).__name__)
        finally:
            if self._errlog is not None:
                self._errlog.close()

    async def close(self) -> None:
        self._stop.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 10.0)
        except BaseException:  # closing is best effort
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class McpSessionPool:
    """The worker's MCP sessions; ``client(server)`` gives a live one, starting it if needed."""

    def __init__(
        self,
        policy: CommandPolicy,
        allowed_urls: tuple[str, ...] = (),
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.policy = policy
        self.allowed_urls = parse_allowed_mcp_urls(",".join(allowed_urls))
        self.max_sessions = max_sessions
        self.start_timeout_s = start_timeout_s
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        # One lock per server: starting a slow server does not hold up calls to others.
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    @classmethod
    def from_env(
        cls, policy: CommandPolicy, environ: Mapping[str, str] | None = None
    ) -> McpSessionPool:
        environ = os.environ if environ is None else environ
        return cls(policy, CommandEnv.from_env(environ).allowed_mcp_urls)

    def check_allowed(self, server: McpTool, *, workflow_id: str = "", step_id: str = "") -> None:
        """Raise McpRefusedError unless this worker may start or reach ``server``."""
        if server.url is not None:
            self._check_url(server.url)
            return
        try:
            self.policy.prepare(self._command_call(server, workflow_id, step_id))
        except CommandRefusedError as error:
            raise McpRefusedError(f"MCP server `{server.name}`: {error}") from None

    def _check_url(self, url: str) -> None:
        try:
            wanted = parse_endpoint(url)
        except ValueError as error:
            raise McpRefusedError(f"MCP url {url!r} cannot be used: {error}") from None
        if any(parse_endpoint(entry).covers(wanted) for entry in self.allowed_urls):
            return
        listed = ", ".join(self.allowed_urls) or "nothing"
        raise McpRefusedError(
            f"MCP url {url!r} is not under {ALLOWED_MCP_URLS_VARIABLE} ({listed}); the "
            f"worker's operator adds the server's origin or URL prefix to "
            f"{ALLOWED_MCP_URLS_VARIABLE} to let steps use it"
        )

    @staticmethod
    def _command_call(server: McpTool, workflow_id: str, step_id: str) -> CommandCall:
        return CommandCall(
            workflow_id=workflow_id,
            step_id=step_id,
            argv=list(server.command or []),
            cwd=server.cwd,
            env=server.env,
        )

    def _transport(self, server: McpTool) -> tuple[Any, IO[str] | None]:
        if server.url is not None:
            self._check_url(server.url)
            return streamable_http_client(server.url), None
        try:
            prepared = self.policy.prepare(self._command_call(server, "", ""))
        except CommandRefusedError as error:
            raise McpRefusedError(f"MCP server `{server.name}`: {error}") from None
        argv = [prepared.executable, *(server.command or [])[1:]]
        if prepared.launcher:
            argv = [*prepared.launcher, *argv]
        params = StdioServerParameters(
            command=argv[0], args=argv[1:], env=prepared.env, cwd=prepared.cwd
        )
        # The server's stderr may hold what it read of secrets elsewhere; it
        # never reaches the worker's log.
        errlog = open(os.devnull, "w", encoding="utf-8")  # the session closes it
        return stdio_client(params, errlog=errlog), errlog

    async def client(self, server: McpTool) -> Client:
        """A live client for ``server``: the kept session, or a new one if none or it died.

        Raises McpRefusedError (not allowed) or McpUnavailableError (cannot start).
        """
        if self._closed:
            raise McpUnavailableError("the worker is shutting down; the call is retried")
        key = _server_key(server)
        async with self._locks.setdefault(key, asyncio.Lock()):
            session = self._sessions.get(key)
            if session is not None and session.client is not None:
                if await _alive(session.client):
                    self._sessions.move_to_end(key)
                    return session.client
                log.info("MCP server %s died; starting it again", server.name)
                self._sessions.pop(key, None)
                await session.close()
            transport, errlog = self._transport(server)
            session = _Session(key, transport, errlog)
            try:
                client = await session.start(self.start_timeout_s)
            except TimeoutError:
                raise McpUnavailableError(
                    f"MCP server `{server.name}` did not answer within "
                    f"{self.start_timeout_s:g} s of starting; check that it speaks MCP"
                ) from None
            except Exception as error:  # any start failure is the same to the step
                cause = _leaf(error)
                raise McpUnavailableError(
                    f"MCP server `{server.name}` could not be started or reached "
                    f"({type(cause).__name__}: {cause}); check its command or url"
                ) from None
            self._sessions[key] = session
            evicted: list[_Session] = []
            while len(self._sessions) > self.max_sessions:
                evicted.append(self._sessions.popitem(last=False)[1])
        for oldest in evicted:
            await oldest.close()
        return client

    async def discard(self, server: McpTool) -> None:
        """Close ``server``'s session (it failed mid-call); the next call starts a new one."""
        session = self._sessions.pop(_server_key(server), None)
        if session is not None:
            await session.close()

    async def aclose(self) -> None:
        """Close every session (stops every stdio server); the worker calls it at shutdown."""
        self._closed = True
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(session.close() for session in sessions))


def _leaf(error: BaseException) -> BaseException:
    """The first real error inside the SDK's (nested) task-group exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


async def _alive(client: Client) -> bool:
    """Whether the session still answers, by a request with no side effect.

    A server that died while idle fails this at once (the SDK knows the
    connection closed), so the real call is never sent to a dead session and
    never has to be repeated.
    """
    try:
        await asyncio.wait_for(client.list_tools(), PROBE_TIMEOUT_S)
    except MCPError as error:
        if error.code == CONNECTION_CLOSED:
            return False
        return True  # the server answered, if with an error
    except Exception:  # a broken transport is a dead session
        return False
    return True
