"""A 5 MB model output end to end: external payload storage, codecs, the codec server.

The Temporal server refuses payloads over 2 MB, so these runs only complete
because payloads above the threshold leave history for the payload store.
The runs use a client (and so a worker) built with ``build_data_converter``,
exactly as ``Connection.connect`` builds them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.big_payloads import FIVE_MB, big_text, chunked, two_step_spec
from fakes.provider_server import FakeProviderServer, Reply
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter

from llmmixer.client.audit import audit_from_client
from llmmixer.client.mixer import MixerClient
from llmmixer.core.contracts import Usage
from llmmixer.runtime.codec_server import serve_codec
from llmmixer.runtime.settings import SettingsError
from llmmixer.runtime.storage import (
    DEFAULT_THRESHOLD,
    AesGcmCodec,
    PayloadKeyError,
    PayloadSettings,
    PayloadStoreError,
    ZlibCodec,
    build_data_converter,
    codec_for,
)
from llmmixer.workers.worker import WorkerSettings, mixer_worker
from llmmixer.workflows.records import RunStatus

CODEC_TOKEN = "codec-test-token-0123456789"


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), **provider_server.env()}


def _converter(payload_dir: Path, **extra: str) -> DataConverter:
    return build_data_converter({"LLMMIXER_PAYLOAD_DIR": str(payload_dir), **extra})


async def _run_with(
    client: Client,
    converter: DataConverter,
    task_queue: str,
    worker_env: dict[str, str],
    spec: dict[str, Any],
) -> tuple[MixerClient, str, Any]:
    big_client = Client(client.service_client, namespace=client.namespace, data_converter=converter)
    settings = WorkerSettings(task_queue=task_queue, shutdown_grace_s=2.0)
    async with mixer_worker(big_client, settings, environ=worker_env) as worker, worker:
        mixer = MixerClient(big_client, task_queue)
        handle = await mixer.start(spec)
        result = await asyncio.wait_for(handle.result(), 120)
        # What `llmmixer run`/`status` poll must answer too, however big the run.
        assert (await handle.progress()).status == result.status
        return mixer, handle.id, result


def _history_payloads(history: Any) -> list[Payload]:
    found: list[Payload] = []

    def walk(message: Any) -> None:
        if isinstance(message, Payload):
            found.append(message)
            return
        for _field, value in message.ListFields():
            items = (
                value if isinstance(value, list | tuple) or hasattr(value, "append") else [value]
            )
            for item in items:
                if hasattr(item, "ListFields"):
                    walk(item)

    for event in history.events:
        walk(event)
    return found


async def test_five_megabyte_output_round_trips_through_the_payload_store(
    client: Client,
    task_queue: str,
    worker_env: dict[str, str],
    provider_server: FakeProviderServer,
    tmp_path: Path,
) -> None:
    big = big_text()
    provider_server.script("openai", Reply(chunks=chunked(big), usage=(3, 1_300_000)))
    provider_server.script("openai", Reply(text="a summary", usage=(1_300_010, 2)))
    payload_dir = tmp_path / "payloads"

    mixer, workflow_id, result = await _run_with(
        client, _converter(payload_dir), task_queue, worker_env, two_step_spec()
    )

    assert result.status == RunStatus.COMPLETED
    assert result.output == "a summary"
    # The whole text reached the next step's provider call as its prompt.
    sent = provider_server.calls[-1].body["messages"][-1]["content"]
    assert sent == "Summarise:\n" + big
    # The audit rebuilds both steps from history, resolving stored payloads.
    audit = await audit_from_client(mixer.temporal, workflow_id)
    assert audit["steps"]["big"]["output"] == big
    assert audit["steps"]["echo"]["prompt"] == "Summarise:\n" + big
    assert (
        audit["steps"]["big"]["usage"]
        == Usage(input_tokens=3, output_tokens=1_300_000).model_dump()
    )

    # History itself holds references only: no payload reaches the threshold.
    history = await mixer.temporal.get_workflow_handle(workflow_id).fetch_history()
    sizes = [payload.ByteSize() for payload in _history_payloads(history)]
    assert sizes and max(sizes) < DEFAULT_THRESHOLD
    stored = [path for path in payload_dir.rglob("*") if path.is_file()]
    assert stored, "nothing was written to the payload store"
    assert oct(payload_dir.stat().st_mode & 0o777) == "0o700"


async def test_result_of_a_large_run_stays_plain_json_for_the_temporal_cli(
    client: Client,
    task_queue: str,
    worker_env: dict[str, str],
    provider_server: FakeProviderServer,
    tmp_path: Path,
) -> None:
    big = big_text()
    provider_server.script("openai", Reply(chunks=chunked(big), usage=(3, 9)))
    provider_server.script("openai", Reply(text="a summary", usage=(5, 2)))
    mixer, workflow_id, _ = await _run_with(
        client, _converter(tmp_path / "payloads"), task_queue, worker_env, two_step_spec()
    )
    history = await mixer.temporal.get_workflow_handle(workflow_id).fetch_history()
    completed = history.events[-1].workflow_execution_completed_event_attributes
    payload = completed.result.payloads[0]
    # What `temporal workflow result` prints: inline JSON, no codec, no store.
    assert payload.metadata["encoding"] == b"json/plain"
    [plain] = await pydantic_data_converter.decode([payload], [dict])
    assert plain["status"] == "completed"
    big_record = plain["steps"]["big"]
    assert big_record["output_chars"] == len(big)
    assert f"the whole text: llmmixer audit {workflow_id}" in big_record["output"]
    assert big_record["output"].startswith(big[:1000]) and big_record["output"].endswith(big[-500:])


async def test_compressed_and_encrypted_payloads_round_trip_and_need_the_key(
    client: Client,
    task_queue: str,
    worker_env: dict[str, str],
    provider_server: FakeProviderServer,
    tmp_path: Path,
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    settings = {"LLMMIXER_PAYLOAD_COMPRESS": "1", "LLMMIXER_PAYLOAD_KEY": key}
    converter = _converter(tmp_path / "payloads", **settings)
    big = big_text(3 * 1024 * 1024)
    provider_server.script("openai", Reply(chunks=chunked(big), usage=(3, 9)))
    provider_server.script("openai", Reply(text="short", usage=(5, 2)))
    mixer, workflow_id, result = await _run_with(
        client, converter, task_queue, worker_env, two_step_spec()
    )
    assert result.status == RunStatus.COMPLETED
    audit = await audit_from_client(mixer.temporal, workflow_id)
    assert audit["steps"]["big"]["output"] == big

    # Stored files are encrypted: the text is nowhere in them.
    for path in (tmp_path / "payloads").rglob("*"):
        if path.is_file():
            assert b"quick brown fox" not in path.read_bytes()
    # Without the key, the audit says which setting it needs.
    keyless = Client(
        client.service_client,
        namespace=client.namespace,
        data_converter=_converter(tmp_path / "payloads"),
    )
    with pytest.raises(Exception, match="LLMMIXER_PAYLOAD"):
        await audit_from_client(keyless, workflow_id)


async def test_codecs_round_trip_and_compression_leaves_small_payloads_plain() -> None:
    small = Payload(metadata={"encoding": b"json/plain"}, data=b'{"status": "completed"}')
    large = Payload(metadata={"encoding": b"json/plain"}, data=b"x" * (DEFAULT_THRESHOLD + 10))
    zlib_codec = ZlibCodec(min_size=DEFAULT_THRESHOLD)
    encoded = await zlib_codec.encode([small, large])
    assert encoded[0] == small  # results and queries stay readable by the Temporal CLI
    assert encoded[1].metadata["encoding"] == b"binary/zlib"
    assert encoded[1].ByteSize() < large.ByteSize() / 50
    assert await zlib_codec.decode(encoded) == [small, large]

    old, new = os.urandom(32), os.urandom(32)
    sealed_old = await AesGcmCodec([old]).encode([small])
    rotated = AesGcmCodec([new, old])
    assert await rotated.decode(sealed_old) == [small]  # old payloads stay readable
    assert (await rotated.encode([small]))[0].metadata["encryption-key-id"] != sealed_old[
        0
    ].metadata["encryption-key-id"]
    with pytest.raises(PayloadKeyError, match="key id"):
        await AesGcmCodec([new]).decode(sealed_old)
    tampered = Payload()
    tampered.CopyFrom(sealed_old[0])
    tampered.data = tampered.data[:-1] + bytes([tampered.data[-1] ^ 1])
    with pytest.raises(PayloadKeyError, match="authentication"):
        await AesGcmCodec([old]).decode([tampered])


def test_payload_settings_from_the_environment(tmp_path: Path) -> None:
    default = PayloadSettings.from_env({"LLMMIXER_HOME": str(tmp_path)})
    assert default.store == "fs" and default.directory == tmp_path / "payloads"
    assert codec_for(default) is None
    s3 = PayloadSettings.from_env({"LLMMIXER_PAYLOAD_S3_BUCKET": "runs", "HOME": str(tmp_path)})
    assert s3.store == "s3" and s3.s3_bucket == "runs"
    assert PayloadSettings.from_env({"LLMMIXER_PAYLOAD_STORE": "off"}).store == "off"
    assert build_data_converter({"LLMMIXER_PAYLOAD_STORE": "off"}).external_storage is None
    with pytest.raises(ValueError, match="LLMMIXER_PAYLOAD_S3_BUCKET"):
        PayloadSettings.from_env({"LLMMIXER_PAYLOAD_STORE": "s3"})
    with pytest.raises(SettingsError, match="32 bytes") as refused:
        PayloadSettings.from_env({"LLMMIXER_PAYLOAD_KEY": "hunter2-not-a-key"})
    assert "hunter2" not in str(refused.value)
    hex_key = os.urandom(32).hex()
    assert len(PayloadSettings.from_env({"LLMMIXER_PAYLOAD_KEY": hex_key}).keys) == 1


async def test_filesystem_store_refuses_forged_and_missing_references(tmp_path: Path) -> None:
    converter = _converter(tmp_path / "p")
    [ref] = await converter.encode(["z" * FIVE_MB])
    forged = Payload()
    forged.CopyFrom(ref)
    forged.data = forged.data.replace(b'"sha256"', b'"sha256x"')
    with pytest.raises(PayloadStoreError, match="malformed"):
        await converter.decode([forged], [str])
    elsewhere = _converter(tmp_path / "other")
    with pytest.raises(PayloadStoreError, match="LLMMIXER_PAYLOAD_DIR"):
        await elsewhere.decode([ref], [str])


@pytest.fixture
async def codec_server() -> AsyncIterator[tuple[str, AesGcmCodec]]:
    codec = AesGcmCodec([os.urandom(32)])
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_codec(codec, port=0, token=CODEC_TOKEN, ready=bound.set_result)
    )
    port = await asyncio.wait_for(bound, 5)
    try:
        yield f"http://127.0.0.1:{port}", codec
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_codec_server_decodes_for_the_web_ui(
    codec_server: tuple[str, AesGcmCodec],
) -> None:
    url, codec = codec_server
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"a": 1}')
    [sealed] = await codec.encode([plain])

    def as_json(payload: Payload) -> dict[str, Any]:
        return {
            "metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
            "data": base64.b64encode(payload.data).decode(),
        }

    async with httpx.AsyncClient() as http:
        refused = await http.post(f"{url}/decode", json={"payloads": [as_json(sealed)]})
        assert refused.status_code == 401
        headers = {"Authorization": f"Bearer {CODEC_TOKEN}", "Origin": "http://localhost:8233"}
        preflight = await http.options(f"{url}/decode", headers=headers)
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:8233"
        answer = await http.post(
            f"{url}/decode", json={"payloads": [as_json(sealed)]}, headers=headers
        )
    assert answer.status_code == 200
    [decoded] = answer.json()["payloads"]
    assert base64.b64decode(decoded["data"]) == b'{"a": 1}'
    assert json.loads(base64.b64decode(decoded["data"])) == {"a": 1}


async def test_temporal_cli_reads_an_encrypted_result_through_the_codec_server(
    client: Client,
    task_queue: str,
    worker_env: dict[str, str],
    provider_server: FakeProviderServer,
    tmp_path: Path,
) -> None:
    from conftest import temporal_binary

    raw_key = os.urandom(32)
    key = base64.b64encode(raw_key).decode()
    converter = _converter(tmp_path / "payloads", LLMMIXER_PAYLOAD_KEY=key)
    provider_server.script("openai", Reply(text="secret draft", usage=(3, 2)))
    provider_server.script("openai", Reply(text="secret summary", usage=(4, 2)))
    _, workflow_id, result = await _run_with(
        client, converter, task_queue, worker_env, two_step_spec()
    )
    assert result.output == "secret summary"
    address = client.service_client.config.target_host
    command = [temporal_binary(), "workflow", "result", "--workflow-id", workflow_id]
    command += ["--address", address, "-o", "json"]

    def run(extra: list[str]) -> str:
        done = subprocess.run(
            command + extra, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    sealed = await asyncio.to_thread(run, [])
    assert "secret summary" not in sealed  # encrypted at rest in Temporal

    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        serve_codec(AesGcmCodec([raw_key]), port=0, token=CODEC_TOKEN, ready=bound.set_result)
    )
    try:
        port = await asyncio.wait_for(bound, 5)
        codec = [
            "--codec-endpoint",
            f"http://127.0.0.1:{port}",
            "--codec-auth",
            f"Bearer {CODEC_TOKEN}",
        ]
        opened = await asyncio.to_thread(run, codec)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
    assert "secret summary" in opened
