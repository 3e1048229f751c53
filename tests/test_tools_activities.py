"""Tool activities: command tools through the pty policy, MCP servers through the real SDK.

Activities run in ``temporalio.testing.ActivityEnvironment``; the MCP server
is ``tests/fakes/mcp_server.py`` (the official SDK), started by the worker's
pool as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from llmmixer.activities.commands import CommandActivities
from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.activities.tools import (
    CommandToolActivities,
    McpSessionPool,
    McpToolActivities,
)
from llmmixer.core.contracts import (
    CommandCall,
    ErrorType,
    McpCallRequest,
    McpListRequest,
    ToolCall,
    ToolRunRequest,
    ToolRunResult,
)
from llmmixer.core.tools import CommandTool, McpTool

pytestmark = pytest.mark.timeout(120)

MCP_SERVER = str(Path(__file__).resolve().parent / "fakes" / "mcp_server.py")
SECRET = "sk-proj-" + "Q7x" * 16
PRINT_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


def worker_environ(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OPENAI_API_KEY": SECRET, **extra}


def policy(allow: str | None = sys.executable) -> CommandPolicy:
    environ = worker_environ() if allow is None else worker_environ(LLMMIXER_PTY_ALLOW=allow)
    return CommandPolicy.from_env(environ)


def command_tools(allow: str | None = sys.executable) -> CommandToolActivities:
    return CommandToolActivities(CommandActivities(policy(allow)))


def printing_tool(**fields: Any) -> CommandTool:
    base: dict[str, Any] = {
        "name": "show",
        "argv": [sys.executable, "-c", PRINT_ARGV, "{{args.q}}"],
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string"}},
            "required": ["q"],
        },
    }
    return CommandTool.model_validate({**base, **fields})


async def run_tool(
    tools: CommandToolActivities, tool: CommandTool, arguments: dict[str, Any]
) -> ToolRunResult:
    request = ToolRunRequest(
        workflow_id="wf",
        step_id="ask",
        tool=tool,
        call=ToolCall(id="call-1", name=tool.name, arguments=arguments),
    )
    return await ActivityEnvironment().run(tools.run_tool_command, request)


# ---- command tools -----------------------------------------------------------


@pytest.mark.parametrize(
    "hostile",
    [
        "a b c",
        "x; touch pwned-semicolon",
        "$(touch pwned-subshell)",
        "`touch pwned-backtick`",
        "'; touch pwned-quote; '",
        "x && touch pwned-and | cat > pwned-pipe",
        "{{args.q}}",
    ],
)
async def test_a_hostile_argument_stays_one_argv_element_and_is_never_interpreted(
    hostile: str, tmp_path: Path
) -> None:
    result = await run_tool(command_tools(), printing_tool(cwd=str(tmp_path)), {"q": hostile})
    assert not result.is_error, result.content
    assert json.loads(result.content) == [hostile]
    assert os.listdir(tmp_path) == [], "a shell interpreted the argument"


async def test_an_argument_that_looks_like_an_option_is_refused_unless_after_separator(
    tmp_path: Path,
) -> None:
    tools = command_tools()
    refused = await run_tool(tools, printing_tool(), {"q": "--output=/etc/passwd"})
    assert refused.is_error
    assert "starts with `-`" in refused.content and "nothing ran" in refused.content

    separated = printing_tool(argv=[sys.executable, "-c", PRINT_ARGV, "--", "{{args.q}}"])
    allowed = await run_tool(tools, separated, {"q": "--output=x"})
    assert not allowed.is_error, allowed.content
    assert json.loads(allowed.content) == ["--", "--output=x"]


async def test_arguments_that_fail_the_schema_are_refused_and_nothing_runs(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    tool = CommandTool.model_validate(
        {
            "name": "touch",
            "argv": [sys.executable, "-c", f"open({str(marker)!r}, 'w')", "{{args.n}}"],
            "parameters": {
                "type": "object",
                "properties": {"n": {"type": "integer", "maximum": 5}},
                "required": ["n"],
                "additionalProperties": False,
            },
        }
    )
    tools = command_tools()
    for arguments in ({"n": "3; rm -rf /"}, {"n": 99}, {}, {"n": 1, "extra": "x"}):
        result = await run_tool(tools, tool, arguments)
        assert result.is_error, arguments
        assert result.content.startswith("arguments refused, nothing ran"), result.content
        assert not marker.exists(), arguments
    ok = await run_tool(tools, tool, {"n": 3})
    assert not ok.is_error and marker.exists()


async def test_a_command_tool_obeys_the_allowlist_exactly_like_a_pty_step() -> None:
    for allow in ("git", None):
        tools = command_tools(allow)
        with pytest.raises(ApplicationError) as as_tool:
            await run_tool(tools, printing_tool(), {"q": "hi"})
        call = CommandCall(workflow_id="wf", step_id="s", argv=[sys.executable, "-c", "pass"])
        with pytest.raises(ApplicationError) as as_step:
            await ActivityEnvironment().run(tools.commands.run_command, call)
        assert as_tool.value.type == as_step.value.type == ErrorType.COMMAND_REFUSED
        assert as_tool.value.non_retryable
        assert "LLMMIXER_PTY_ALLOW" in as_tool.value.message
        assert as_tool.value.message == as_step.value.message


async def test_another_exit_code_is_a_result_the_model_reads() -> None:
    tool = printing_tool(argv=[sys.executable, "-c", "print('no match'); raise SystemExit(3)"])
    result = await run_tool(command_tools(), tool, {"q": "x"})
    assert result.is_error and result.exit_code == 3
    assert "no match" in result.content


async def test_a_command_tool_sees_no_worker_key_and_its_output_is_redacted(
    tmp_path: Path,
) -> None:
    leaked = tmp_path / "found.txt"
    leaked.write_text(SECRET + "\n")
    script = (
        "import os, sys; print(sorted(k for k in os.environ if 'KEY' in k));"
        f"print(open({str(leaked)!r}).read());"
        "\ntry: print(open(f'/proc/{os.getppid()}/environ', 'rb').read())"
        "\nexcept OSError as e: print('denied', e.errno)"
    )
    tool = printing_tool(argv=[sys.executable, "-c", script])
    result = await run_tool(command_tools(), tool, {"q": "x"})
    assert "OPENAI_API_KEY" not in result.content
    assert SECRET not in result.content


# ---- MCP ---------------------------------------------------------------------


class McpHarness:
    def __init__(self, tmp_path: Path, pool: McpSessionPool) -> None:
        self.counter = tmp_path / "counter"
        self.starts = tmp_path / "starts"
        self.pool = pool
        self.activities = McpToolActivities(pool)
        self.server = self.mcp_tool()

    def mcp_tool(self, **fields: Any) -> McpTool:
        base: dict[str, Any] = {
            "name": "fake",
            "command": [
                sys.executable,
                MCP_SERVER,
                "--counter",
                str(self.counter),
                "--starts",
                str(self.starts),
            ],
        }
        return McpTool.model_validate({**base, **fields})

    @property
    def start_pids(self) -> list[int]:
        if not self.starts.exists():
            return []
        return [int(line) for line in self.starts.read_text().split()]

    @property
    def count(self) -> int:
        return len(self.counter.read_text().splitlines()) if self.counter.exists() else 0

    async def call(self, name: str, server: McpTool | None = None, **arguments: Any) -> Any:
        request = McpCallRequest(
            workflow_id="wf",
            step_id="ask",
            server=server or self.server,
            call=ToolCall(id=f"c-{name}", name=name, arguments=arguments),
        )
        return await ActivityEnvironment().run(self.activities.call_mcp_tool, request)

    async def names(self, server: McpTool) -> list[str]:
        request = McpListRequest(workflow_id="wf", step_id="ask", server=server)
        listed = await ActivityEnvironment().run(self.activities.list_mcp_tools, request)
        return [tool.name for tool in listed.tools]


@pytest.fixture
async def mcp(tmp_path: Path) -> AsyncIterator[McpHarness]:
    pool = McpSessionPool(policy())
    try:
        yield McpHarness(tmp_path, pool)
    finally:
        await pool.aclose()


async def test_list_applies_include_and_exclude(mcp: McpHarness) -> None:
    assert sorted(await mcp.names(mcp.server)) == ["bump", "echo", "fail", "read_first_line"]
    assert await mcp.names(mcp.mcp_tool(include=["echo", "bump"], exclude=["bump"])) == ["echo"]
    assert sorted(await mcp.names(mcp.mcp_tool(exclude=["fail"]))) == [
        "bump",
        "echo",
        "read_first_line",
    ]


async def test_a_call_goes_through_the_sdk_and_failures_reach_the_model(mcp: McpHarness) -> None:
    echoed = await mcp.call("echo", text="hello; $(rm -rf /)")
    assert not echoed.is_error and echoed.content == "hello; $(rm -rf /)"
    assert echoed.call_id == "c-echo"
    failed = await mcp.call("fail", reason="because")
    assert failed.is_error
    bumped = await mcp.call("bump", note="one")
    assert bumped.content == "1" and mcp.count == 1


async def test_a_tool_the_step_does_not_offer_is_never_sent(mcp: McpHarness) -> None:
    narrowed = mcp.mcp_tool(include=["echo"])
    result = await mcp.call("bump", server=narrowed)
    assert result.is_error and "not a tool of this step" in result.content
    assert mcp.count == 0


async def test_the_session_is_reused_and_a_killed_server_is_started_again(
    mcp: McpHarness,
) -> None:
    await mcp.call("bump")
    await mcp.call("bump")
    assert len(mcp.start_pids) == 1, "the server was started for each call"
    assert mcp.count == 2

    os.kill(mcp.start_pids[0], signal.SIGKILL)
    await asyncio.sleep(0.3)
    result = await mcp.call("bump")
    assert not result.is_error and result.content == "3"
    assert len(mcp.start_pids) == 2
    assert mcp.count == 3, "the call after the restart ran once"


async def test_the_pool_stops_its_servers_when_the_worker_closes_it(mcp: McpHarness) -> None:
    await mcp.call("echo", text="x")
    (pid,) = mcp.start_pids
    await mcp.pool.aclose()
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the MCP server outlived its pool")


async def test_an_mcp_server_sees_no_worker_key_and_its_output_is_redacted(
    mcp: McpHarness, tmp_path: Path
) -> None:
    own_environ = await mcp.call("read_first_line", path="/proc/self/environ")
    assert "OPENAI_API_KEY" not in own_environ.content
    assert SECRET not in own_environ.content
    found = tmp_path / "found.txt"
    found.write_text(SECRET + "\n")
    leaked = await mcp.call("read_first_line", path=str(found))
    assert SECRET not in leaked.content


async def test_a_stdio_server_not_on_the_allowlist_is_refused(tmp_path: Path) -> None:
    for allow in ("git", None):
        pool = McpSessionPool(policy(allow))
        harness = McpHarness(tmp_path, pool)
        try:
            with pytest.raises(ApplicationError) as refused:
                await harness.call("bump")
            assert refused.value.type == ErrorType.MCP_REFUSED
            assert refused.value.non_retryable
            assert "LLMMIXER_PTY_ALLOW" in refused.value.message
            with pytest.raises(ApplicationError):
                await harness.names(harness.server)
        finally:
            await pool.aclose()
        assert harness.start_pids == [] and harness.count == 0


async def test_an_http_mcp_url_the_operator_did_not_allow_is_never_contacted() -> None:
    connections: list[object] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(reader)
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    pool = McpSessionPool(policy(), (f"http://127.0.0.1:{port}/allowed",))
    activities = McpToolActivities(pool)
    try:
        for url in (
            f"http://127.0.0.1:{port}/mcp",
            f"http://127.0.0.1:{port}/allowed-not/mcp",
            f"http://127.0.0.1:{port}/allowed/../mcp",
            f"http://127.0.0.1:{port}@127.0.0.1:{port}/allowed",
            f"https://127.0.0.1:{port}/allowed",
        ):
            server = McpTool(name="remote", url=url)
            request = McpCallRequest(
                workflow_id="wf", step_id="ask", server=server, call=ToolCall(id="1", name="x")
            )
            with pytest.raises(ApplicationError) as refused:
                await ActivityEnvironment().run(activities.call_mcp_tool, request)
            assert refused.value.type == ErrorType.MCP_REFUSED, url
            assert "LLMMIXER_ALLOWED_MCP_URLS" in refused.value.message or "cannot be used" in (
                refused.value.message
            )
        await asyncio.sleep(0.2)
        assert connections == [], "a refused MCP url was contacted"
    finally:
        await pool.aclose()
        listener.close()
        await listener.wait_closed()


def test_a_bad_allowed_mcp_urls_setting_names_itself() -> None:
    with pytest.raises(ValueError, match="LLMMIXER_ALLOWED_MCP_URLS"):
        McpSessionPool.from_env(policy(), {"LLMMIXER_ALLOWED_MCP_URLS": "ftp://x"})


async def test_a_server_that_exits_or_never_answers_fails_the_call_retryably(
    tmp_path: Path,
) -> None:
    pool = McpSessionPool(policy(), start_timeout_s=3.0)
    activities = McpToolActivities(pool)
    pid_file = tmp_path / "pid"
    hung = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    try:
        for script in ("raise SystemExit(1)", hung):
            server = McpTool(name="broken", command=[sys.executable, "-c", script])
            request = McpCallRequest(
                workflow_id="wf", step_id="ask", server=server, call=ToolCall(id="1", name="x")
            )
            started = asyncio.get_running_loop().time()
            with pytest.raises(ApplicationError) as failed:
                await ActivityEnvironment().run(activities.call_mcp_tool, request)
            assert failed.value.type == ErrorType.MCP_UNAVAILABLE
            assert not failed.value.non_retryable
            assert "`broken`" in failed.value.message
            assert asyncio.get_running_loop().time() - started < 20
        pid = int(pid_file.read_text())
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("a server that never answered was left running")
    finally:
        await pool.aclose()
