"""``llmmixer setup``: register llmmixer's search attributes on a namespace.

The embedded server registers them itself. A cluster's namespace gets them
once, through the operator API (the same call as ``temporal operator
search-attribute create``); workers check for them at each run's start and
run without them, with one warning, until they exist.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client, WorkflowExecution

from llmmixer.activities.search import INDEXED_TYPES
from llmmixer.core.search import SEARCH_ATTRIBUTES, SPEC, STATE
from llmmixer.workflows.records import RunStatus
from llmmixer.workflows.search import STATE as STATE_KEY

__all__ = [
    "SetupResult",
    "add_setup_parser",
    "cmd_setup",
    "list_query",
    "register_search_attributes",
]


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
    return " AND ".join(clauses)


def add_setup_parser(sub: Any) -> None:
    sub.add_parser(
        "setup",
        help="register llmmixer's search attributes on TEMPORAL_NAMESPACE (operator API)",
    )


async def cmd_setup(args: argparse.Namespace) -> int:
    from llmmixer.runtime.connection import Connection

    connection = Connection.from_env()
    client = await connection.connect()
    result = await register_search_attributes(client, connection.namespace)
    for name in result.added:
        print(f"added {name} ({SEARCH_ATTRIBUTES[name]})")
    for name in result.present:
        print(f"already there: {name}")
    for name in result.conflicting:
        print(
            f"{name} exists on {connection.namespace} with another type than "
            f"{SEARCH_ATTRIBUTES[name]}: runs leave it unset; remove it "
            f"(`temporal operator search-attribute remove --name {name}`) and run setup again",
            file=sys.stderr,
        )
    query = f'{STATE}="waiting"'
    print(f"namespace {connection.namespace}: try `temporal workflow list --query '{query}'`")
    return 1 if result.conflicting else 0


def shown_status(execution: WorkflowExecution) -> str:
    """``waiting`` for an open run that waits for a person, else Temporal's status."""
    status = execution.status.name.lower() if execution.status else "unknown"
    state = execution.typed_search_attributes.get(STATE_KEY)
    return state if status == "running" and state else status
