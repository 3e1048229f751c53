"""The rule `serve` and the codec server share, as pure functions (the HTTP tests are in
test_serve_security.py and test_codec_server.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmmixer.runtime.http_guard import (
    GuardPolicy,
    TokenError,
    bearer_matches,
    check_request,
    check_token,
    host_is_loopback,
)

TOKEN = "a-long-enough-token-0123"
OPEN = GuardPolicy(token_variable="LLMMIXER_API_TOKEN", token_set=False)


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8765", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:80", "[::1]", "[::1]:9"],
)
def test_loopback_host_names(host: str) -> None:
    assert host_is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "evil.example",
        "evil.example:8765",
        "127.0.0.1.nip.io:8765",  # resolves to 127.0.0.1: exactly the rebinding trick
        "localhost.evil.example",
        "::1",  # an IPv6 literal must be bracketed in Host
        "[::1",
        "[::1]x",
        "[127.0.0.1]",
        "127.0.0.1:80x",
        "10.0.0.1:8765",
    ],
)
def test_other_host_names(host: str | None) -> None:
    assert not host_is_loopback(host)


def test_bearer_compare() -> None:
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN)
    assert bearer_matches(f"bearer  {TOKEN} ", TOKEN)
    for wrong in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer tökén"):
        assert not bearer_matches(wrong, TOKEN)
    unicode_token = "ünïcode-token-0123456789"
    # a client sends the UTF-8 bytes; the server sees them decoded as latin-1
    sent = f"Bearer {unicode_token}".encode().decode("latin-1")
    assert bearer_matches(sent, unicode_token)


@given(st.text(), st.text(min_size=1))
def test_bearer_compare_never_raises(header: str, token: str) -> None:
    assert bearer_matches(header, token) in (True, False)


def test_token_length() -> None:
    assert check_token("X_TOKEN", None) is None
    assert check_token("X_TOKEN", "") is None
    assert check_token("X_TOKEN", TOKEN) == TOKEN
    with pytest.raises(TokenError, match="X_TOKEN is 5 characters long; it must be at least 16"):
        check_token("X_TOKEN", "short")


def _headers(**values: str) -> dict[str, str]:
    return {"host": "127.0.0.1:8765", **{k.replace("_", "-"): v for k, v in values.items()}}


def test_reads_pass_and_writes_need_json_from_no_other_origin() -> None:
    assert check_request("GET", _headers(origin="https://evil.example"), OPEN) is None
    assert check_request("POST", _headers(content_type="application/json"), OPEN) is None
    same = _headers(
        content_type="application/json; charset=utf-8",
        origin="http://127.0.0.1:8765",
        sec_fetch_site="same-origin",
    )
    assert check_request("POST", same, OPEN) is None
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for headers in (
            _headers(content_type="application/json", origin="https://evil.example"),
            _headers(content_type="application/json", origin="http://127.0.0.1:9999"),
            _headers(content_type="application/json", origin="null"),
            _headers(content_type="application/json", sec_fetch_site="cross-site"),
            _headers(content_type="application/json", sec_fetch_site="same-site"),
        ):
            refusal = check_request(method, headers, OPEN)
            assert refusal is not None and refusal.status == 403, (method, headers)
        for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
            refusal = check_request(method, _headers(content_type=content_type), OPEN)
            assert refusal is not None and refusal.status == 415


def test_an_allowed_origin_may_post_from_another_site() -> None:
    codec = GuardPolicy(
        token_variable="LLMMIXER_CODEC_TOKEN",
        token_set=False,
        allowed_origins=frozenset({"http://localhost:8233"}),
    )
    web_ui = _headers(
        content_type="application/json", origin="http://localhost:8233", sec_fetch_site="same-site"
    )
    assert check_request("POST", web_ui, codec) is None
    assert check_request("POST", web_ui, OPEN) is not None


def test_the_host_check_applies_without_a_token_only() -> None:
    rebound = {"host": "evil.example:8765"}
    refusal = check_request("GET", rebound, OPEN)
    assert refusal is not None and refusal.status == 403
    assert "LLMMIXER_API_TOKEN" in refusal.message
    with_token = GuardPolicy(token_variable="LLMMIXER_API_TOKEN", token_set=True)
    assert check_request("GET", rebound, with_token) is None
    # ... while the origin checks stay
    cross = {**rebound, "content-type": "application/json", "origin": "https://evil.example"}
    assert check_request("POST", cross, with_token) is not None
