"""The codec server (``llmmixer codec-server``) against whoever can reach it.

``/decode`` turns every encrypted payload of the namespace back into text, so
the server follows ``llmmixer serve``'s rule: without a token, loopback only
(bind and ``Host``) and no posts from other web sites; with a token, the token.
Each test sends real HTTP to a real server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.api.common.v1 import Payload

from llmmixer.runtime.address import free_port
from llmmixer.runtime.codec_server import CodecServerRefused, serve_codec
from llmmixer.runtime.http_guard import TokenError
from llmmixer.runtime.storage import AesGcmCodec

TOKEN = "codec-security-test-0123456789"
WEB_UI = "http://localhost:8233"
PLAIN = Payload(metadata={"encoding": b"json/plain"}, data=b'{"secret": "payroll"}')


def as_json(payload: Payload) -> dict[str, Any]:
    return {
        "metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
        "data": base64.b64encode(payload.data).decode(),
    }


def decoded(response: httpx.Response) -> bytes:
    [payload] = response.json()["payloads"]
    return base64.b64decode(payload["data"])


class running_codec:
    """``serve_codec`` in a task on a free loopback port."""

    def __init__(self, codec: AesGcmCodec, token: str | None) -> None:
        self.codec = codec
        self.token = token
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> str:
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(
            serve_codec(self.codec, port=0, token=self.token, ready=bound.set_result)
        )
        port = await asyncio.wait_for(bound, 10)
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def open_codec() -> AsyncIterator[tuple[str, Payload]]:
    """A codec server as the docs start it on a laptop: loopback, no token."""
    codec = AesGcmCodec([os.urandom(32)])
    [sealed] = await codec.encode([PLAIN])
    async with running_codec(codec, token=None) as url:
        yield url, sealed


async def test_without_a_token_only_loopback_host_names_are_answered(
    open_codec: tuple[str, Payload],
) -> None:
    url, sealed = open_codec
    port = url.rsplit(":", 1)[1]
    body = {"payloads": [as_json(sealed)]}
    async with httpx.AsyncClient(base_url=url) as http:
        # A DNS-rebound page: evil.example resolves to 127.0.0.1, so it is same-origin.
        for host in (f"evil.example:{port}", "evil.example"):
            response = await http.post("/decode", json=body, headers={"Host": host})
            assert response.status_code == 403, response.text
            assert "payroll" not in response.text
            assert "LLMMIXER_CODEC_TOKEN" in response.json()["error"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            response = await http.post("/decode", json=body, headers={"Host": host})
            assert response.status_code == 200, (host, response.text)
            assert decoded(response) == PLAIN.data


async def test_a_page_on_another_site_cannot_decode_but_the_web_ui_can(
    open_codec: tuple[str, Payload],
) -> None:
    url, sealed = open_codec
    body = json.dumps({"payloads": [as_json(sealed)]}).encode()
    json_type = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url) as http:
        for headers in (
            {"Content-Type": "text/plain", "Origin": "https://evil.example"},
            {**json_type, "Origin": "https://evil.example"},
            {**json_type, "Sec-Fetch-Site": "cross-site"},
        ):
            response = await http.post("/decode", content=body, headers=headers)
            assert response.status_code == 403, (headers, response.text)
            assert "payroll" not in response.text
        no_origin_text = await http.post(
            "/decode", content=body, headers={"Content-Type": "text/plain"}
        )
        assert no_origin_text.status_code == 415
        web_ui = {**json_type, "Origin": WEB_UI, "Sec-Fetch-Site": "same-site"}
        response = await http.post("/decode", content=body, headers=web_ui)
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == WEB_UI
        assert decoded(response) == PLAIN.data
        # the Temporal CLI: no Origin, JSON
        cli = await http.post("/decode", content=body, headers=json_type)
        assert cli.status_code == 200 and decoded(cli) == PLAIN.data


async def test_with_a_token_a_wrong_or_non_ascii_header_is_refused_not_a_crash() -> None:
    codec = AesGcmCodec([os.urandom(32)])
    [sealed] = await codec.encode([PLAIN])
    body = {"payloads": [as_json(sealed)]}
    async with running_codec(codec, token=TOKEN) as url, httpx.AsyncClient(base_url=url) as http:
        for value in (
            b"",
            b"Bearer wrong",
            "Bearer tökén".encode(),
            b"Bearer \xff\xfe",
            f"Bearer {TOKEN}é".encode(),
            TOKEN.encode(),
        ):
            headers = {"Authorization": value} if value else {}
            response = await http.post("/decode", json=body, headers=headers)
            assert response.status_code == 401, (value, response.text)
            assert "payroll" not in response.text
        # with a token the server may sit behind any name
        named = {"Authorization": f"Bearer {TOKEN}", "Host": "codec.example.com"}
        response = await http.post("/decode", json=body, headers=named)
        assert response.status_code == 200 and decoded(response) == PLAIN.data


async def test_a_public_bind_needs_a_long_token() -> None:
    codec = AesGcmCodec([os.urandom(32)])
    with pytest.raises(CodecServerRefused, match="LLMMIXER_CODEC_TOKEN"):
        await asyncio.wait_for(serve_codec(codec, host="0.0.0.0", port=0), 5)
    with pytest.raises(TokenError, match="LLMMIXER_CODEC_TOKEN"):
        await asyncio.wait_for(serve_codec(codec, port=0, token="short"), 5)

    key = base64.b64encode(os.urandom(32)).decode()
    base_env = {k: v for k, v in os.environ.items() if k != "LLMMIXER_CODEC_TOKEN"}
    base_env["LLMMIXER_PAYLOAD_KEY"] = key
    for extra_env, args, expected in (
        ({}, ["--host", "0.0.0.0"], "Set LLMMIXER_CODEC_TOKEN"),
        ({"LLMMIXER_CODEC_TOKEN": "short"}, [], "at least 16"),
    ):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "llmmixer.client.cli", "codec-server", "--port", "0", *args],
            env={**base_env, **extra_env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "LLMMIXER_CODEC_TOKEN" in done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "llmmixer.client.cli", "codec-server"],
        ["-m", "llmmixer.workers.storage", "codec-server"],  # the earlier name still works
    ],
)
async def test_the_codec_server_command_decodes_for_the_temporal_cli(command: list[str]) -> None:
    raw_key = os.urandom(32)
    [sealed] = await AesGcmCodec([raw_key]).encode([PLAIN])
    port = free_port()
    env = {
        **os.environ,
        "LLMMIXER_PAYLOAD_KEY": base64.b64encode(raw_key).decode(),
        "LLMMIXER_CODEC_TOKEN": TOKEN,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert json.loads(line) == {"codec_server": f"http://127.0.0.1:{port}", "token": True}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            response = await http.post(
                "/decode",
                json={"payloads": [as_json(sealed)]},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        assert response.status_code == 200, response.text
        assert decoded(response) == PLAIN.data
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert TOKEN not in stderr.decode()
