"""The provider calls and activity options a step is scheduled with.

They are the content of commands in runs in flight, so the strongest check is
the recorded one: every call and option in tests/histories/ is rebuilt from
its spec by ``workflows/calls.py`` and must come out identical.
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.common.v1 import Payload

from llmmixer.core.contracts import (
    AGENT_ACTIVITY,
    CHECK_PLAN_ACTIVITY,
    LLM_ACTIVITY,
    PTY_ACTIVITY,
    TOOL_COMMAND_ACTIVITY,
    ChatMessage,
    LlmCall,
    McpToolInfo,
    PlanRequest,
    ToolCall,
    ToolRunRequest,
)
from llmmixer.core.spec import (
    AgentStep,
    DecomposeStep,
    FallbackTarget,
    LlmStep,
    PtyStep,
    Spec,
)
from llmmixer.core.tools import CommandTool, McpTool, SpecTool
from llmmixer.workflows.calls import (
    CHECK_OPTIONS,
    StepActivityOptions,
    StepModel,
    child_spec,
    command_options,
    llm_call,
    llm_options,
    mcp_call_request,
    mcp_list_request,
    planned_step,
    route_approval,
    target_chain,
    tool_options,
    tool_run_request,
    tool_set,
)

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


# Where histories recorded with LLMMIXER_PAYLOAD_STORE=fs keep their large payloads.
STORE = Path(__file__).parent / "histories" / "payloads" / "sha256"


def _payload(payloads: dict[str, Any]) -> Any:
    payload = payloads["payloads"][0]
    data = base64.b64decode(payload["data"])
    kind = base64.b64decode(payload["metadata"].get("messageType", "")).decode()
    if kind == "temporal.api.sdk.v1.ExternalStorageReference":
        # Stored outside history: the file holds the payload itself.
        digest = json.loads(data)["claimData"]["sha256"]
        data = Payload.FromString((STORE / digest[:2] / digest).read_bytes()).data
    return json.loads(data)


def _seconds(duration: str) -> timedelta:
    return timedelta(seconds=float(duration.rstrip("s")))


def _recorded(path: Path) -> tuple[Spec | None, list[dict[str, Any]]]:
    """The run's spec, and each activity it scheduled with its input decoded."""
    events = json.loads(path.read_text())["events"]
    started = events[0]["workflowExecutionStartedEventAttributes"]
    try:
        spec: Spec | None = Spec.model_validate(_payload(started["input"]))
    except ValueError:
        spec = None  # the invalid-spec history schedules nothing
    scheduled = [
        {**e["activityTaskScheduledEventAttributes"], "id": e["eventId"]}
        for e in events
        if "activityTaskScheduledEventAttributes" in e
    ]
    planned: dict[str, Any] = {}
    for event in events:
        done = event.get("activityTaskCompletedEventAttributes")
        if done is None:
            continue
        source = next(s for s in scheduled if s["id"] == done["scheduledEventId"])
        if source["activityType"]["name"] == CHECK_PLAN_ACTIVITY:
            for step in _payload(done["result"])["steps"]:
                planned[step["id"]] = step
        elif _payload(source["input"]).get("plan") is not None:
            # Recorded before plans were checked in an activity: the planner's reply.
            reply = json.loads(_payload(done["result"])["text"])
            for step in reply.get("steps", []):
                planned.setdefault(step["id"], step)
    for activity in scheduled:
        activity["call"] = _payload(activity["input"])
        activity["planned"] = planned
    return spec, scheduled


def _as_recorded(sent: Any, recorded: Any) -> Any:
    """``sent`` without the fields added after ``recorded`` was (at any depth)."""
    if isinstance(sent, dict) and isinstance(recorded, dict):
        return {key: _as_recorded(sent.get(key), recorded[key]) for key in recorded}
    if isinstance(sent, list) and isinstance(recorded, list) and len(sent) == len(recorded):
        return [_as_recorded(a, b) for a, b in zip(sent, recorded, strict=True)]
    return sent


def _step(spec: Spec, step_id: str, planned: dict[str, Any]) -> StepModel:
    if step_id in planned:
        return planned_step(planned[step_id].get("kind", "llm"), planned[step_id])
    return spec.step(step_id)


