"""Files reach each provider whole, in its own wire shape, through its real SDK.

The fake server decodes every file part of each API (Anthropic image and
document blocks, Chat Completions image_url/file parts, Responses
input_image/input_file, Gemini inline data and Files API uploads) and the
tests compare the bytes it received with the ones sent.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

import pytest
from fakes.provider_fixtures import FakeProviderServer, llm_call

from llmmixer.activities.providers.base import ProviderConfig
from llmmixer.activities.providers.gemini import GeminiAdapter
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.core.attachments import describe_file
from llmmixer.core.contracts import Attachment, ChatMessage, LlmCall

FIVE_MB = 5 * 1024 * 1024
MODELS = {"anthropic": "claude-sonnet-5-5", "openai": "gpt-4.1-mini", "gemini": "gemini-2.5-flash"}


def png(size: int) -> bytes:
    """A real PNG (one random-pixel IDAT) padded with a tEXt chunk to exactly ``size`` bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    pixels = zlib.compress(b"".join(b"\x00" + os.urandom(24) for _ in range(8)))
    tail = chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    pad = size - len(head) - len(tail) - 12
    assert pad >= 0
    return head + chunk(b"tEXt", b"c\x00" + os.urandom(max(0, pad - 2))[: pad - 2]) + tail


def pdf() -> bytes:
    return b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def attached(name: str, data: bytes) -> Attachment:
    return describe_file(name, data).loaded(data)


def call_with(
    provider: str, *files: Attachment, prompt: str = "describe it", **kw: object
) -> LlmCall:
    call = llm_call(provider, MODELS[provider], prompt, **kw)
    return call.model_copy(
        update={"messages": [ChatMessage(role="user", content=prompt, attachments=list(files))]}
    )


@pytest.mark.parametrize(
    ("provider", "api", "image_part", "pdf_part"),
    [
        ("anthropic", "chat", "image", "document"),
        ("openai", "chat", "image_url", "file"),
        ("openai", "responses", "input_image", "input_file"),
        ("gemini", "chat", "inline_data", "inline_data"),
    ],
)
async def test_a_five_megabyte_image_and_a_pdf_arrive_whole_in_the_native_shape(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
    image_part: str,
    pdf_part: str,
) -> None:
    image = png(FIVE_MB)
    document = pdf()
    adapter = provider_pool.get(provider_settings.config_for(provider, timeout_s=30.0))
    call = call_with(provider, attached("arch.png", image), attached("spec.pdf", document), api=api)
    result = await adapter.complete(call, lambda _: None)

    [recorded] = provider_server.calls
    received = {f.media_type: f for f in recorded.files}
    assert set(received) == {"image/png", "application/pdf"}
    assert received["image/png"].data == image and received["image/png"].part == image_part
    assert received["application/pdf"].data == document
    assert received["application/pdf"].part == pdf_part
    # The prompt still arrives as text, after the files.
    assert "describe it" in result.text
    assert f"sha256:{hashlib.sha256(image).hexdigest()}" in result.text


@pytest.mark.parametrize("provider", ["anthropic", "openai", "gemini"])
async def test_a_text_file_goes_in_as_text(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
) -> None:
    adapter = provider_pool.get(provider_settings.config_for(provider, timeout_s=10.0))
    notes = attached("notes.txt", b"the build breaks on Tuesdays")
    await adapter.complete(call_with(provider, notes), lambda _: None)
    [recorded] = provider_server.calls
    if provider == "gemini":
        # Gemini takes text files as inline data like any other file.
        assert [(f.media_type, f.data) for f in recorded.files] == [
            ("text/plain", b"the build breaks on Tuesdays")
        ]
    else:
        assert "the build breaks on Tuesdays" in str(recorded.body)


async def test_gemini_uploads_files_past_its_inline_limit_through_the_files_api(
    provider_server: FakeProviderServer, provider_settings: ProviderSettings
) -> None:
    small, large = png(2048), png(FIVE_MB)
    config = provider_settings.config_for("gemini", timeout_s=30.0)
    adapter = GeminiAdapter(config, inline_limit=64 * 1024)
    try:
        result = await adapter.complete(
            call_with("gemini", attached("small.png", small), attached("large.png", large)),
            lambda _: None,
        )
    finally:
        await adapter.aclose()
    [upload] = provider_server.uploads
    assert upload.data == large and upload.media_type == "image/png"
    assert upload.name == "large.png"
    [recorded] = provider_server.calls
    parts = [(f.part, f.data) for f in recorded.files]
    # The small file stays inline; the large one is sent by its URI, not its bytes.
    assert parts == [("inline_data", small), ("file_data", large)]
    assert len(recorded.body.__repr__()) < 1024 * 1024
    assert hashlib.sha256(large).hexdigest() in result.text
    # The upload started at the configured endpoint, with the worker's key.
    uploads = [r for r in provider_server.requests if r.target.startswith("/upload/")]
    assert uploads[0].headers["x-goog-upload-command"] == "start"
    assert uploads[0].carries(config.api_key or "")


def test_gemini_keyless_config_never_sends_the_key_to_the_upload_url() -> None:
    # A step's own endpoint: the adapter is built without the worker's key.
    adapter = GeminiAdapter(
        ProviderConfig(provider="gemini", base_url="http://127.0.0.1:9", keyless=True)
    )
    assert adapter._client._api_client.api_key == "not-needed"
