"""File inputs end to end: a real Temporal server, a real worker, the real SDKs.

A 5 MB image goes into the payload store once, when the run starts; each
provider receives it whole (the fake server hashes what arrived) while the
run's history holds only references. Files are untrusted input: over HTTP a
file input never names a path the server would read, and an oversized file
is refused before it is stored.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.provider_server import FakeProviderServer
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from test_attachments_providers import pdf, png

from llmmixer.client.files import File, store_inputs
from llmmixer.client.http import ServeSettings, create_app
from llmmixer.client.mixer import MixerClient
from llmmixer.client.specfile import parse_inputs, prepare_spec
from llmmixer.core.attachments import MEDIA_TYPES, describe_file, sniff_media_type
from llmmixer.core.providers import PROVIDER_SPECS
from llmmixer.core.validation import SpecError
from llmmixer.runtime.storage import DEFAULT_THRESHOLD, build_data_converter
from llmmixer.workers.worker import WorkerSettings, mixer_worker
from llmmixer.workflows.records import RunStatus

FIVE_MB = 5 * 1024 * 1024
TOKEN = f"files-test-{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

TARGETS = {
    "anthropic": ("claude-sonnet-5-5", "chat"),
    "openai": ("gpt-4.1-mini", "chat"),
    "openai-responses": ("gpt-4.1-mini", "responses"),
    "gemini": ("gemini-2.5-flash", "chat"),
}


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), **provider_server.env()}


@pytest.fixture
def stored_client(client: Client, tmp_path: Path) -> Client:
    """A client with llmmixer's converter and a payload store in ``tmp_path``."""
    converter = build_data_converter({"LLMMIXER_PAYLOAD_DIR": str(tmp_path / "payloads")})
    return Client(client.service_client, namespace=client.namespace, data_converter=converter)


@pytest.fixture
async def stored_mixer(
    stored_client: Client, task_queue: str, worker_env: dict[str, str]
) -> AsyncIterator[MixerClient]:
    settings = WorkerSettings(task_queue=task_queue, shutdown_grace_s=2.0)
    async with mixer_worker(stored_client, settings, environ=worker_env) as worker, worker:
        yield MixerClient(stored_client, task_queue)


def vision_spec() -> dict[str, Any]:
    steps = []
    for step_id, (model, api) in TARGETS.items():
        steps.append(
            {
                "id": step_id,
                "provider": step_id.split("-")[0],
                "model": model,
                "api": api,
                "prompt": "Describe {{inputs.diagram}}.",
                "attachments": ["diagram"],
            }
        )
    return {"name": "vision", "defaults": {"retry": {"max_attempts": 1}}, "steps": steps}


def _history_payloads(history: Any) -> list[Payload]:
    found: list[Payload] = []

    def walk(message: Any) -> None:
        if isinstance(message, Payload):
            found.append(message)
            return
        for _field, value in message.ListFields():
            items = value if hasattr(value, "append") or isinstance(value, list) else [value]
            for item in items:
                if hasattr(item, "ListFields"):
                    walk(item)

    for event in history.events:
        walk(event)
    return found