def _assert_options(recorded: dict[str, Any], options: StepActivityOptions) -> None:
    assert _seconds(recorded["startToCloseTimeout"]) == options.start_to_close_timeout
    assert _seconds(recorded["heartbeatTimeout"]) == options.heartbeat_timeout
    retry = recorded["retryPolicy"]
    policy = options.retry_policy
    assert _seconds(retry["initialInterval"]) == policy.initial_interval
    assert retry["backoffCoefficient"] == policy.backoff_coefficient
    assert _seconds(retry["maximumInterval"]) == policy.maximum_interval
    assert retry["maximumAttempts"] == policy.maximum_attempts
    assert retry["nonRetryableErrorTypes"] == list(policy.non_retryable_error_types or [])
    if options.task_queue is not None:
        assert recorded["taskQueue"]["name"] == options.task_queue


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
def test_every_recorded_call_and_its_options_are_rebuilt_identically(path: Path) -> None:
    spec, scheduled = _recorded(path)
    if spec is None:
        assert not scheduled
        return
    assert scheduled or path.stem == "0.1.0-invalid-spec"
    for activity in scheduled:
        name, call = activity["activityType"]["name"], activity["call"]
        if name == CHECK_PLAN_ACTIVITY:
            assert _seconds(activity["startToCloseTimeout"]) == CHECK_OPTIONS.start_to_close_timeout
            continue
        step = _step(spec, call["step_id"], activity["planned"])
        if name == LLM_ACTIVITY:
            assert isinstance(step, LlmStep | DecomposeStep)
            recorded = LlmCall.model_validate(call)
            rebuilt = llm_call(
                spec,
                step,
                FallbackTarget(
                    provider=recorded.provider, model=recorded.model, base_url=recorded.base_url
                ),
                recorded.messages,
                recorded.system,
                workflow_id=recorded.workflow_id,
                has_fallback=recorded.has_fallback,
                plan=recorded.plan,
                tools=recorded.tools or None,
            )
            assert rebuilt == recorded
            if recorded.tools:
                # A tool loop's turn offers the step's tools (no MCP server in these).
                assert isinstance(step, LlmStep)
                assert recorded.tools == tool_set(spec.tools(step), {}).declarations
            if not (isinstance(step, LlmStep) and step.best_of is not None):
                chain = target_chain(spec, step)
                assert (recorded.provider, recorded.model, recorded.base_url) in [
                    (t.provider, t.model, t.base_url) for t in chain
                ]
            # Fields added since (like `plan`) are the only ones a recorded call lacks.
            sent = json.loads(rebuilt.model_dump_json())
            assert _as_recorded(sent, call) == call
            _assert_options(activity, llm_options(spec, step))
        elif name == TOOL_COMMAND_ACTIVITY:
            assert isinstance(step, LlmStep)
            request = ToolRunRequest.model_validate(call)
            tool = next(t for t in spec.tools(step) if t.name == request.call.name)
            assert isinstance(tool, CommandTool)
            rebuilt_request = tool_run_request(
                step, tool, request.call, workflow_id=request.workflow_id
            )
            assert rebuilt_request == request
            _assert_options(activity, tool_options(spec, step, tool.timeout_s))
        else:
            assert name in (PTY_ACTIVITY, AGENT_ACTIVITY)
            assert isinstance(step, PtyStep | AgentStep)
            _assert_options(activity, command_options(spec, step))


def _spec(**step: Any) -> Spec:
    return Spec.model_validate(
        {
            "defaults": {"provider": "openai", "model": "gpt-x", "temperature": 0.7},
            "steps": [{"id": "s", **step}],
        }
    )


TARGET = FallbackTarget(provider="openai", model="gpt-x")
ASK = [ChatMessage(role="user", content="hi")]


def test_a_step_setting_wins_over_the_default_even_when_it_is_zero() -> None:
    spec = _spec(prompt="hi", temperature=0, max_tokens=50, stop=["END"], api="responses")
    step = spec.step("s")
    assert isinstance(step, LlmStep)
    call = llm_call(spec, step, TARGET, ASK, None, workflow_id="w", has_fallback=False)
    assert (call.temperature, call.max_tokens, call.stop, call.api) == (0, 50, ["END"], "responses")
    default = _spec(prompt="hi").step("s")
    assert isinstance(default, LlmStep)
    assert (
        llm_call(spec, default, TARGET, ASK, None, workflow_id="w", has_fallback=True).temperature
        == 0.7
    )


def test_a_planner_call_asks_for_json_and_carries_no_llm_only_settings() -> None:
    spec = _spec(kind="decompose", prompt="split this", temperature=0.2)
    step = spec.step("s")
    assert isinstance(step, DecomposeStep)
    plan = PlanRequest(max_steps=3, kinds=["llm"])
    call = llm_call(spec, step, TARGET, ASK, "sys", workflow_id="w", has_fallback=False, plan=plan)
    assert (call.response_format, call.plan, call.temperature) == ("json", plan, 0.2)
    assert (call.top_p, call.stop, call.json_schema, call.api, call.provider_options) == (
        None,
        [],
        None,
        "chat",
        {},
    )


def test_a_command_gets_a_minute_beyond_its_own_timeout_on_the_terminal_queue() -> None:
    spec = Spec.model_validate(
        {
            "pty_task_queue": "terminals",
            "steps": [{"id": "c", "kind": "pty", "command": ["true"], "timeout_s": 30}],
        }
    )
    step = spec.step("c")
    assert isinstance(step, PtyStep)
    options = command_options(spec, step)
    assert options.start_to_close_timeout == timedelta(seconds=90)
    assert options.task_queue == "terminals"


