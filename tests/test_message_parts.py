"""Files placed in a chosen turn: a message's `content` as a list of parts.

A few-shot example turn carries its own image; the real Anthropic SDK sends
each file in the turn it was placed in (the fake server records the body),
while validation refuses a part whose input is missing, text, of the other
kind, in a model turn, or one the step's provider cannot take.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import pytest
from fakes.provider_server import FakeProviderServer
from test_attachments import stored_client, stored_mixer, worker_env  # noqa: F401 (fixtures)
from test_attachments_providers import pdf, png

from llmmixer.client.files import File
from llmmixer.client.mixer import MixerClient
from llmmixer.client.specfile import prepare_spec
from llmmixer.core.attachments import describe_file
from llmmixer.core.validation import SpecError
from llmmixer.workflows.records import RunStatus


def few_shot_spec(provider: str = "anthropic", model: str = "claude-sonnet-5-5") -> dict[str, Any]:
    return {
        "name": "few-shot",
        "defaults": {"retry": {"max_attempts": 1}},
        "steps": [
            {
                "id": "label",
                "provider": provider,
                "model": model,
                "system": "Label diagrams.",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Example:"},
                            {"type": "image", "input": "example"},
                        ],
                    },
                    {"role": "assistant", "content": "a sequence diagram"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "input": "diagram"},
                            {"type": "text", "text": "Now {{inputs.ask}}"},
                            {"type": "document", "input": "notes"},
                        ],
                    },
                ],
            }
        ],
    }


def _blocks(content: Any) -> list[tuple[str, bytes | str]]:
    """An Anthropic message's content as (block type, decoded data or text)."""
    if isinstance(content, str):
        return [("text", content)]
    found: list[tuple[str, bytes | str]] = []
    for block in content:
        source = block.get("source") or {}
        if source.get("type") == "base64":
            found.append((block["type"], base64.b64decode(source["data"])))
        elif source.get("type") == "text":
            found.append((block["type"], source["data"]))
        else:
            found.append((block["type"], block.get("text", "")))
    return found


async def test_each_file_part_reaches_the_provider_in_the_turn_it_was_placed_in(
    stored_mixer: MixerClient,  # noqa: F811
    provider_server: FakeProviderServer,
) -> None:
    example, diagram = png(2048), png(4096)
    handle = await stored_mixer.start(
        few_shot_spec(),
        inputs={
            "example": File("example.png", example),
            "diagram": File("arch.png", diagram),
            "notes": File("notes.pdf", pdf()),
            "ask": "label this one.",
        },
    )
    result = await asyncio.wait_for(handle.result(), 120)
    assert result.status == RunStatus.COMPLETED, result.error

    [call] = provider_server.calls
    assert [f.sha256 for f in call.files] == [
        hashlib.sha256(data).hexdigest() for data in (example, diagram, pdf())
    ]
    first, answer, last = call.body["messages"]
    # The example image is in the example turn, not piled onto the last one.
    assert _blocks(first["content"]) == [("image", example), ("text", "Example:")]
    assert answer["role"] == "assistant" and _blocks(answer["content"])[0][1] == (
        "a sequence diagram"
    )
    # A turn's files come first, in their order, then its text parts (rendered) as one text.
    assert _blocks(last["content"]) == [
        ("image", diagram),
        ("document", pdf()),
        ("text", "Now label this one."),
    ]


async def test_a_dry_run_names_the_files_of_every_turn(
    stored_mixer: MixerClient,  # noqa: F811
    provider_server: FakeProviderServer,
) -> None:
    handle = await stored_mixer.start(
        few_shot_spec(),
        inputs={
            "example": File("example.png", png(1024)),
            "diagram": File("arch.png", png(2048)),
            "notes": File("notes.pdf", pdf()),
            "ask": "go",
        },
        dry_run=True,
    )
    result = await asyncio.wait_for(handle.result(), 60)
    output = result.steps["label"].output or ""
    assert "example.png" in output and "arch.png" in output and "notes.pdf" in output
    assert provider_server.calls == []


