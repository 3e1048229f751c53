"""``llmmixer setup`` on Temporal Cloud: the Cloud API's request, or the tcld command.

Offline: no Cloud account is reachable from tests, so what is checked is the
decision (Cloud or not, key or not), the exact command printed, and the
``UpdateNamespace`` request built from a namespace as Cloud describes it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from temporalio.api.cloud.cloudservice.v1 import GetNamespaceResponse
from temporalio.api.cloud.namespace.v1 import Namespace, NamespaceSpec

from llmmixer.client.cli import main
from llmmixer.client.setup import (
    CloudSetup,
    cloud_setup,
    cloud_update_request,
    is_cloud_address,
    tcld_command,
)
from llmmixer.core.search import SEARCH_ATTRIBUTES


def test_cloud_is_told_by_its_address() -> None:
    assert is_cloud_address("reviews.a1b2c.tmprl.cloud:7233")
    assert is_cloud_address("us-east-1.aws.api.temporal.io:7233")
    assert not is_cloud_address("localhost:7233")
    assert not is_cloud_address("temporal.internal.example.com:7233")
    # A look-alike host is not Cloud.
    assert not is_cloud_address("tmprl.cloud.attacker.example:7233")


def test_a_cloud_namespace_uses_a_cloud_key_else_the_connections_else_none() -> None:
    address, namespace = "reviews.a1b2c.tmprl.cloud:7233", "reviews.a1b2c"
    assert cloud_setup("localhost:7233", "default", {}, "key") is None
    assert cloud_setup(address, namespace, {}, None) == CloudSetup(namespace, None)
    assert cloud_setup(address, namespace, {}, "data") == CloudSetup(namespace, "data")
    chosen = cloud_setup(address, namespace, {"TEMPORAL_CLOUD_API_KEY": "ops"}, "data")
    assert chosen == CloudSetup(namespace, "ops")
    assert "ops" not in repr(chosen)  # a key is never printed


def test_the_tcld_command_adds_every_attribute_with_its_type() -> None:
    command = tcld_command("reviews.a1b2c", list(SEARCH_ATTRIBUTES))
    parts = shlex.split(command)
    assert parts[:6] == [
        "tcld",
        "namespace",
        "search-attributes",
        "add",
        "--namespace",
        "reviews.a1b2c",
    ]
    pairs = [parts[i + 1] for i, part in enumerate(parts) if part == "--search-attribute"]
    assert pairs == [f"{name}={kind}" for name, kind in SEARCH_ATTRIBUTES.items()]
    assert "LlmmixerWaitingSteps=KeywordList" in pairs


def _namespace(**search_attributes: NamespaceSpec.SearchAttributeType.ValueType) -> Namespace:
    namespace = Namespace(namespace="reviews.a1b2c", resource_version="rv-7")
    namespace.spec.name = "reviews"
    namespace.spec.retention_days = 30
    for name, kind in search_attributes.items():
        namespace.spec.search_attributes[name] = kind
    return namespace


def test_the_update_adds_only_whats_missing_and_keeps_the_rest_of_the_namespace() -> None:
    current = GetNamespaceResponse(
        namespace=_namespace(
            CustomerId=NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_INT,
            LlmmixerSpec=NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_KEYWORD,
            LlmmixerState=NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_TEXT,  # another type
        )
    )
    request, result = cloud_update_request(current)

    assert request is not None
    assert request.namespace == "reviews.a1b2c"
    # Sent with the version read: a change made meanwhile is refused, not overwritten.
    assert request.resource_version == "rv-7"
    assert request.spec.retention_days == 30 and request.spec.name == "reviews"
    wanted = {
        "Keyword": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_KEYWORD,
        "KeywordList": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_KEYWORD_LIST,
        "Double": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_DOUBLE,
        "Int": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_INT,
    }
    sent = dict(request.spec.search_attributes)
    assert sent["CustomerId"] == NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_INT
    assert sent["LlmmixerState"] == NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_TEXT  # left as it is
    for name, kind in SEARCH_ATTRIBUTES.items():
        if name not in ("LlmmixerSpec", "LlmmixerState"):
            assert sent[name] == wanted[kind], name
    assert result.present == ["LlmmixerSpec"]
    assert result.conflicting == ["LlmmixerState"]
    assert set(result.added) == set(SEARCH_ATTRIBUTES) - {"LlmmixerSpec", "LlmmixerState"}


def test_nothing_is_sent_when_the_namespace_has_them_all() -> None:
    types = {
        "Keyword": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_KEYWORD,
        "KeywordList": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_KEYWORD_LIST,
        "Double": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_DOUBLE,
        "Int": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_INT,
    }
    current = GetNamespaceResponse(
        namespace=_namespace(**{n: types[k] for n, k in SEARCH_ATTRIBUTES.items()})
    )
    request, result = cloud_update_request(current)
    assert request is None
    assert result.added == [] and sorted(result.present) == sorted(SEARCH_ATTRIBUTES)


def test_setup_without_a_key_prints_the_tcld_command_and_connects_nowhere(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in ("TEMPORAL_API_KEY", "TEMPORAL_CLOUD_API_KEY", "TEMPORAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "none.toml"))
    # An address nothing answers on: a connection attempt would fail the command.
    monkeypatch.setenv("TEMPORAL_ADDRESS", "reviews.a1b2c.tmprl.cloud.invalid.tmprl.cloud:7233")
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "reviews.a1b2c")

    code = main(["setup"])

    out, err = capsys.readouterr()
    assert code == 1
    assert out.strip() == tcld_command("reviews.a1b2c", list(SEARCH_ATTRIBUTES))
    assert "Temporal Cloud" in err and "TEMPORAL_CLOUD_API_KEY" in err