def test_a_role_asks_its_route_then_the_steps_own_fallbacks() -> None:
    spec = Spec.model_validate(
        {
            "routes": {"fast": [{"provider": "gemini", "model": "flash"}]},
            "steps": [
                {
                    "id": "s",
                    "prompt": "hi",
                    "role": "fast",
                    "fallback": [{"provider": "openai", "model": "mini"}],
                },
                {"id": "p", "kind": "decompose", "prompt": "split", "role": "fast"},
            ],
        }
    )
    llm, plan = spec.step("s"), spec.step("p")
    assert isinstance(llm, LlmStep) and isinstance(plan, DecomposeStep)
    assert [(t.provider, t.model) for t in target_chain(spec, llm)] == [
        ("gemini", "flash"),
        ("openai", "mini"),
    ]
    assert [(t.provider, t.model) for t in target_chain(spec, plan)] == [("gemini", "flash")]


def test_without_a_role_the_step_asks_its_own_endpoint_or_the_defaults() -> None:
    spec = _spec(prompt="hi", base_url="http://127.0.0.1:11434/v1", model="llama")
    step = spec.step("s")
    assert isinstance(step, LlmStep)
    assert target_chain(spec, step) == [
        FallbackTarget(provider="openai", model="llama", base_url="http://127.0.0.1:11434/v1")
    ]


# ---- tool loops --------------------------------------------------------------


def _tool_spec(tools: list[dict[str, Any]], **extra: Any) -> Spec:
    return Spec.model_validate(
        {
            "defaults": {"provider": "openai", "model": "m"},
            "steps": [{"id": "ask", "prompt": "p", "tools": tools}],
            **extra,
        }
    )


COMMAND_TOOL = {
    "kind": "command",
    "name": "grep",
    "description": "search",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    "argv": ["grep", "--", "{{args.q}}"],
    "timeout_s": 30,
}
MCP_TOOL = {"kind": "mcp", "name": "repo", "description": "the repo", "command": ["srv"]}


def test_a_tool_loop_offers_its_own_tools_and_each_mcp_servers_listed_tools() -> None:
    spec = _tool_spec([COMMAND_TOOL, MCP_TOOL])
    step = spec.step("ask")
    assert isinstance(step, LlmStep)
    listed = {
        "repo": [
            McpToolInfo(name="read", description="read a file", parameters={"properties": {}}),
            # Taken by the step's own tool, and a name no provider takes: dropped.
            McpToolInfo(name="grep", parameters={"type": "object"}),
            McpToolInfo(name="bad name!", parameters={"type": "object"}),
        ]
    }
    offered = tool_set(spec.tools(step), listed)
    assert [d.name for d in offered.declarations] == ["grep", "read"]
    assert offered.declarations[1].description == "the repo: read a file"
    assert offered.declarations[1].parameters == {"type": "object", "properties": {}}
    assert offered.dropped == ["repo/grep", "repo/bad name!"]
    route = offered.routes["read"]
    assert isinstance(route, tuple) and route[1] == "read"
    assert not route_approval(route)


def test_a_step_without_tools_sends_no_tools_and_one_with_tools_declares_them() -> None:
    spec = _tool_spec([COMMAND_TOOL])
    step = spec.step("ask")
    assert isinstance(step, LlmStep)
    target = target_chain(spec, step)[0]
    messages = [ChatMessage(role="user", content="p")]
    plain = llm_call(spec, step, target, messages, None, workflow_id="w", has_fallback=False)
    assert plain.tools == [] and "tools" not in plain.model_dump(exclude_defaults=True)
    offered = tool_set(spec.tools(step), {}).declarations
    call = llm_call(
        spec, step, target, messages, None, workflow_id="w", has_fallback=False, tools=offered
    )
    assert [t.name for t in call.tools] == ["grep"]


def test_tool_calls_run_on_the_terminal_queue_with_a_minute_beyond_their_timeout() -> None:
    spec = _tool_spec([COMMAND_TOOL, MCP_TOOL], pty_task_queue="terminals")
    step = spec.step("ask")
    assert isinstance(step, LlmStep)
    options = tool_options(spec, step, 30)
    assert options.start_to_close_timeout == timedelta(seconds=90)
    assert options.task_queue == "terminals"
    call = ToolCall(id="c1", name="read", arguments={"path": "README"})
    server = McpTool.model_validate(MCP_TOOL)
    request = mcp_call_request(step, server, "read", call, workflow_id="w")
    assert (request.call.name, request.call.id, request.step_id) == ("read", "c1", "ask")
    command = CommandTool.model_validate(COMMAND_TOOL)
    assert tool_run_request(step, command, call, workflow_id="w").tool == command
    assert mcp_list_request(step, server, workflow_id="w").server == server


def test_a_spec_tools_arguments_are_its_childs_inputs_and_the_parents_queue_carries() -> None:
    tool = SpecTool.model_validate(
        {
            "name": "child",
            "spec": {"inputs": {"a": "1", "b": "2"}, "steps": [], "dry_run": False},
        }
    )
    body = child_spec(tool, {"b": "from the model"}, {"pty_task_queue": "t", "dry_run": True})
    assert body["inputs"] == {"a": "1", "b": "from the model"}
    assert body["pty_task_queue"] == "t"
    # The child's own setting wins over its parent's.
    assert body["dry_run"] is False
    assert tool.spec == {"inputs": {"a": "1", "b": "2"}, "steps": [], "dry_run": False}
    with pytest.raises(TypeError, match="not read when the run started"):
        child_spec(SpecTool(name="f", spec="child.yaml"), {}, {})
