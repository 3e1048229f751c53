"""``llmmixer setup``: register llmmixer's search attributes on a namespace.

The embedded server registers them itself. A cluster's namespace gets them
once, through the operator API (the same call as ``temporal operator
search-attribute create``); workers check for them at each run's start and
run without them, with one warning, until they exist.

Temporal Cloud refuses the operator API's ``AddSearchAttributes``: a Cloud
namespace's search attributes are part of its spec, changed through the
Cloud Operations API (``UpdateNamespace``), as ``tcld namespace
search-attributes add`` does. ``setup`` takes a namespace for a Cloud one
when its address is Cloud's (``*.tmprl.cloud``, ``*.api.temporal.io``).
With an API key (``TEMPORAL_CLOUD_API_KEY``, else the ``TEMPORAL_API_KEY``
the connection uses: a user's or service account's key works for both),
it reads the namespace and asks for the missing attributes itself; the
key needs the right to change the namespace (a namespace admin). Without
one (an mTLS connection), it prints the ``tcld`` command that adds them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from temporalio.api.cloud.cloudservice.v1 import (
    GetNamespaceRequest,
    GetNamespaceResponse,
    UpdateNamespaceRequest,
)
from temporalio.api.cloud.namespace.v1 import NamespaceSpec
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client, CloudOperationsClient, WorkflowExecution

from llmmixer.activities.search import INDEXED_TYPES
from llmmixer.core.search import SEARCH_ATTRIBUTES, SPEC, STATE
from llmmixer.workflows.records import RunStatus
from llmmixer.workflows.search import STATE as STATE_KEY

__all__ = [
    "CLOUD_API_VERSION",
    "CloudSetup",
    "SetupResult",
    "add_setup_parser",
    "cloud_setup",
    "cloud_update_request",
    "cmd_setup",
    "is_cloud_address",
    "list_query",
    "register_on_cloud",
    "register_search_attributes",
    "tcld_command",
]

# The Cloud Operations API version of the protos this temporalio release
# carries (its api_cloud_upstream/VERSION); the API wants it in a header.
CLOUD_API_VERSION = "v0.17.0"
_CLOUD_HOSTS = (".tmprl.cloud", ".api.temporal.io")
# core/search.py's type names as the Cloud API spells them.
_CLOUD_TYPES: dict[str, NamespaceSpec.SearchAttributeType.ValueType] = {
    "Keyword": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_KEYWORD,
    "KeywordList": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_KEYWORD_LIST,
    "Double": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_DOUBLE,
    "Int": NamespaceSpec.SEARCH_ATTRIBUTE_TYPE_INT,
}


@dataclass(frozen=True)
class SetupResult:
    added: list[str]
    present: list[str]
    # Names the namespace has with another type: Temporal cannot change a type.
    conflicting: list[str]


async def register_search_attributes(client: Client, namespace: str) -> SetupResult:
    """Add those of llmmixer's attributes ``namespace`` lacks; safe to run again."""
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    have = listed.custom_attributes
    present = [n for n, kind in SEARCH_ATTRIBUTES.items() if have.get(n) == INDEXED_TYPES[kind]]
    conflicting = [n for n in SEARCH_ATTRIBUTES if n in have and n not in present]
    missing = {
        name: INDEXED_TYPES[kind] for name, kind in SEARCH_ATTRIBUTES.items() if name not in have
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
    return SetupResult(added=list(missing), present=present, conflicting=conflicting)


# ---- Temporal Cloud ---------------------------------------------------------------


def is_cloud_address(address: str) -> bool:
    """Whether ``address`` (``host:port``) is a Temporal Cloud endpoint."""
    host = address.strip().rsplit(":", 1)[0].lower().rstrip(".")
    return host.endswith(_CLOUD_HOSTS)


@dataclass(frozen=True)
class CloudSetup:
    """How ``setup`` reaches a Cloud namespace: through the Cloud API, or by a printed command."""

    namespace: str
    # None: no key, so ``setup`` prints the tcld command instead.
    api_key: str | None = field(default=None, repr=False)


def cloud_setup(
    address: str, namespace: str, environ: Mapping[str, str], connection_key: str | None
) -> CloudSetup | None:
    """A Cloud namespace's setup; None for any other server (the operator API applies)."""
    if not is_cloud_address(address):
        return None
    key = environ.get("TEMPORAL_CLOUD_API_KEY") or connection_key or None
    return CloudSetup(namespace=namespace, api_key=key)


def tcld_command(namespace: str, names: list[str]) -> str:
    """The ``tcld`` command that adds ``names`` (llmmixer's) to a Cloud namespace."""
    parts = ["tcld", "namespace", "search-attributes", "add", "--namespace", namespace]
    for name in names:
        parts += ["--search-attribute", f"{name}={SEARCH_ATTRIBUTES[name]}"]
    return shlex.join(parts)


def _cloud_existing(spec: NamespaceSpec) -> dict[str, str]:
    """The namespace's search attributes, by name, with core/search.py's type names."""
    names = {value: name for name, value in _CLOUD_TYPES.items()}
    found = {key: names.get(kind, f"type {kind}") for key, kind in spec.search_attributes.items()}
    # Namespaces read through an older API version list them here, by type name.
    for key, kind in spec.custom_search_attributes.items():
        found.setdefault(key, kind)
    return found


def cloud_update_request(
    current: GetNamespaceResponse,
) -> tuple[UpdateNamespaceRequest | None, SetupResult]:
    """The ``UpdateNamespace`` that adds llmmixer's missing attributes to ``current``.

    The rest of the namespace's spec is sent back unchanged, with the
    resource version read, so a change made meanwhile is refused rather
    than overwritten. None when nothing is missing.
    """
    namespace = current.namespace
    have = _cloud_existing(namespace.spec)
    present = [n for n, kind in SEARCH_ATTRIBUTES.items() if have.get(n) == kind]
    conflicting = [n for n in SEARCH_ATTRIBUTES if n in have and n not in present]
    missing = [n for n in SEARCH_ATTRIBUTES if n not in have]
    result = SetupResult(added=missing, present=present, conflicting=conflicting)
    if not missing:
        return None, result
    spec = NamespaceSpec()
    spec.CopyFrom(namespace.spec)
    for name in missing:
        spec.search_attributes[name] = _CLOUD_TYPES[SEARCH_ATTRIBUTES[name]]
    request = UpdateNamespaceRequest(
        namespace=namespace.namespace,
        spec=spec,
        resource_version=namespace.resource_version,
    )
    return request, result


async def register_on_cloud(cloud: CloudOperationsClient, namespace: str) -> SetupResult:
    """Add llmmixer's missing attributes to a Cloud namespace (Cloud Operations API)."""
    current = await cloud.cloud_service.get_namespace(GetNamespaceRequest(namespace=namespace))
    request, result = cloud_update_request(current)
    if request is not None:
        await cloud.cloud_service.update_namespace(request)
    return result


OPEN = 'ExecutionStatus="Running"'


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def list_query(state: str | None = None, spec: str | None = None) -> str:
    """The visibility query ``llmmixer list`` sends: llmmixer runs, filtered."""
    if state is not None and state not in {s.value for s in RunStatus}:
        raise ValueError(f"--state {state!r}: use one of {', '.join(s.value for s in RunStatus)}")
    clauses = ['WorkflowType="MixerWorkflow"']
    if state is not None:
        clauses.append(f"{STATE}={_quoted(state)}")
    if spec is not None:
        clauses.append(f"{SPEC}={_quoted(spec)}")
    if state in (RunStatus.RUNNING, RunStatus.WAITING):
        # A run that continued as new keeps the attributes it had when it
        # handed over (often `waiting`): only the open execution is the run.
        clauses.append(OPEN)
    return " AND ".join(clauses)


def add_setup_parser(sub: Any) -> None:
    sub.add_parser(
        "setup",
        help=(
            "register llmmixer's search attributes on TEMPORAL_NAMESPACE "
            "(operator API; Cloud API on Temporal Cloud)"
        ),
    )


async def cmd_setup(args: argparse.Namespace) -> int:
    from llmmixer.runtime.connection import Connection

    connection = Connection.from_env()
    key = connection.connect_kwargs.get("api_key")
    cloud = cloud_setup(
        connection.address, connection.namespace, os.environ, key if isinstance(key, str) else None
    )
    if cloud is not None:
        return await _cmd_setup_cloud(cloud)
    client = await connection.connect()
    result = await register_search_attributes(client, connection.namespace)
    return _report(result, connection.namespace, cloud=False)


async def _cmd_setup_cloud(cloud: CloudSetup) -> int:
    if cloud.api_key is None:
        print(
            f"namespace {cloud.namespace} is on Temporal Cloud, which takes search attributes "
            "through its Cloud API, and no API key is set (TEMPORAL_CLOUD_API_KEY or "
            "TEMPORAL_API_KEY). Add them with tcld (after `tcld login`):",
            file=sys.stderr,
        )
        print(tcld_command(cloud.namespace, list(SEARCH_ATTRIBUTES)))
        print(
            "tcld refuses a name that already exists: that one is there already. "
            "Then check with `llmmixer setup` again or `temporal operator search-attribute list`.",
            file=sys.stderr,
        )
        return 1
    client = await CloudOperationsClient.connect(api_key=cloud.api_key, version=CLOUD_API_VERSION)
    result = await register_on_cloud(client, cloud.namespace)
    return _report(result, cloud.namespace, cloud=True)


def _report(result: SetupResult, namespace: str, *, cloud: bool) -> int:
    for name in result.added:
        # Cloud applies a namespace change as an asynchronous operation.
        print(f"{'asked for' if cloud else 'added'} {name} ({SEARCH_ATTRIBUTES[name]})")
    for name in result.present:
        print(f"already there: {name}")
    remedy = (
        "Temporal Cloud cannot remove one: rename it (`tcld namespace search-attributes "
        "rename --existing-name {name} --new-name ...`)"
        if cloud
        else "remove it (`temporal operator search-attribute remove --name {name}`)"
    )
    for name in result.conflicting:
        print(
            f"{name} exists on {namespace} with another type than "
            f"{SEARCH_ATTRIBUTES[name]}: runs leave it unset; "
            + remedy.format(name=name)
            + " and run setup again",
            file=sys.stderr,
        )
    query = f'{STATE}="waiting" AND {OPEN}'
    print(f"namespace {namespace}: try `temporal workflow list --query '{query}'`")
    return 1 if result.conflicting else 0


def shown_status(execution: WorkflowExecution) -> str:
    """``waiting`` for an open run that waits for a person, else Temporal's status."""
    status = execution.status.name.lower() if execution.status else "unknown"
    state = execution.typed_search_attributes.get(STATE_KEY)
    return state if status == "running" and state else status
