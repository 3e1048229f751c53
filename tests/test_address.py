"""Address parsing, loopback classification, port probing, and the state directory."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from llmmixer.runtime.address import (
    AddressError,
    format_address,
    free_port,
    is_listening,
    is_loopback,
    parse_address,
)
from llmmixer.runtime.home import HomeDirectoryError, default_home, llmmixer_home


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:7233", ("localhost", 7233)),
        ("127.0.0.1:7233", ("127.0.0.1", 7233)),
        ("[::1]:7233", ("::1", 7233)),
        ("  temporal.example.com:443 ", ("temporal.example.com", 443)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("localhost", "port is missing"),
        ("::1:7233", "brackets"),
        ("[::1]7233", "[ipv6-host]:port"),
        (":7233", "host is missing"),
        ("localhost:0", "1 to 65535"),
        ("localhost:70000", "1 to 65535"),
        ("localhost:http", "1 to 65535"),
        ("http://localhost:7233", "host:port"),
        ("", "host:port"),
    ],
)
def test_parse_address_errors_say_the_fix(text: str, hint: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_address(text)
    message = str(caught.value)
    assert hint in message
    assert "127.0.0.1:7233" in message
    assert "\n" not in message


@pytest.mark.parametrize(("host", "port"), [("127.0.0.1", 7233), ("::1", 7233), ("x.y", 1)])
def test_format_address_round_trips(host: str, port: int) -> None:
    assert parse_address(format_address(host, port)) == (host, port)
    assert format_address("[::1]", 5) == "[::1]:5"


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST",
        "localhost.",
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "[::1]",
        "::ffff:127.0.0.1",
    ],
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0",
        "10.0.0.1",
        "::",
        "[2001:db8::1]",
        "temporal.example.com",
        "localhost.evil.com",
        "",
    ],
)
def test_non_loopback_hosts(host: str) -> None:
    # Names are never resolved: only the text decides (a hosts-file entry
    # must not turn a remote server into a local fallback).
    assert not is_loopback(host)


async def test_is_listening_and_free_port() -> None:
    port = free_port("127.0.0.1")
    assert 0 < port < 65536
    assert not await is_listening("127.0.0.1", port, 0.5)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert await is_listening("127.0.0.1", port, 0.5)
    assert not await is_listening("127.0.0.1", port, 0.5)


def test_home_from_env_is_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    home = llmmixer_home({"LLMMIXER_HOME": str(target)})
    assert home == target.resolve()
    assert home.is_dir()
    assert home.stat().st_mode & 0o777 == 0o700


def test_home_defaults_per_platform(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert default_home(env, "linux") == tmp_path / ".local" / "share" / "llmmixer"
    xdg = {**env, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    assert default_home(xdg, "linux") == tmp_path / "xdg" / "llmmixer"
    relative = {**env, "XDG_DATA_HOME": "relative/dir"}  # invalid per XDG: ignored
    assert default_home(relative, "linux") == tmp_path / ".local" / "share" / "llmmixer"
    mac = tmp_path / "Library" / "Application Support" / "llmmixer"
    assert default_home(env, "darwin") == mac
    assert llmmixer_home(xdg, platform="linux") == (tmp_path / "xdg" / "llmmixer").resolve()


def test_home_that_cannot_be_created_says_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(HomeDirectoryError, match="set LLMMIXER_HOME to a writable directory"):
        llmmixer_home({"LLMMIXER_HOME": str(blocker / "home")})