# ---- validation -------------------------------------------------------------------------


def _described(name: str, data: bytes) -> dict[str, Any]:
    return {"file": describe_file(name, data).model_dump()}


def _issues(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as refused:
        prepare_spec(spec)
    return str(refused.value).splitlines()


def test_a_part_must_name_a_file_input_of_its_kind() -> None:
    spec = few_shot_spec()
    spec["inputs"] = {
        "example": _described("spec.pdf", pdf()),  # a PDF in an image part
        "diagram": "just text",  # a text input in an image part
        "ask": "x",
        # `notes` is missing
    }
    lines = _issues(spec)
    assert any(
        line.startswith("step label: messages[0].content[1]: input 'example' is application/pdf")
        and "not an image" in line
        and "{type: document, input: example}" in line
        for line in lines
    ), lines
    assert any(
        line.startswith("step label: messages[2].content[0]: input 'diagram' is text, not a file")
        for line in lines
    ), lines
    assert any(
        line.startswith("step label: messages[2].content[2]: 'notes' is not an input")
        for line in lines
    ), lines


def test_a_document_part_refuses_an_image_and_takes_text() -> None:
    spec = few_shot_spec()
    spec["inputs"] = {
        "example": _described("a.png", png(512)),
        "diagram": _described("b.png", png(512)),
        "notes": _described("notes.png", png(512)),
        "ask": "x",
    }
    lines = _issues(spec)
    assert any(
        line.startswith("step label: messages[2].content[2]: input 'notes' is image/png")
        and "not a document" in line
        for line in lines
    ), lines
    spec["inputs"]["notes"] = _described("notes.txt", b"plain notes")
    prepare_spec(spec)


def test_a_file_cannot_sit_in_the_models_own_turn() -> None:
    spec = few_shot_spec()
    spec["inputs"] = {"example": _described("a.png", png(512)), "ask": "x"}
    spec["steps"][0]["messages"] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image", "input": "example"}]},
        {"role": "user", "content": "go on"},
    ]
    assert _issues(spec) == [
        "step label: messages[1].content[0]: an image part can only be sent in a message "
        "with role: user: move it to a user message"
    ]


def test_a_part_the_provider_cannot_take_is_refused_at_its_place() -> None:
    spec = few_shot_spec(provider="openai", model="llama3")
    spec["steps"][0]["base_url"] = "http://127.0.0.1:11434/v1"
    spec["inputs"] = {
        "example": _described("a.png", png(512)),
        "diagram": _described("b.png", png(512)),
        "notes": _described("notes.pdf", pdf()),
        "ask": "x",
    }
    lines = _issues(spec)
    assert any(
        line.startswith("step label: messages[2].content[2]: input 'notes' is application/pdf")
        and "openai at a step's own base_url" in line
        for line in lines
    ), lines


def test_a_malformed_part_says_which_part_and_what_to_write() -> None:
    spec = few_shot_spec()
    spec["steps"][0]["messages"] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image", "file": "a.png"},
                {"type": "video", "input": "clip"},
            ],
        },
        {"role": "user", "content": 7},
    ]
    lines = _issues(spec)
    assert "step label: messages[0].content[1].input: is required: add it" in lines
    assert any(
        line.startswith("step label: messages[0].content[1].file: is not a known") for line in lines
    )
    assert (
        "step label: messages[0].content[2]: each part needs `type`: one of text, image, document"
        in lines
    )
    assert any(
        line.startswith("step label: messages[1].content: use text, or a list of parts")
        for line in lines
    )
    # Parts of a list are not also reported as "not a valid string".
    assert not any("valid string" in line for line in lines)


def test_templates_in_text_parts_are_checked() -> None:
    spec = few_shot_spec()
    spec["inputs"] = {
        "example": _described("a.png", png(512)),
        "diagram": _described("b.png", png(512)),
        "notes": _described("n.pdf", pdf()),
    }
    lines = _issues(spec)  # `ask` is referenced in a text part but not an input
    assert any(line.startswith("step label: messages[2].content[1].text:") for line in lines), lines
