"""Large payloads in S3 (``LLMMIXER_PAYLOAD_S3_BUCKET``), against a real S3 API.

The S3 API is moto's server on loopback: real HTTP, real signatures, real
multipart uploads, so what aioboto3 sends and what the SDK's S3 driver makes
of the answers is what runs in production. Objects are then listed with boto3,
a second client, the way an operator would look into the bucket.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aioboto3  # type: ignore[import-not-found,unused-ignore]
import boto3
import httpx
import pytest
from fakes.big_payloads import FIVE_MB, big_text, chunked, two_step_spec
from fakes.provider_server import FakeProviderServer, Reply
from moto.server import ThreadedMotoServer
from temporalio.client import Client
from temporalio.contrib.aws.s3driver.aioboto3 import new_aioboto3_client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter

from llmmixer.client.audit import audit_from_client
from llmmixer.client.mixer import MixerClient
from llmmixer.runtime.storage import (
    DEFAULT_THRESHOLD,
    PayloadSettings,
    build_data_converter,
    external_storage_for,
)
from llmmixer.workers.worker import WorkerSettings, mixer_worker
from llmmixer.workflows.records import RunStatus

REGION = "eu-west-1"


@dataclass(frozen=True)
class S3Api:
    endpoint_url: str
    bucket: str

    def objects(self) -> dict[str, int]:
        """The bucket's objects (key to size), listed with boto3."""
        s3 = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION)
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}

    def read(self, key: str) -> bytes:
        s3 = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION)
        body: bytes = s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body


@pytest.fixture
def s3_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Api]:
    """moto's S3 server on 127.0.0.1 (a free port), with one bucket.

    Credentials and the endpoint come from the environment, as they would for
    a worker: ``AWS_ENDPOINT_URL`` is what points the SDK's default S3 client
    (the one ``LLMMIXER_PAYLOAD_S3_BUCKET`` opens) at another S3 API.
    """
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    # Nothing of the developer's AWS setup is read, and nothing leaves loopback.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # moto's state is per process, not per server: a bucket of its own per test.
    api = S3Api(endpoint_url=endpoint_url, bucket=f"llmmixer-payloads-{uuid.uuid4().hex[:8]}")
    boto3.client("s3", endpoint_url=endpoint_url, region_name=REGION).create_bucket(
        Bucket=api.bucket, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    try:
        yield api
    finally:
        httpx.post(f"{endpoint_url}/moto-api/reset")  # frees what the test stored
        server.stop()


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), **provider_server.env()}


def _client_with(client: Client, converter: DataConverter) -> Client:
    return Client(client.service_client, namespace=client.namespace, data_converter=converter)


async def test_a_runs_large_output_goes_to_the_bucket_and_the_client_reads_it_back(
    s3_api: S3Api,
    client: Client,
    task_queue: str,
    worker_env: dict[str, str],
    provider_server: FakeProviderServer,
    tmp_path: Path,
) -> None:
    big = big_text()
    provider_server.script("openai", Reply(chunks=chunked(big), usage=(3, 9)))
    provider_server.script("openai", Reply(text="a summary", usage=(5, 2)))
    # Exactly what a worker and `llmmixer` build from these two variables.
    settings = {
        "LLMMIXER_PAYLOAD_DIR": str(tmp_path / "worker-dir"),
        "LLMMIXER_PAYLOAD_S3_BUCKET": s3_api.bucket,
    }
    worker_client = _client_with(client, build_data_converter(settings))
    worker_settings = WorkerSettings(task_queue=task_queue, shutdown_grace_s=2.0)
    async with mixer_worker(worker_client, worker_settings, environ=worker_env) as worker, worker:
        handle = await MixerClient(worker_client, task_queue).start(two_step_spec("big-in-s3"))
        result = await asyncio.wait_for(handle.result(), 120)
    assert result.status == RunStatus.COMPLETED
    assert provider_server.calls[-1].body["messages"][-1]["content"] == "Summarise:\n" + big

    # In the bucket, not on the worker's disk.
    objects = s3_api.objects()
    assert objects and max(objects.values()) > FIVE_MB / 2, objects
    assert not any(path.is_file() for path in (tmp_path / "worker-dir").rglob("*"))
    assert any(b"<<TAIL>>" in s3_api.read(key) for key, size in objects.items() if size > FIVE_MB)

    # Another client, sharing nothing with the worker but the bucket, reads the
    # whole output back; history itself holds references only.
    reader = _client_with(
        client,
        build_data_converter({**settings, "LLMMIXER_PAYLOAD_DIR": str(tmp_path / "client-dir")}),
    )
    audit = await audit_from_client(reader, handle.id)
    assert audit["steps"]["big"]["output"] == big
    assert audit["steps"]["echo"]["prompt"] == "Summarise:\n" + big
    history = await reader.get_workflow_handle(handle.id).fetch_history()
    assert max(len(event.SerializeToString()) for event in history.events) < DEFAULT_THRESHOLD


async def test_with_s3_on_new_payloads_go_to_the_bucket_and_old_files_stay_readable(
    s3_api: S3Api, tmp_path: Path
) -> None:
    directory = {"LLMMIXER_PAYLOAD_DIR": str(tmp_path / "payloads")}
    [old_ref] = await build_data_converter(directory).encode(["x" * FIVE_MB])
    settings = PayloadSettings.from_env({**directory, "LLMMIXER_PAYLOAD_S3_BUCKET": s3_api.bucket})
    # aioboto3's own client, pointed at the endpoint explicitly.
    session = aioboto3.Session()
    async with session.client("s3", endpoint_url=s3_api.endpoint_url, region_name=REGION) as s3:
        converter = DataConverter(
            payload_converter_class=pydantic_data_converter.payload_converter_class,
            external_storage=external_storage_for(settings, s3_client=new_aioboto3_client(s3)),
        )
        [ref] = await converter.encode(["y" * FIVE_MB])
        assert await converter.decode([ref], [str]) == ["y" * FIVE_MB]
        # Payloads stored in the directory before S3 was turned on still resolve.
        assert await converter.decode([old_ref], [str]) == ["x" * FIVE_MB]
    [(key, size)] = s3_api.objects().items()
    assert size >= FIVE_MB
    assert key.encode() in ref.SerializeToString()
