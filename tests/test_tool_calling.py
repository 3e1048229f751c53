"""Native tool calling through each provider's real SDK, via the LLM activity.

A two-turn loop per API against the fake server: turn 1 answers with tool
calls (two in parallel), turn 2, sent the results in the API's own shape,
answers with text. The fake records what it received, so the tests read the
tool results exactly as the provider would see them.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pydantic
import pytest
from fakes.provider_fixtures import FakeProviderServer, Reply, llm_call
from fakes.provider_server import ToolUse
from temporalio.testing import ActivityEnvironment

from llmmixer.activities.llm import LlmActivities, LlmSettings
from llmmixer.activities.pricing import PriceTable
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.core.contracts import (
    ChatMessage,
    LlmCall,
    LlmReply,
    ToolCall,
    ToolDeclaration,
    ToolResult,
)

WEATHER = ToolDeclaration(
    name="weather",
    description="Today's weather in a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)
TIME = ToolDeclaration(
    name="local_time",
    description="The local time in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)
# (provider, api, model)
TARGETS = [
    ("anthropic", "chat", "claude-haiku-4-5"),
    ("openai", "chat", "gpt-4.1-mini"),
    ("openai", "responses", "gpt-4.1-mini"),
    ("gemini", "chat", "gemini-2.5-flash"),
]
IDS = ["anthropic", "openai-chat", "openai-responses", "gemini"]


async def run(provider_settings: ProviderSettings, call: LlmCall) -> LlmReply:
    acts = LlmActivities(
        provider_settings, prices=PriceTable.load(), settings=LlmSettings(stream_deltas=False)
    )
    try:
        reply: LlmReply = await ActivityEnvironment().run(acts.call_llm, call)
        return reply
    finally:
        await acts.aclose()


def first_turn(provider: str, api: str, model: str) -> LlmCall:
    return llm_call(
        provider, model, "What is the weather in Oslo and Lima?", api=api, tools=[WEATHER, TIME]
    )


def results_sent(provider: str, api: str, body: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """The tool results a request carried, by call id (Gemini: by name), in its native shape."""
    found: dict[str, tuple[str, bool]] = {}
    if provider == "anthropic":
        for message in body["messages"]:
            for block in message["content"] if isinstance(message["content"], list) else []:
                if block["type"] == "tool_result":
                    assert message["role"] == "user"
                    found[block["tool_use_id"]] = (block["content"], bool(block.get("is_error")))
    elif provider == "openai" and api == "chat":
        for message in body["messages"]:
            if message["role"] == "tool":
                found[message["tool_call_id"]] = (message["content"], False)
    elif provider == "openai" and api == "responses":
        for item in body["input"]:
            if item.get("type") == "function_call_output":
                found[item["call_id"]] = (item["output"], False)
    else:
        for content in body["contents"]:
            for part in content["parts"]:
                if "functionResponse" in part:
                    assert content["role"] == "user"
                    response = part["functionResponse"]["response"]
                    text = response.get("output", response.get("error"))
                    found[part["functionResponse"]["name"]] = (text, "error" in response)
    return found


@pytest.mark.parametrize(("provider", "api", "model"), TARGETS, ids=IDS)
async def test_two_turn_tool_loop_through_the_real_sdk(
    provider_server: FakeProviderServer,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
    model: str,
) -> None:
    provider_server.script(
        provider,
        Reply(
            text="Let me look.",
            tool_calls=[
                ToolUse("weather", {"city": "Oslo"}),
                ToolUse("local_time", {"city": "Lima"}),
            ],
        ),
        Reply(text="Oslo is sunny; in Lima it is noon."),
    )
    call = first_turn(provider, api, model)
    turn1 = await run(provider_settings, call)

    # The text before the calls still streams; the calls come back parsed.
    assert turn1.text == "Let me look."
    assert [(c.name, c.arguments) for c in turn1.tool_calls] == [
        ("weather", {"city": "Oslo"}),
        ("local_time", {"city": "Lima"}),
    ]
    assert all(c.id and c.error is None for c in turn1.tool_calls)
    assert len({c.id for c in turn1.tool_calls}) == 2
    # The declarations reached the API in its own shape.
    sent = provider_server.calls[0].body
    if provider == "anthropic":
        assert sent["tools"][0] == {
            "name": "weather",
            "description": WEATHER.description,
            "input_schema": WEATHER.parameters,
        }
    elif provider == "openai" and api == "chat":
        assert sent["tools"][0]["function"]["parameters"] == WEATHER.parameters
    elif provider == "openai" and api == "responses":
        assert sent["tools"][0]["name"] == "weather"
        assert sent["tools"][0]["parameters"] == WEATHER.parameters
    else:
        [tool] = sent["tools"]
        names = [d["name"] for d in tool["functionDeclarations"]]
        assert names == ["weather", "local_time"]
        declared = tool["functionDeclarations"][0]
        # The SDK sends this field in snake case; the API reads either spelling.
        schema = declared.get("parametersJsonSchema", declared.get("parameters_json_schema"))
        assert schema == WEATHER.parameters

    weather, clock = turn1.tool_calls
    turn2_call = call.model_copy(
        update={
            "messages": [
                *call.messages,
                ChatMessage.tool_request(turn1.text, turn1.tool_calls),
                ChatMessage.tool_result(
                    ToolResult(call_id=weather.id, name=weather.name, content="sunny, 12 C")
                ),
                ChatMessage.tool_result(
                    ToolResult(
                        call_id=clock.id,
                        name=clock.name,
                        content="clock service down",
                        is_error=True,
                    )
                ),
            ]
        }
    )
    turn2 = await run(provider_settings, turn2_call)
    assert turn2.text == "Oslo is sunny; in Lima it is noon."
    assert turn2.tool_calls == []

    body = provider_server.calls[1].body
    got = results_sent(provider, api, body)
    if provider == "gemini":
        assert got == {
            "weather": ("sunny, 12 C", False),
            "local_time": ("clock service down", True),
        }
        # Both responses in the one user turn after the model's calls.
        model_turn, answers = body["contents"][-2:]
        assert model_turn["role"] == "model"
        assert [p["functionCall"]["name"] for p in model_turn["parts"] if "functionCall" in p] == [
            "weather",
            "local_time",
        ]
        assert len(answers["parts"]) == 2
    else:
        assert got[weather.id][0] == "sunny, 12 C"
        assert got[clock.id][0] == "clock service down"
        assert set(got) == {weather.id, clock.id}
    if provider == "anthropic":
        # Parallel results share one user message, right after the tool_use turn.
        assistant, results = body["messages"][-2:]
        assert [b["type"] for b in assistant["content"]] == ["text", "tool_use", "tool_use"]
        assert assistant["content"][1]["input"] == {"city": "Oslo"}
        assert [b["tool_use_id"] for b in results["content"]] == [weather.id, clock.id]
        assert got[clock.id][1] is True
    elif provider == "openai" and api == "chat":
        assistant = body["messages"][-3]
        assert [json.loads(c["function"]["arguments"]) for c in assistant["tool_calls"]] == [
            {"city": "Oslo"},
            {"city": "Lima"},
        ]
    elif provider == "openai" and api == "responses":
        calls = [i for i in body["input"] if i.get("type") == "function_call"]
        assert [(c["call_id"], c["name"]) for c in calls] == [
            (weather.id, "weather"),
            (clock.id, "local_time"),
        ]


@pytest.mark.parametrize(("provider", "api", "model"), TARGETS, ids=IDS)
async def test_json_format_applies_to_the_final_answer_not_the_tool_turn(
    provider_server: FakeProviderServer,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
    model: str,
) -> None:
    provider_server.script(
        provider, Reply(text="", chunks=[], tool_calls=[ToolUse("weather", {"city": "Oslo"})])
    )
    call = first_turn(provider, api, model).model_copy(update={"response_format": "json"})
    reply = await run(provider_settings, call)
    assert [c.name for c in reply.tool_calls] == ["weather"]


async def test_gemini_gets_its_thought_signature_and_call_id_back(
    provider_server: FakeProviderServer, provider_settings: ProviderSettings
) -> None:
    signature = base64.b64encode(b"opaque-thinking-state").decode()
    provider_server.script(
        "gemini",
        Reply(
            text="",
            chunks=[],
            tool_calls=[ToolUse("weather", {"city": "Oslo"}, id="fc-7", signature=signature)],
        ),
        Reply(text="sunny"),
    )
    call = first_turn("gemini", "chat", "gemini-2.5-flash")
    turn1 = await run(provider_settings, call)
    [weather] = turn1.tool_calls
    assert (weather.id, weather.signature) == ("fc-7", signature)
    follow = call.model_copy(
        update={
            "messages": [
                *call.messages,
                ChatMessage.tool_request(turn1.text, turn1.tool_calls),
                ChatMessage.tool_result(ToolResult(call_id="fc-7", name="weather", content="ok")),
            ]
        }
    )
    assert (await run(provider_settings, follow)).text == "sunny"
    model_turn, answer = provider_server.calls[1].body["contents"][-2:]
    [part] = model_turn["parts"]  # no empty text part before the call
    assert part["functionCall"]["id"] == "fc-7"
    assert part.get("thoughtSignature", part.get("thought_signature")) == signature
    assert answer["parts"][0]["functionResponse"]["id"] == "fc-7"


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_malformed_arguments_become_the_calls_error_not_a_failure(
    provider_server: FakeProviderServer, provider_settings: ProviderSettings, api: str
) -> None:
    provider_server.script(
        "openai",
        Reply(
            text="",
            chunks=[],
            tool_calls=[
                ToolUse("weather", '{"city": "Oslo"'),
                ToolUse("local_time", '["Lima"]'),
                ToolUse("weather", '{"city": "Lima"}'),
            ],
        ),
    )
    reply = await run(provider_settings, first_turn("openai", api, "gpt-4.1-mini"))
    broken, listed, fine = reply.tool_calls
    assert broken.arguments == {} and broken.error is not None
    assert "weather" in broken.error and "not valid JSON" in broken.error
    assert listed.error is not None and "not an object" in listed.error
    assert fine == ToolCall(id=fine.id, name="weather", arguments={"city": "Lima"})


async def test_plain_calls_send_no_tools_field(
    provider_server: FakeProviderServer, provider_settings: ProviderSettings
) -> None:
    for provider, api, model in TARGETS:
        await run(provider_settings, llm_call(provider, model, api=api))
    for recorded in provider_server.calls:
        assert "tools" not in recorded.body


@pytest.mark.parametrize(
    ("fields", "wanted"),
    [
        ({"name": "read file"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": "ok", "parameters": {"type": "string"}}, '"type": "object"'),
        ({"name": "ok", "parameters": {"properties": {}}}, '"type": "object"'),
        ({"name": "ok", "parameters": {"type": "object", "properties": []}}, "properties"),
    ],
)
def test_declarations_are_checked(fields: dict[str, Any], wanted: str) -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        ToolDeclaration(**fields)
    assert wanted in str(raised.value)


def test_plain_messages_recorded_before_tools_still_decode() -> None:
    # A call as recorded in the history of a run in flight.
    old = {
        "workflow_id": "w",
        "step_id": "s",
        "provider": "openai",
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
    }
    call = LlmCall.model_validate(old)
    assert call.tools == [] and call.messages[0].tool_calls == []
    reply = LlmReply.model_validate({"text": "t", "provider": "openai", "model": "m"})
    assert reply.tool_calls == []
