"""The tool loop of an llm step, in a real workflow on the dev server.

Each provider's real SDK talks to the fake server, which scripts turns that
call tools; the tools are real commands, a real MCP server and a child
workflow. The fake records every request, so the tests read what the model
was sent back (tool results, a person's rejection) in the provider's shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes.progress import until
from fakes.provider_server import FakeProviderServer, Reply, ToolUse

from llmmixer.client.audit import audit_from_client, render_markdown
from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.client.specfile import prepare_spec
from llmmixer.core.contracts import TOOL_COMMAND_ACTIVITY, EventType
from llmmixer.core.validation import SpecError
from llmmixer.workflows.records import RunStatus, StepStatus

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
MCP_SERVER = str(Path(__file__).resolve().parent / "fakes" / "mcp_server.py")
FAST_RETRY = {"max_attempts": 2, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}
# (provider, api, model)
TARGETS = [
    ("anthropic", "chat", "claude-haiku-4-5"),
    ("openai", "chat", "gpt-4.1-mini"),
    ("openai", "responses", "gpt-4.1-mini"),
    ("gemini", "chat", "gemini-2.5-flash"),
]
IDS = ["anthropic", "openai-chat", "openai-responses", "gemini"]
# Prints its argument reversed: the model can only know the result from the tool.
REVERSE = "import sys; print(sys.argv[1][::-1])"
# Writes start and end times around a sleep: overlapping calls overlap here.
SLEEPER = (
    "import sys, time; p = sys.argv[1]; open(p + '.start', 'w').write(repr(time.time())); "
    "time.sleep(1.5); open(p + '.end', 'w').write(repr(time.time()))"
)
# Appends a line to a file: a side effect a test can count.
APPEND = "import sys; open(sys.argv[1], 'a').write('x\\n'); print('appended')"


@pytest.fixture
def worker_env(
    provider_server: FakeProviderServer, request: pytest.FixtureRequest
) -> dict[str, str]:
    env = provider_server.env()
    if marker := request.node.get_closest_marker("worker_env"):
        env.update(marker.kwargs)
    return env


def one_arg_tool(name: str, script: str, arg: str = "text", **extra: Any) -> dict[str, Any]:
    return {
        "kind": "command",
        "name": name,
        "description": f"{name} a {arg}",
        "parameters": {
            "type": "object",
            "properties": {arg: {"type": "string"}},
            "required": [arg],
        },
        "argv": [sys.executable, "-c", script, f"{{{{args.{arg}}}}}"],
        **extra,
    }


def spec(tools: list[dict[str, Any]], **step: Any) -> dict[str, Any]:
    return {
        "name": "tools",
        "defaults": {"retry": FAST_RETRY, "max_tokens": 200},
        "steps": [
            {
                "id": "ask",
                "provider": "anthropic",
                "model": "claude-haiku-4-5",
                "prompt": "use the tools",
                "tools": tools,
                **step,
            }
        ],
    }


def last_body(server: FakeProviderServer) -> str:
    return json.dumps(server.calls[-1].body)


@pytest.mark.parametrize(("provider", "api", "model"), TARGETS, ids=IDS)
async def test_each_provider_completes_a_two_turn_tool_loop(
    mixer: MixerClient, provider_server: FakeProviderServer, provider: str, api: str, model: str
) -> None:
    provider_server.script(
        provider,
        Reply(text="", tool_calls=[ToolUse("reverse", {"text": "olleh-dlrow"}, id="c1")]),
        Reply(text="the answer is world-hello", usage=(30, 5)),
    )
    handle = await mixer.start(
        spec(
            [one_arg_tool("reverse", REVERSE)],
            provider=provider,
            model=model,
            **({"api": api} if provider == "openai" else {}),
        )
    )
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert result.output == "the answer is world-hello"
    record = result.steps["ask"]
    assert [turn.number for turn in record.turns] == [1, 2]
    (call,) = record.turns[0].calls
    assert (call.name, call.arguments, call.status) == (
        "reverse",
        {"text": "olleh-dlrow"},
        "completed",
    )
    assert call.result_chars == len("world-hello\n") and not call.is_error
    assert call.duration_ms is not None and call.duration_ms > 0
    assert record.turns[1].calls == [] and record.turns[1].text_chars == len(result.output)
    # Both turns are accounted on the step.
    assert record.usage.input_tokens >= 30
    # The second request carried the command's real output back in the API's shape.
    assert len(provider_server.calls) == 2
    assert "world-hello" in last_body(provider_server)
    # The Web UI labels the tool's activity `<step>: tool <name>`.
    summaries = []
    async for event in handle.temporal.fetch_history_events():
        scheduled = event.activity_task_scheduled_event_attributes
        if event.HasField("activity_task_scheduled_event_attributes") and (
            scheduled.activity_type.name == TOOL_COMMAND_ACTIVITY
        ):
            summaries.append(event.user_metadata.summary.data.decode())
    assert summaries == ['"ask: tool reverse"']
    types = [e.type async for e in _events(handle)]
    assert EventType.TOOL_STARTED in types and EventType.TOOL_ENDED in types


async def _events(handle: Any) -> Any:
    async for event in handle.events():
        yield event
        if event.type == EventType.WORKFLOW_ENDED:
            return


async def test_the_calls_of_one_turn_run_side_by_side(
    mixer: MixerClient, provider_server: FakeProviderServer, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    provider_server.script(
        "anthropic",
        Reply(
            tool_calls=[
                ToolUse("sleep", {"path": str(a)}, id="ca"),
                ToolUse("sleep", {"path": str(b)}, id="cb"),
            ]
        ),
        Reply(text="both slept"),
    )
    result = await (await mixer.start(spec([one_arg_tool("sleep", SLEEPER, "path")]))).result()
    assert result.output == "both slept"
    start_a, end_a = (
        float((tmp_path / "a.start").read_text()),
        float((tmp_path / "a.end").read_text()),
    )
    start_b, end_b = (
        float((tmp_path / "b.start").read_text()),
        float((tmp_path / "b.end").read_text()),
    )
    assert start_a < end_b and start_b < end_a, "the two calls ran one after the other"
    body = last_body(provider_server)
    assert '"ca"' in body and '"cb"' in body


async def test_a_call_that_needs_approval_waits_and_runs_after_approve(
    mixer: MixerClient, provider_server: FakeProviderServer, tmp_path: Path
) -> None:
    target = tmp_path / "written"
    provider_server.script(
        "anthropic",
        Reply(tool_calls=[ToolUse("write", {"path": str(target)}, id="w1")]),
        Reply(text="written"),
    )
    handle = await mixer.start(spec([one_arg_tool("write", APPEND, "path", approve=True)]))
    progress = await until(
        handle, lambda p: p.steps["ask"].status == StepStatus.WAITING, "the call waits"
    )
    record = progress.steps["ask"]
    assert record.tool_approval is not None
    assert (record.tool_approval.name, record.tool_approval.arguments) == (
        "write",
        {"path": str(target)},
    )
    assert "write" in (record.waiting_reason or "")
    assert not target.exists(), "the call ran before anyone approved it"
    outcome = await handle.approve("ask", comment="go ahead")
    assert "runs" in outcome.message
    result = await handle.result()
    assert result.output == "written"
    assert target.read_text() == "x\n"
    (call,) = result.steps["ask"].turns[0].calls
    assert (call.decision, call.decision_note, call.status) == ("approved", "go ahead", "completed")
    assert result.steps["ask"].tool_approval is None


async def test_a_rejection_goes_back_to_the_model_with_the_reason(
    mixer: MixerClient, provider_server: FakeProviderServer, tmp_path: Path
) -> None:
    target = tmp_path / "written"
    provider_server.script(
        "openai",
        Reply(tool_calls=[ToolUse("write", {"path": str(target)}, id="w1")]),
        Reply(text="understood, not writing"),
    )
    handle = await mixer.start(
        spec(
            [one_arg_tool("write", APPEND, "path", approve=True)],
            provider="openai",
            model="gpt-4.1-mini",
        )
    )
    await until(handle, lambda p: p.steps["ask"].tool_approval is not None, "the call waits")
    await handle.reject("ask", reason="the disk is read-only today")
    result = await handle.result()
    assert result.output == "understood, not writing"
    assert not target.exists()
    assert "the disk is read-only today" in last_body(provider_server)
    (call,) = result.steps["ask"].turns[0].calls
    assert (call.decision, call.status, call.is_error) == ("rejected", "rejected", True)


async def test_approve_on_a_step_that_waits_for_no_tool_is_refused(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("anthropic", Reply(text="", hang=True))
    handle = await mixer.start(spec([one_arg_tool("reverse", REVERSE)]))
    await until(handle, lambda p: p.steps["ask"].status == StepStatus.RUNNING, "running")
    with pytest.raises(Exception, match="waits for no tool call's approval"):
        await handle.approve("ask")
    await handle.cancel()


async def test_max_turns_reached_fails_the_step_and_on_failure_applies(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script(
        "anthropic",
        *[Reply(tool_calls=[ToolUse("reverse", {"text": f"t{i}"}, id=f"c{i}")]) for i in range(2)],
    )
    result = await (
        await mixer.start(spec([one_arg_tool("reverse", REVERSE)], max_turns=2, on_failure="skip"))
    ).result()
    record = result.steps["ask"]
    assert record.status == StepStatus.SKIPPED
    assert "max_turns 2" in (record.error or "") and "raise" in (record.error or "")
    assert len(record.turns) == 2 and len(provider_server.calls) == 2


@pytest.mark.worker_env(LLMMIXER_PTY_ALLOW="echo")
async def test_a_tool_whose_program_the_worker_does_not_allow_fails_the_step(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script(
        "anthropic", Reply(tool_calls=[ToolUse("reverse", {"text": "x"}, id="c1")])
    )
    with pytest.raises(RunFailed, match="LLMMIXER_PTY_ALLOW"):
        await (
            await mixer.start(spec([one_arg_tool("reverse", REVERSE)], on_failure="fail"))
        ).result()
    # The model was never asked again: the refusal is the operator's to fix.
    assert len(provider_server.calls) == 1


async def test_retry_while_a_call_waits_starts_the_loop_again_and_override_ends_it(
    mixer: MixerClient, provider_server: FakeProviderServer, tmp_path: Path
) -> None:
    target = tmp_path / "written"
    write = ToolUse("write", {"path": str(target)}, id="w1")
    provider_server.script("anthropic", Reply(tool_calls=[write]), Reply(tool_calls=[write]))
    handle = await mixer.start(spec([one_arg_tool("write", APPEND, "path", approve=True)]))
    await until(handle, lambda p: p.steps["ask"].tool_approval is not None, "first wait")
    await handle.retry("ask", prompt="try again, differently")
    progress = await until(
        handle,
        lambda p: p.steps["ask"].tool_approval is not None and len(provider_server.calls) == 2,
        "second wait",
    )
    # The loop started over: a fresh first turn with the new prompt.
    assert [turn.number for turn in progress.steps["ask"].turns] == [1]
    assert "try again, differently" in last_body(provider_server)
    await handle.override("ask", "a person's answer")
    result = await handle.result()
    assert result.output == "a person's answer"
    assert result.steps["ask"].overridden and result.steps["ask"].tool_approval is None
    assert not target.exists()


@pytest.mark.parametrize(("provider", "api", "model"), TARGETS, ids=IDS)
async def test_an_mcp_server_is_listed_once_and_its_tools_called(
    mixer: MixerClient,
    provider_server: FakeProviderServer,
    tmp_path: Path,
    provider: str,
    api: str,
    model: str,
) -> None:
    counter = tmp_path / "counter"
    provider_server.script(
        provider,
        Reply(tool_calls=[ToolUse("bump", {"note": "one"}, id="b1")]),
        Reply(tool_calls=[ToolUse("bump", {"note": "two"}, id="b2")]),
        Reply(text="bumped twice"),
    )
    server = {
        "kind": "mcp",
        "name": "counter",
        "command": [sys.executable, MCP_SERVER, "--counter", str(counter)],
        "include": ["bump", "echo"],
    }
    handle = await mixer.start(
        spec(
            [server],
            provider=provider,
            model=model,
            **({"api": api} if provider == "openai" else {}),
        )
    )
    result = await handle.result()
    assert result.output == "bumped twice"
    assert counter.read_text().splitlines() == ["one", "two"]
    # The model was told about the server's tools after include/exclude.
    first = json.dumps(provider_server.calls[0].body)
    assert '"bump"' in first and '"echo"' in first and '"secret"' not in first
    listed = 0
    async for event in handle.temporal.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            listed += name == "llmmixer.list_mcp_tools"
    assert listed == 1
    assert "2" in last_body(provider_server)


# A child's spec check is a local activity; without a workflow cache the SDK
# cancels it at every eviction and the child may never get past it.
CACHED = pytest.mark.parametrize("workflow_cache", [100])


@CACHED
async def test_a_spec_tool_runs_as_a_child_workflow(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    child = {
        "name": "child",
        "inputs": {"word": "default"},
        "steps": [
            {
                "id": "say",
                "kind": "pty",
                "command": [sys.executable, "-c", REVERSE, "{{inputs.word}}"],
            }
        ],
    }
    provider_server.script(
        "anthropic",
        Reply(tool_calls=[ToolUse("flip", {"word": "dlihc"}, id="s1")]),
        Reply(text="the child said child"),
    )
    tool = {
        "kind": "spec",
        "name": "flip",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
        "spec": child,
    }
    result = await (await mixer.start(spec([tool]))).result()
    assert result.output == "the child said child"
    assert "child" in last_body(provider_server)
    (call,) = result.steps["ask"].turns[0].calls
    assert call.status == "completed" and call.result_chars == len("child\n")


@CACHED
async def test_the_audit_shows_the_whole_conversation_and_every_tool_call(
    mixer: MixerClient, provider_server: FakeProviderServer, tmp_path: Path
) -> None:
    target = tmp_path / "written"
    child = {
        "name": "child",
        "inputs": {"word": "x"},
        "steps": [
            {
                "id": "say",
                "kind": "pty",
                "command": [sys.executable, "-c", REVERSE, "{{inputs.word}}"],
            }
        ],
    }
    provider_server.script(
        "anthropic",
        Reply(
            text="let me look",
            tool_calls=[
                ToolUse("reverse", {"text": "cba"}, id="r1"),
                ToolUse("flip", {"word": "fed"}, id="f1"),
            ],
        ),
        Reply(tool_calls=[ToolUse("write", {"path": str(target)}, id="w1")]),
        Reply(text="abc def, and nothing written"),
    )
    tools = [
        one_arg_tool("reverse", REVERSE),
        one_arg_tool("write", APPEND, "path", approve=True),
        {"kind": "spec", "name": "flip", "spec": child, "parameters": {"type": "object"}},
    ]
    handle = await mixer.start(spec(tools))
    await until(handle, lambda p: p.steps["ask"].tool_approval is not None, "the write waits")
    await handle.reject("ask", reason="no writes in an audit test")
    await handle.result()
    audit = await audit_from_client(mixer.temporal, handle.id)
    assert audit["unhandled"] == [] and audit["warnings"] == []
    step = audit["steps"]["ask"]
    assert step["prompt"] == "use the tools"
    assert step["output"] == "abc def, and nothing written"
    roles = [message["role"] for message in step["conversation"]]
    assert roles == ["user", "assistant", "tool", "tool", "assistant", "tool", "assistant"]
    rejected = step["conversation"][5]
    assert "no writes in an audit test" in rejected["content"] and rejected["is_error"]
    calls = {(tool["kind"], tool["name"]): tool for tool in step["tool_calls"]}
    assert calls["command", "reverse"]["result"] == "abc\n"
    assert calls["command", "reverse"]["arguments"] == {"text": "cba"}
    assert calls["spec", "flip"]["result"] == "def\n"
    assert calls["spec", "flip"]["arguments"]["word"] == "fed"
    # The rejected call never ran: no activity of it is in history.
    assert ("command", "write") not in calls
    markdown = render_markdown(audit)
    assert "Conversation:" in markdown and "calls `reverse`" in markdown
    assert "tool spec `flip`" in markdown


async def test_the_mcp_example_studies_a_repository_and_its_write_waits_for_a_person(
    mixer: MixerClient, provider_server: FakeProviderServer, tmp_path: Path
) -> None:
    example = yaml.safe_load((REPO / "examples" / "mcp.yaml").read_text())
    step = example["steps"][0]
    for server in step["tools"]:
        server["command"] = [sys.executable, str(REPO / "examples" / "mcp_repo_server.py")]
        server["command"] += ["--root", str(tmp_path)]
    (tmp_path / "main.py").write_text("def main_loop():\n    pass\n")
    provider_server.script(
        "openai",
        Reply(tool_calls=[ToolUse("search", {"pattern": "def main_loop"}, id="s1")]),
        Reply(tool_calls=[ToolUse("save_notes", {"text": "main.py:1"}, id="n1")]),
        Reply(text="main_loop is in main.py"),
    )
    example["defaults"]["retry"] = FAST_RETRY
    handle = await mixer.start(example)
    progress = await until(
        handle, lambda p: p.steps["answer"].tool_approval is not None, "save_notes waits"
    )
    assert not (tmp_path / "NOTES.md").exists()
    # The search ran at once, and found the function.
    assert "main.py:1: def main_loop" in last_body(provider_server)
    assert progress.steps["answer"].turns[0].calls[0].status == "completed"
    await handle.approve("answer")
    result = await handle.result()
    assert result.output == "main_loop is in main.py"
    assert (tmp_path / "NOTES.md").read_text() == "main.py:1"


def test_a_spec_tool_file_is_read_into_the_run_relative_to_the_spec_naming_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "leaf.yaml").write_text(
        "name: leaf\nsteps:\n  - {id: s, kind: pty, command: [echo, hi]}\n"
    )
    (tmp_path / "sub" / "child.yaml").write_text(
        "name: child\nsteps:\n  - id: c\n    provider: openai\n    model: m\n    prompt: p\n"
        "    tools:\n      - {kind: spec, name: leaf, spec: leaf.yaml}\n"
    )
    (tmp_path / "main.yaml").write_text(
        "name: main\nsteps:\n  - id: ask\n    provider: openai\n    model: m\n    prompt: p\n"
        "    tools:\n      - {kind: spec, name: child, spec: sub/child.yaml}\n"
    )
    body, _ = prepare_spec(tmp_path / "main.yaml")
    child = body["steps"][0]["tools"][0]["spec"]
    assert child["name"] == "child"
    # The child's own spec tool was read relative to the child's file.
    assert child["steps"][0]["tools"][0]["spec"]["name"] == "leaf"
    (tmp_path / "loop.yaml").write_text(
        "name: loop\nsteps:\n  - id: ask\n    provider: openai\n    model: m\n    prompt: p\n"
        "    tools:\n      - {kind: spec, name: again, spec: loop.yaml}\n"
    )
    with pytest.raises(SpecError, match="nest more than 5 files deep"):
        prepare_spec(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nsteps:\n  - id: ask\n    provider: openai\n    model: m\n    prompt: p\n"
        "    tools:\n      - {kind: spec, name: gone, spec: missing.yaml}\n"
    )
    with pytest.raises(SpecError, match=r"tools\[0\]\.spec: .*missing\.yaml: cannot read"):
        prepare_spec(tmp_path / "bad.yaml")
    # A spec given as a mapping (the HTTP API, a program) names no file: nothing is read.
    mapping = yaml.safe_load((tmp_path / "bad.yaml").read_text())
    body, _ = prepare_spec(mapping)
    assert body["steps"][0]["tools"][0]["spec"] == "missing.yaml"


async def test_response_format_json_applies_to_the_final_answer_only(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script(
        "anthropic",
        # A turn that calls a tool is not the answer: its text need not be JSON.
        Reply(text="let me check", tool_calls=[ToolUse("reverse", {"text": "2"}, id="c1")]),
        Reply(text='{"count": 2}'),
    )
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}}
    result = await (
        await mixer.start(
            spec([one_arg_tool("reverse", REVERSE)], response_format="json", json_schema=schema)
        )
    ).result()
    assert json.loads(result.output or "") == {"count": 2}
    assert len(result.steps["ask"].turns) == 2
