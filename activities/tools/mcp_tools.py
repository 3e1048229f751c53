"""``list_mcp_tools`` and ``call_mcp_tool``: an MCP server's tools as activities.

Both use the worker's ``McpSessionPool``. What the workflow sees::

    McpRefused      the worker does not allow the server (LLMMIXER_PTY_ALLOW
                    for a stdio command, LLMMIXER_ALLOWED_MCP_URLS for a url);
                    non-retryable, nothing was started or sent
    McpUnavailable  the server could not be started or reached, or died during
                    the call; retryable (the next attempt starts it again)

A tool the server reports as failed, a tool the step's include/exclude does
not offer, and protocol errors of one call are results with ``is_error``: the
model reads them. Everything returned is redacted and bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from mcp import MCPError
from mcp_types import CONNECTION_CLOSED, CallToolResult
from temporalio import activity
from temporalio.exceptions import ApplicationError

from llmmixer.activities.terminal.text import bound_text
from llmmixer.activities.tools.mcp_sessions import (
    McpRefusedError,
    McpSessionPool,
    McpUnavailableError,
)
from llmmixer.core.contracts import (
    MCP_CALL_ACTIVITY,
    MCP_LIST_ACTIVITY,
    ErrorType,
    FailureDetails,
    McpCallRequest,
    McpListRequest,
    McpListResult,
    McpToolInfo,
    ToolRunResult,
)
from llmmixer.core.redaction import redact
from llmmixer.core.secrets import secret_values
from llmmixer.core.tools import McpTool, tool_allows

__all__ = ["MAX_RESULT_BYTES", "McpToolActivities"]

# A tool's result goes into history and the model's next prompt.
MAX_RESULT_BYTES = 256 * 1024
# Pages of tools/list read at most: a server that paginates forever cannot hang a step.
MAX_LIST_PAGES = 50
HEARTBEAT_INTERVAL_S = 5.0

_T = TypeVar("_T")


class McpToolActivities:
    """Registers ``list_mcp_tools`` and ``call_mcp_tool`` over the worker's pool."""

    def __init__(self, pool: McpSessionPool, secrets: frozenset[str] = frozenset()) -> None:
        self.pool = pool
        self.secrets = secrets | pool.policy.secrets | secret_values(os.environ)

    @activity.defn(name=MCP_LIST_ACTIVITY)
    async def list_mcp_tools(self, request: McpListRequest) -> McpListResult:
        server = request.server
        client = await self._client(request.server, request.workflow_id, request.step_id)
        tools: list[McpToolInfo] = []
        cursor: str | None = None
        try:
            for _ in range(MAX_LIST_PAGES):
                page = await _heartbeating(client.list_tools(cursor=cursor))
                for tool in page.tools:
                    if tool_allows(server, tool.name):
                        tools.append(
                            McpToolInfo(
                                name=tool.name,
                                description=redact(tool.description or "", self.secrets),
                                parameters=dict(tool.input_schema),
                            )
                        )
                cursor = page.next_cursor
                if not cursor:
                    break
        except MCPError as error:
            if error.code == CONNECTION_CLOSED:
                raise await self._died(server) from None
            raise self._error(
                f"MCP server `{server.name}` refused to list its tools: {error.message}",
                ErrorType.MCP_UNAVAILABLE,
                non_retryable=False,
            ) from None
        return McpListResult(tools=tools)

    @activity.defn(name=MCP_CALL_ACTIVITY)
    async def call_mcp_tool(self, request: McpCallRequest) -> ToolRunResult:
        server, call = request.server, request.call
        attempt = activity.info().attempt
        started = time.monotonic()

        def result(content: str, *, is_error: bool) -> ToolRunResult:
            bounded = bound_text(redact(content, self.secrets), MAX_RESULT_BYTES)
            return ToolRunResult(
                call_id=call.id,
                name=call.name,
                content=bounded,
                is_error=is_error,
                truncated=len(bounded) < len(content),
                duration_ms=(time.monotonic() - started) * 1000,
                attempt=attempt,
            )

        if not tool_allows(server, call.name):
            # The model named a tool this step does not offer: nothing is sent.
            return result(
                f"`{call.name}` is not a tool of this step; call one of the tools you were given",
                is_error=True,
            )
        client = await self._client(server, request.workflow_id, request.step_id)
        try:
            reply = await _heartbeating(
                client.call_tool(call.name, call.arguments, read_timeout_seconds=server.timeout_s)
            )
        except MCPError as error:
            if error.code == CONNECTION_CLOSED:
                raise await self._died(server) from None
            return result(f"the tool failed: {error.message}", is_error=True)
        except TimeoutError:
            return result(
                f"`{call.name}` did not answer within {server.timeout_s:g} s", is_error=True
            )
        return result(_text_of(reply), is_error=reply.is_error)

    async def _client(self, server: McpTool, workflow_id: str, step_id: str) -> Any:
        try:
            self.pool.check_allowed(server, workflow_id=workflow_id, step_id=step_id)
            # Starting a server may take longer than the heartbeat timeout.
            return await _heartbeating(self.pool.client(server))
        except McpRefusedError as error:
            raise self._error(str(error), ErrorType.MCP_REFUSED, non_retryable=True) from None
        except McpUnavailableError as error:
            raise self._error(str(error), ErrorType.MCP_UNAVAILABLE, non_retryable=False) from None

    async def _died(self, server: McpTool) -> ApplicationError:
        # Whether the call took effect is unknown; the activity's retry policy
        # decides on another attempt, which starts the server again.
        await self.pool.discard(server)
        return self._error(
            f"MCP server `{server.name}` closed the connection during the call; it is "
            "started again on the next attempt",
            ErrorType.MCP_UNAVAILABLE,
            non_retryable=False,
        )

    def _error(self, message: str, kind: str, *, non_retryable: bool) -> ApplicationError:
        return ApplicationError(
            redact(message, self.secrets),
            FailureDetails(attempt=activity.info().attempt).model_dump(),
            type=kind,
            non_retryable=non_retryable,
        )


def _text_of(reply: CallToolResult) -> str:
    """The text the model reads: text blocks joined; other blocks named, not inlined."""
    parts: list[str] = []
    for block in reply.content:
        text = getattr(block, "text", None)
        if isinstance(text, str):
            parts.append(text)
        else:
            parts.append(f"[{block.type} content omitted]")
    if not parts and reply.structured_content is not None:
        parts.append(json.dumps(reply.structured_content, ensure_ascii=False, sort_keys=True))
    return "\n".join(parts)


async def _heartbeating(operation: Awaitable[_T]) -> _T:
    """Await ``operation`` while heartbeating, so a long call stays alive and cancellable."""
    task = asyncio.ensure_future(operation)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_INTERVAL_S)
            if done:
                return task.result()
            activity.heartbeat()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
