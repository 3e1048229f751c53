"""Which package may import which: client -> runtime, workflows <- workers -> activities.

Every package may import ``core``.

The client talks to Temporal through ``runtime`` (connection, converter,
storage, telemetry) and imports worker code only where it runs a worker in its
own process: the embedded ``llmmixer run`` (``client/local.py``) and the
``dev``/``worker`` commands. Workflows, activities and the runtime never import
the client or the workers, so a worker image needs no web stack and the shared
layer cannot grow a dependency on either side. Workflows and activities meet
only in ``core`` (contracts, spec, rules), which imports no other package of
llmmixer: the workflow sandbox can pass its models through and ``validate``
runs it without an SDK. Read from the source (ast), so a
late import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pytest
from temporalio.client import Client

from llmmixer.client.cli import build_parser
from llmmixer.client.mixer import INTERVENTIONS, InterventionIncomplete, MixerClient
from llmmixer.workflows.records import InterventionType

ROOT = Path(__file__).resolve().parent.parent
MODULE_LEVEL = "<module>"


@dataclass(frozen=True)
class Import:
    path: str  # relative to the package root, e.g. "client/cli.py"
    scope: str  # the top-level function or class holding it, or MODULE_LEVEL
    module: str  # the absolute module imported, e.g. "llmmixer.workers.worker"


# Where a client module may import llmmixer.workers, and why. Keep it short:
# each entry is a place that runs a worker or the embedded server in-process.
CLIENT_MAY_IMPORT_WORKERS: dict[tuple[str, str, str], str] = {
    ("client/local.py", MODULE_LEVEL, "llmmixer.workers.devserver"): "`run` starts the server",
    ("client/local.py", MODULE_LEVEL, "llmmixer.workers.worker"): "`run` starts a worker",
    ("client/cli.py", "cmd_dev", "llmmixer.workers.devserver"): "`dev` starts the server",
    ("client/cli.py", "cmd_dev", "llmmixer.workers.worker"): "`dev` starts a worker",
    ("client/cli.py", "cmd_worker", "llmmixer.workers.worker"): "`worker` runs one",
    ("client/cli.py", "cmd_worker", "llmmixer.workers.health"): "the worker's probes",
    ("client/cli.py", "_health_server", "llmmixer.workers.health"): "the worker's probes",
    ("client/doctor.py", MODULE_LEVEL, "llmmixer.workers.devserver"): (
        "reports whether `run`/`dev` can start the embedded server"
    ),
}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_in(node: ast.AST, path: str, scope: str) -> list[Import]:
    found: list[Import] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            # Annotations only: nothing is imported when the program runs.
            found.extend(_imports_in(ast.Module(body=child.orelse, type_ignores=[]), path, scope))
            continue
        inner = scope
        if scope == MODULE_LEVEL and isinstance(
            child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
        ):
            inner = child.name
        if isinstance(child, ast.Import):
            found.extend(Import(path, scope, alias.name) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                package = ".".join(["llmmixer", *Path(path).parent.parts])
                for _ in range(child.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{child.module}" if child.module else package
            else:
                base = child.module or ""
            found.append(Import(path, scope, base))
            # `from llmmixer import workers` imports the package itself.
            found.extend(Import(path, scope, f"{base}.{alias.name}") for alias in child.names)
        found.extend(_imports_in(child, path, inner))
    return found


def imports_of(package: str) -> list[Import]:
    found: list[Import] = []
    for file in sorted((ROOT / package).rglob("*.py")):
        path = file.relative_to(ROOT).as_posix()
        found.extend(_imports_in(ast.parse(file.read_text(), path), path, MODULE_LEVEL))
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _owner(module: str) -> str:
    """The module or package an import names: ``llmmixer.workers.health.HealthServer``
    -> ``llmmixer.workers.health``."""
    parts = module.split(".")[1:]
    while parts:
        here = ROOT.joinpath(*parts)
        if here.with_suffix(".py").exists() or (here / "__init__.py").exists():
            return ".".join(["llmmixer", *parts])
        parts.pop()
    return module


def test_the_client_imports_worker_code_only_where_it_runs_a_worker() -> None:
    used: set[tuple[str, str, str]] = set()
    offending: set[str] = set()
    for found in imports_of("client"):
        if not _within(found.module, "llmmixer.workers"):
            continue
        key = (found.path, found.scope, _owner(found.module))
        if key in CLIENT_MAY_IMPORT_WORKERS:
            used.add(key)
        else:
            offending.add(f"{found.path} ({found.scope}) imports {key[2]}")
    assert not offending, (
        "client code must reach Temporal through llmmixer.runtime; move what it needs there, "
        "or add the in-process worker to CLIENT_MAY_IMPORT_WORKERS:\n"
        + "\n".join(sorted(offending))
    )
    stale = sorted(set(CLIENT_MAY_IMPORT_WORKERS) - used)
    assert not stale, f"allowed imports that no longer exist, remove them: {stale}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        (
            "core",
            (
                "llmmixer.client",
                "llmmixer.workers",
                "llmmixer.workflows",
                "llmmixer.activities",
                "llmmixer.runtime",
            ),
        ),
        ("workflows", ("llmmixer.client", "llmmixer.workers", "llmmixer.activities")),
        ("activities", ("llmmixer.client", "llmmixer.workers", "llmmixer.workflows")),
        ("runtime", ("llmmixer.client", "llmmixer.workers", "llmmixer.activities")),
        ("workers", ("llmmixer.client",)),
    ],
)
def test_lower_layers_never_import_the_client_or_the_workers(
    package: str, forbidden: tuple[str, ...]
) -> None:
    offending = [
        f"{found.path} ({found.scope}) imports {found.module}"
        for found in imports_of(package)
        if any(_within(found.module, name) for name in forbidden)
    ]
    assert not offending, f"{package}/ must not import {', '.join(forbidden)}:\n" + "\n".join(
        offending
    )


def test_the_scanner_sees_late_relative_and_package_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from llmmixer.workers.health import ReadinessState\n"
        "def f():\n    from llmmixer import workers\n"
        "async def g():\n    from ..workers import worker\n"
        "import llmmixer.workers.devserver\n"
    )
    found = {
        (i.scope, i.module)
        for i in _imports_in(ast.parse(source), "client/x.py", MODULE_LEVEL)
        if _within(i.module, "llmmixer.workers")
    }
    assert found == {
        ("f", "llmmixer.workers"),
        ("g", "llmmixer.workers"),
        ("g", "llmmixer.workers.worker"),
        (MODULE_LEVEL, "llmmixer.workers.devserver"),
    }


# ---- one table of interventions ----------------------------------------------------


def test_every_intervention_is_in_the_one_table() -> None:
    assert set(INTERVENTIONS) == set(get_args(InterventionType))


@pytest.mark.parametrize("action", sorted(INTERVENTIONS))
def test_the_cli_offers_each_intervention_with_its_field(action: str) -> None:
    kind = INTERVENTIONS[action]  # type: ignore[index]
    parser = build_parser()
    args = parser.parse_args([action, "run-1", "step-a", f"--{kind.field}", "text"])
    assert (args.id, args.step, getattr(args, kind.field)) == ("run-1", "step-a", "text")
    if kind.required:
        with pytest.raises(SystemExit):
            parser.parse_args([action, "run-1", "step-a"])
    else:
        assert getattr(parser.parse_args([action, "run-1", "step-a"]), kind.field) is None


async def test_an_override_without_output_is_refused_before_anything_is_sent(
    client: Client,
) -> None:
    # No such run: had the update been sent, the server would answer "not found".
    handle = MixerClient(client, "layering").get_handle("no-such-run")
    with pytest.raises(InterventionIncomplete, match="override needs output"):
        await handle.intervene("override", "step-a", None)