async def test_a_five_megabyte_image_reaches_every_provider_while_history_holds_a_reference(
    stored_mixer: MixerClient, provider_server: FakeProviderServer, tmp_path: Path
) -> None:
    image = png(FIVE_MB)
    digest = hashlib.sha256(image).hexdigest()
    handle = await stored_mixer.start(vision_spec(), inputs={"diagram": File("arch.png", image)})
    result = await asyncio.wait_for(handle.result(), 180)
    assert result.status == RunStatus.COMPLETED, result.error

    # Each SDK sent the whole image, in its API's own part.
    parts = {
        (call.provider, call.api): [(f.part, f.sha256) for f in call.files]
        for call in provider_server.calls
    }
    assert parts == {
        ("anthropic", "messages"): [("image", digest)],
        ("openai", "chat"): [("image_url", digest)],
        ("openai", "responses"): [("input_image", digest)],
        ("gemini", "generate"): [("inline_data", digest)],
    }
    for step_id in TARGETS:
        output = result.steps[step_id].output or ""
        assert f"image/png {FIVE_MB} bytes sha256:{digest}" in output
        # The prompt names the file, it does not carry it.
        assert "Describe [file arch.png (image/png, 5.0 MB)]." in output

    # History holds references only: no payload near the file's size, and
    # not a slice of the image, raw or base64, anywhere in it.
    history = await stored_mixer.temporal.get_workflow_handle(handle.id).fetch_history()
    sizes = [p.ByteSize() for p in _history_payloads(history)]
    assert sizes and max(sizes) < DEFAULT_THRESHOLD
    raw = b"".join(event.SerializeToString() for event in history.events)
    middle = image[FIVE_MB // 2 : FIVE_MB // 2 + 4096]
    assert middle not in raw
    assert base64.b64encode(middle)[8:2000] not in raw
    # The store holds the file once, however many steps sent it.
    store = tmp_path / "payloads"
    big = [p for p in store.rglob("*") if p.is_file() and p.stat().st_size >= FIVE_MB]
    assert len(big) == 1


async def test_a_dry_run_says_what_would_be_attached_and_sends_nothing(
    stored_mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    handle = await stored_mixer.start(
        vision_spec(), inputs={"diagram": File("arch.png", png(4096))}, dry_run=True
    )
    result = await asyncio.wait_for(handle.result(), 60)
    assert result.status == RunStatus.COMPLETED, result.error
    for step_id in TARGETS:
        assert "would attach arch.png (image/png, 4.0 KB)" in (result.steps[step_id].output or "")
    assert provider_server.calls == []


# ---- typing by content -----------------------------------------------------------------


def test_files_are_typed_by_their_content_not_their_name() -> None:
    assert sniff_media_type(png(1024)) == "image/png"
    assert sniff_media_type(b"\xff\xd8\xff\xe0" + os.urandom(20)) == "image/jpeg"
    assert sniff_media_type(b"GIF89a" + os.urandom(20)) == "image/gif"
    assert sniff_media_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_media_type(pdf()) == "application/pdf"
    assert sniff_media_type("naïve text".encode()) == "text/plain"
    assert sniff_media_type(b"\x7fELF\x02\x01\x01\x00") is None
    # A PDF named .png is a PDF; a claim that disagrees with the content is refused.
    assert describe_file("diagram.png", pdf()).media_type == "application/pdf"
    with pytest.raises(ValueError, match="declared image/png but its content is application/pdf"):
        describe_file("diagram.png", pdf(), declared="image/png")
    # Only the last part of a name is kept: it reaches prompts and uploads.
    assert describe_file("../../etc/x.png", png(1024)).name == "x.png"
    # Every type llmmixer reads is one some provider takes.
    assert set(MEDIA_TYPES) == set(PROVIDER_SPECS[0].attachment_types)


def test_cli_input_at_file_is_a_file_for_images_and_text_otherwise(tmp_path: Path) -> None:
    (tmp_path / "arch.png").write_bytes(png(2048))
    (tmp_path / "notes.md").write_text("# notes\n")
    inputs = parse_inputs([f"diagram=@{tmp_path / 'arch.png'}", f"notes=@{tmp_path / 'notes.md'}"])
    assert isinstance(inputs["diagram"], File) and inputs["diagram"].name == "arch.png"
    assert inputs["notes"] == "# notes\n"
    spec = vision_spec()
    _, parsed = prepare_spec(spec, inputs=inputs)
    [attachment] = parsed.attachments(parsed.step("gemini"))  # type: ignore[arg-type]
    assert attachment.media_type == "image/png" and attachment.size == 2048


def test_a_spec_file_names_its_files_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "arch.png").write_bytes(png(1024))
    spec = vision_spec() | {"inputs": {"diagram": {"file": "arch.png"}}}
    import json

    (tmp_path / "vision.json").write_text(json.dumps(spec))
    _, parsed = prepare_spec(str(tmp_path / "vision.json"))
    assert str(parsed.inputs["diagram"]) == "[file arch.png (image/png, 1.0 KB)]"


def test_validation_refuses_what_a_provider_cannot_take() -> None:
    spec = {
        "inputs": {"doc": {"file": describe_file("spec.pdf", pdf()).model_dump()}, "t": "x"},
        "steps": [
            {
                "id": "local",
                "provider": "openai",
                "model": "llama3",
                "base_url": "http://127.0.0.1:11434/v1",
                "prompt": "summarise",
                "attachments": ["doc", "t", "missing"],
            }
        ],
    }
    with pytest.raises(SpecError) as refused:
        prepare_spec(spec)
    lines = str(refused.value).splitlines()
    assert any(
        line.startswith("step local: attachments: input 'doc' is application/pdf")
        and "openai at a step's own base_url" in line
        for line in lines
    )
    assert any(line.startswith("step local: attachments.1: input 't' is text") for line in lines)
    assert any(
        line.startswith("step local: attachments.2: 'missing' is not an input") for line in lines
    )


async def test_an_oversized_file_is_refused_before_it_is_stored(tmp_path: Path) -> None:
    converter = build_data_converter({"LLMMIXER_PAYLOAD_DIR": str(tmp_path / "p")})
    with pytest.raises(SpecError, match="LLMMIXER_MAX_ATTACHMENT_BYTES") as refused:
        await store_inputs({"big": File("big.png", png(64 * 1024))}, converter, max_bytes=4096)
    assert str(refused.value).startswith("spec: inputs.big:")
    assert not (tmp_path / "p").exists()
    # A path is read no further than the limit (here /dev/zero, endless).
    with pytest.raises(SpecError, match="over the 4096-byte limit"):
        await store_inputs({"z": {"file": "/dev/zero"}}, converter, max_bytes=4096)


# ---- over HTTP -------------------------------------------------------------------------


@pytest.fixture
def workflow_cache() -> int:
    return 100


@pytest.fixture
async def http(stored_mixer: MixerClient) -> AsyncIterator[httpx.AsyncClient]:
    from test_serve import serve_in_process

    app = create_app(stored_mixer, ServeSettings(token=TOKEN))
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        yield client


async def test_http_file_inputs_carry_bytes_and_never_make_the_server_read_a_path(
    http: httpx.AsyncClient,
    stored_mixer: MixerClient,
    provider_server: FakeProviderServer,
    tmp_path: Path,
) -> None:
    secret = tmp_path / "server-secret.png"
    secret.write_bytes(png(1024))
    spec = vision_spec()
    spec["steps"] = spec["steps"][:1]
    # The attacker names files on the server, in the inputs and in the spec itself.
    for attempt in (
        {"spec": spec, "inputs": {"diagram": {"file": "/etc/passwd"}}},
        {"spec": spec, "inputs": {"diagram": {"file": str(secret)}}},
        {"spec": spec | {"inputs": {"diagram": {"file": str(secret)}}}},
    ):
        answer = await http.post("/workflows", json=attempt, headers=AUTH)
        assert answer.status_code == 422, answer.text
        assert "never names a path on the server" in answer.text
    # Nor a reference into the payload store, which only a client writes.
    forged = describe_file("x.png", png(1024)).model_dump() | {"ref": "CgR0ZXN0"}
    answer = await http.post(
        "/workflows", json={"spec": spec, "inputs": {"diagram": {"file": forged}}}, headers=AUTH
    )
    assert answer.status_code == 422 and "not a stored reference" in answer.text
    assert provider_server.calls == []

    # The bytes themselves are accepted, typed by their content.
    image = png(2048)
    data = base64.b64encode(image).decode()
    answer = await http.post(
        "/workflows",
        json={
            "spec": spec,
            "inputs": {
                "diagram": {"file": {"name": "a.png", "media_type": "image/png", "data": data}}
            },
        },
        headers=AUTH,
    )
    assert answer.status_code == 201, answer.text
    result = await asyncio.wait_for(
        stored_mixer.get_handle(answer.json()["workflow_id"]).result(), 60
    )
    assert result.status == RunStatus.COMPLETED, result.error
    [call] = provider_server.calls
    assert [f.data for f in call.files] == [image]
    # A type claim that disagrees with the content is refused.
    answer = await http.post(
        "/workflows",
        json={
            "spec": spec,
            "inputs": {
                "diagram": {
                    "file": {
                        "name": "a.png",
                        "media_type": "image/png",
                        "data": base64.b64encode(pdf()).decode(),
                    }
                }
            },
        },
        headers=AUTH,
    )
    assert answer.status_code == 422 and "its content is application/pdf" in answer.text


async def test_with_the_store_off_only_small_files_travel_in_history() -> None:
    from temporalio.contrib.pydantic import pydantic_data_converter

    small = await store_inputs({"a": File("a.png", png(2048))}, pydantic_data_converter)
    assert small["a"]["file"]["size"] == 2048 and small["a"]["file"]["ref"]
    with pytest.raises(SpecError, match="LLMMIXER_PAYLOAD_STORE is off"):
        await store_inputs({"b": File("b.png", png(DEFAULT_THRESHOLD))}, pydantic_data_converter)


def test_a_stored_reference_that_looks_random_is_not_taken_for_a_credential() -> None:
    stored = describe_file("a.png", png(1024)).model_dump() | {"ref": "AIza" + "Q" * 35}
    spec = vision_spec() | {"inputs": {"diagram": {"file": stored}}}
    prepare_spec(spec)
    # Elsewhere in the spec, the same shape is still refused.
    spec["steps"][0]["prompt"] = "AIza" + "Q" * 35
    with pytest.raises(SpecError, match="looks like a credential"):
        prepare_spec(spec)
