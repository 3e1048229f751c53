"""The workflow's code is deterministic: a static check of every module it loads.

All of ``llmmixer.core`` and ``llmmixer.workflows`` passes through Temporal's
workflow sandbox (``SANDBOX_PASSTHROUGH_MODULES`` in ``workers/plugin.py``):
it loads once per worker instead of once per run, and so the sandbox no longer
refuses a ``datetime.now()`` or ``os.environ`` in it while a run executes, and
module-level state would be shared by every run of the worker. This check
takes the sandbox's place, before the code ever runs: it reads (ast) each
module the workflow side loads and refuses, naming file, line and what to use
instead,

- an import of a module outside ``ALLOWED_IMPORTS`` (modules that do I/O, read
  clocks or entropy, start threads or processes have their own advice in
  ``DENIED_IMPORTS``);
- a call that reads the clock (``datetime.now``, ``date.today``, ``time.*``),
  the environment (``os.environ``, ``getenv``), a file or the terminal
  (``open``, ``print``, ``input``), or hashes a string with ``hash()``;
- a ``global`` statement, and any write into a module-level name from inside a
  function (``NAME.append(...)``, ``NAME[key] = ...``, ``del NAME[key]``,
  ``NAME.attr = ...``): such state would leak from one run into the next and
  differ between a run and its replay on another worker.

What runs at import (building a table at module level) runs once per worker
and is allowed. The tests below plant each kind of violation in a module and
assert the check names it, file and line.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.worker.workflow_sandbox._importer import Importer
from temporalio.worker.workflow_sandbox._restrictions import RestrictionContext

import llmmixer
from llmmixer.workers.plugin import sandbox_runner

PACKAGE = Path(llmmixer.__file__).parent  # not resolved: the subprocess imports it from here
# The trees the workflow may import from; each passes through the sandbox.
WORKFLOW_TREES = ("llmmixer.core", "llmmixer.workflows")

# Modules the workflow's code may import: pure computation on its inputs, the
# same on every worker and every replay. A name covers its submodules unless a
# longer name in DENIED_IMPORTS says otherwise.
ALLOWED_IMPORTS: dict[str, str] = {
    "__future__": "compiler directives",
    "typing": "types only",
    "typing_extensions": "types only",
    "collections": "containers",
    "abc": "abstract base classes",
    "dataclasses": "value types",
    "enum": "value types",
    "types": "type objects (MappingProxyType, UnionType)",
    "builtins": "exception names (builtins.TimeoutError); open/print/input are refused as calls",
    "re": "pattern matching",
    "json": "serialisation: the same bytes for the same value",
    "hashlib": "content hashes (deterministic, unlike hash() on a str)",
    "struct": "binary parsing of attachments",
    "math": "arithmetic",
    "string": "constants",
    "fnmatch": "name patterns",
    "functools": "caches of pure functions: the same answer for every run",
    "itertools": "iteration",
    "operator": "attribute getters",
    "datetime": "timedelta and the datetime type; now/utcnow/today are refused as calls",
    "asyncio": "gather, wait, Event, Lock: Temporal runs them on its deterministic loop",
    "urllib.parse": "URL parsing only (urllib.request is refused)",
    "importlib": (
        "core/providers.resolve: import_module of a registry entry; the workflow resolves "
        "only provider_options models in llmmixer.core, which pass through (metadata and "
        "resources are refused)"
    ),
    "pydantic": "models that cross the data converter",
    "yaml": "the safe loader (core/documents.py); reading files is the caller's",
    "jsonschema": "validating a tool's parameter schema: pure",
    "temporalio.workflow": "the workflow API: now(), random(), uuid4(), sleep()",
    "temporalio.common": "retry policies, search-attribute keys",
    "temporalio.exceptions": "failure types",
    "temporalio.contrib.workflow_streams": "the run's event stream (a workflow-side API)",
    "llmmixer.core": "pure definitions, checked here",
    "llmmixer.workflows": "the workflow's logic, checked here",
}

_ACTIVITY = "do it in an activity (activities/) and pass the result in"
_SETTINGS = "read settings outside the workflow and pass them in the spec or an activity's result"
DENIED_IMPORTS: dict[str, str] = {
    "os": _SETTINGS,
    "sys": "sys differs between workers; " + _SETTINGS,
    "time": "use workflow.now() for the time and workflow.sleep() to wait",
    "random": "use workflow.random()",
    "uuid": "use workflow.uuid4()",
    "secrets": "use workflow.random() (secrets reads the OS's entropy)",
    "logging": "use workflow.logger (it stays quiet during replay)",
    "socket": _ACTIVITY,
    "ssl": _ACTIVITY,
    "select": _ACTIVITY,
    "selectors": _ACTIVITY,
    "signal": _ACTIVITY,
    "subprocess": "run commands in a command activity",
    "asyncio.subprocess": "run commands in a command activity",
    "multiprocessing": _ACTIVITY,
    "concurrent": "use asyncio (workflow.wait, asyncio.gather) in the workflow",
    "threading": "use asyncio (workflow.wait, asyncio.gather) in the workflow",
    "pathlib": _ACTIVITY,
    "io": _ACTIVITY,
    "shutil": _ACTIVITY,
    "tempfile": _ACTIVITY,
    "glob": _ACTIVITY,
    "sqlite3": _ACTIVITY,
    "urllib": _ACTIVITY,
    "http": _ACTIVITY,
    "requests": _ACTIVITY,
    "httpx": _ACTIVITY,
    "aiohttp": _ACTIVITY,
    "openai": _ACTIVITY,
    "anthropic": _ACTIVITY,
    "google": _ACTIVITY,
    "importlib.metadata": _ACTIVITY,
    "importlib.resources": _ACTIVITY,
    "temporalio.activity": "workflows and activities meet only in llmmixer.core",
    "temporalio.client": "signal or start other workflows with workflow.* APIs",
    "llmmixer.activities": "call it as an activity (workflows/calls.py names each)",
    "llmmixer.runtime": "the runtime is the client's and the worker's, not the run's",
    "llmmixer.client": "the client is never loaded by a run",
    "llmmixer.workers": "the workers are never loaded by a run",
}

# Calls (or any reference to them), by the name they resolve to through the
# module's imports: ``import datetime as d; d.datetime.now`` is datetime.datetime.now.
DENIED_CALLS: dict[str, str] = {
    "datetime.datetime.now": "use workflow.now()",
    "datetime.datetime.utcnow": "use workflow.now()",
    "datetime.datetime.today": "use workflow.now()",
    "datetime.date.today": "use workflow.now().date()",
    "os.getenv": _SETTINGS,
    "builtins.open": _ACTIVITY,
    "builtins.print": "use workflow.logger",
    "builtins.input": "wait for a signal or an update instead",
    "builtins.breakpoint": "remove it",
    "builtins.hash": "use hashlib (hash() of a str changes with each process)",
}
# Every use of these modules' members is refused (their import is too).
DENIED_CALL_MODULES: dict[str, str] = {
    "time": "use workflow.now() for the time and workflow.sleep() to wait",
    "random": "use workflow.random()",
    "uuid": "use workflow.uuid4()",
    "os": _SETTINGS,
}
# Attributes refused even without a call.
DENIED_ATTRIBUTES: dict[str, str] = {
    "os.environ": _SETTINGS,
    "os.environb": _SETTINGS,
}
# Methods that change their receiver in place.
MUTATORS = frozenset(
    {
        "append",
        "extend",
        "insert",
        "remove",
        "pop",
        "popitem",
        "clear",
        "update",
        "setdefault",
        "add",
        "discard",
        "sort",
        "reverse",
        "difference_update",
        "intersection_update",
        "symmetric_difference_update",
        "__setitem__",
        "__delitem__",
        "__setattr__",
    }
)
_SHARED = "module-level state is shared by every run of the worker; keep it on the run's objects"


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _longest(name: str, table: Mapping[str, str]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in table:
            return prefix
    return None


def import_problem(name: str) -> str | None:
    """Why the workflow may not import ``name``, or None when it may."""
    allowed, denied = _longest(name, ALLOWED_IMPORTS), _longest(name, DENIED_IMPORTS)
    if denied is not None and (allowed is None or len(denied) >= len(allowed)):
        return f"import of {name}: {DENIED_IMPORTS[denied]}"
    if allowed is None:
        return (
            f"import of {name}: not a workflow-safe module; add it to ALLOWED_IMPORTS in "
            f"tests/test_determinism.py with why it is deterministic, or {_ACTIVITY}"
        )
    return None


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Starred):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


class _Checker:
    def __init__(self, path: Path, module: str, tree: ast.Module) -> None:
        self.path = path
        self.module = module
        self.tree = tree
        self.found: list[Violation] = []
        # What each name bound by an import stands for: "dt" -> "datetime".
        self.aliases: dict[str, str] = {}
        self.module_names = self._module_level_names()

    def flag(self, node: ast.AST, message: str) -> None:
        self.found.append(Violation(self.path, getattr(node, "lineno", 0), message))

    def _module_level_names(self) -> set[str]:
        names: set[str] = set()
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
                continue
            for child in ast.walk(node):
                if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                    names.add(child.id)
                elif isinstance(child, ast.alias):
                    names.add((child.asname or child.name).split(".")[0])
        return names

    def resolve(self, node: ast.expr) -> str | None:
        dotted = _dotted(node)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        if head in self.aliases:
            base = self.aliases[head]
        elif f"builtins.{head}" in DENIED_CALLS:
            base = f"builtins.{head}"
        else:
            return None  # a local or module-level name of this module's own
        return f"{base}.{rest}" if rest else base

    def run(self) -> list[Violation]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._import(node, alias.name)
                    if alias.asname:
                        self.aliases[alias.asname] = alias.name
                    else:
                        head = alias.name.split(".")[0]
                        self.aliases[head] = head
            elif isinstance(node, ast.ImportFrom):
                base = self._from_base(node)
                for alias in node.names:
                    self._import(node, f"{base}.{alias.name}")
                    self.aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        # The x.y of x.y.z: only the whole reference is judged.
        inner = {
            id(node.value)
            for node in ast.walk(self.tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute | ast.Name)
        }
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Global):
                self.flag(node, f"global {', '.join(node.names)}: {_SHARED}")
            elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load):
                if id(node) not in inner:
                    self._reference(node)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                self._function(node)
        return sorted(set(self.found), key=lambda violation: (violation.line, violation.message))

    def _from_base(self, node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        package = self.module.split(".")
        if not self.path.name == "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        return ".".join([*package, *([node.module] if node.module else [])])

    def _import(self, node: ast.AST, name: str) -> None:
        if name.startswith("__future__."):
            return
        problem = import_problem(name)
        if problem is not None:
            self.flag(node, problem)

    def _reference(self, node: ast.Name | ast.Attribute) -> None:
        # A reference, called or not: ``now = datetime.now`` is as bad as a call.
        name = self.resolve(node)
        if name is None:
            return
        if name in DENIED_CALLS:
            self.flag(node, f"{name}: {DENIED_CALLS[name]}")
        elif name in DENIED_ATTRIBUTES or _longest(name, DENIED_ATTRIBUTES):
            self.flag(
                node, f"{name}: {DENIED_ATTRIBUTES[_longest(name, DENIED_ATTRIBUTES) or name]}"
            )
        elif "." in name and (module := _longest(name.rpartition(".")[0], DENIED_CALL_MODULES)):
            self.flag(node, f"{name}: {DENIED_CALL_MODULES[module]}")

    def _function(self, function: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        arguments = function.args
        local = {
            argument.arg
            for argument in (
                *arguments.posonlyargs,
                *arguments.args,
                *arguments.kwonlyargs,
                *([arguments.vararg] if arguments.vararg else []),
                *([arguments.kwarg] if arguments.kwarg else []),
            )
        }
        body = function.body if isinstance(function.body, list) else [function.body]
        nodes = [child for statement in body for child in ast.walk(statement)]
        local |= {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        shared = self.module_names - local

        def mutated(target: ast.expr) -> str | None:
            if isinstance(target, ast.Subscript | ast.Attribute):
                root = _root(target)
                if root in shared:
                    return root
            return None

        for node in nodes:
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            elif isinstance(node, ast.Delete):
                targets = node.targets
            for target in targets:
                elements = target.elts if isinstance(target, ast.Tuple | ast.List) else [target]
                for element in elements:
                    root = mutated(element)
                    if root is not None:
                        self.flag(node, f"writes into module-level {root!r}: {_SHARED}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in MUTATORS
                and _root(node.func.value) in shared
            ):
                root = _root(node.func.value)
                self.flag(
                    node, f"{root}.{node.func.attr}() changes module-level {root!r}: {_SHARED}"
                )


def check_source(path: Path, module: str, source: str) -> list[Violation]:
    """Every determinism violation in ``source`` (the module ``module`` at ``path``)."""
    return _Checker(path, module, ast.parse(source, filename=str(path))).run()


def workflow_modules() -> dict[str, Path]:
    """Every llmmixer module a worker loads for ``MixerWorkflow``, by name.

    Asked of a fresh interpreter, so the set is what the workflow's imports
    reach (late imports inside functions included when they sit at module
    level of another loaded module), not whatever this test process loaded.
    """
    code = (
        "import json, sys\n"
        "import llmmixer.workflows.mixer\n"
        "print(json.dumps({n: m.__file__ for n, m in sys.modules.items()"
        " if n.startswith('llmmixer') and getattr(m, '__file__', None)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    return {name: Path(file) for name, file in json.loads(out).items()}


def _checked(modules: Mapping[str, Path]) -> dict[str, Path]:
    return {
        n: p
        for n, p in modules.items()
        if any(n == t or n.startswith(t + ".") for t in WORKFLOW_TREES)
    }


@pytest.fixture(scope="module")
def loaded() -> dict[str, Path]:
    return workflow_modules()


def test_the_workflow_code_is_deterministic(loaded: dict[str, Path]) -> None:
    violations: list[Violation] = []
    for name, path in sorted(_checked(loaded).items()):
        violations += check_source(path.relative_to(PACKAGE), name, path.read_text())
    assert not violations, "\n".join(map(str, violations))


def test_every_module_the_workflow_loads_is_checked_and_passed_through(
    loaded: dict[str, Path],
) -> None:
    # The workflow reaches no llmmixer package but the checked trees (besides
    # the package itself), and each module it loads passes through the
    # sandbox: what is checked and what is shared between runs are the same.
    outside = {n for n in loaded if n != "llmmixer"} - set(_checked(loaded))
    assert not outside, f"the workflow loads {sorted(outside)}: it may import only {WORKFLOW_TREES}"
    importer = Importer(sandbox_runner().restrictions, RestrictionContext())
    sandboxed = {n for n in _checked(loaded) if not importer.module_configured_passthrough(n)}
    assert not sandboxed
    assert "llmmixer.workflows.mixer" in loaded and "llmmixer.core.validation" in loaded


def plant(tmp_path: Path, source: str, name: str = "planted.py") -> list[str]:
    path = tmp_path / "workflows" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    module = f"llmmixer.workflows.{name.removesuffix('.py')}"
    return [str(v) for v in check_source(path, module, path.read_text())]


def only(found: list[str]) -> str:
    assert len(found) == 1, found
    return found[0]


def test_a_clock_read_is_refused_with_its_line_and_the_replacement(tmp_path: Path) -> None:
    found = plant(
        tmp_path,
        """\
        from datetime import datetime


        def started() -> datetime:
            return datetime.now()
        """,
    )
    message = only(found)
    assert message.startswith(f"{tmp_path / 'workflows' / 'planted.py'}:5: ")
    assert "datetime.datetime.now:" in message and "workflow.now()" in message


@pytest.mark.parametrize(
    ("source", "line", "expected"),
    [
        pytest.param(
            "import datetime as _clock\n\nLOADED_AT = _clock.datetime.now()\n",
            3,
            "datetime.datetime.now:",
            id="aliased-clock-at-import",
        ),
        pytest.param(
            "from datetime import date\n\n\ndef day():\n    return date.today()\n",
            5,
            "datetime.date.today:",
            id="date-today",
        ),
        pytest.param(
            "import datetime\n\n\ndef f():\n    return datetime.datetime.utcnow()\n",
            5,
            "use workflow.now()",
            id="utcnow",
        ),
        pytest.param(
            "def f(path):\n    return open(path).read()\n", 2, "builtins.open:", id="open"
        ),
        pytest.param("def f(x):\n    print(x)\n", 2, "workflow.logger", id="print"),
        pytest.param("def f():\n    return input()\n", 2, "builtins.input:", id="input"),
        pytest.param("def f(s):\n    return hash(s) % 8\n", 2, "hashlib", id="hash-of-str"),
    ],
)
def test_a_forbidden_call_is_refused(tmp_path: Path, source: str, line: int, expected: str) -> None:
    message = only(plant(tmp_path, source))
    assert f"planted.py:{line}: " in message and expected in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("import os\n", "import of os: read settings", id="os"),
        pytest.param("from os import environ\n", "import of os.environ", id="from-os"),
        pytest.param("import time\n", "workflow.now()", id="time"),
        pytest.param("import random\n", "workflow.random()", id="random"),
        pytest.param("from uuid import uuid4\n", "workflow.uuid4()", id="uuid"),
        pytest.param("import secrets\n", "workflow.random()", id="stdlib-secrets"),
        pytest.param("import subprocess\n", "command activity", id="subprocess"),
        pytest.param("import asyncio.subprocess\n", "command activity", id="asyncio-subprocess"),
        pytest.param("import threading\n", "asyncio", id="threading"),
        pytest.param("from pathlib import Path\n", "activity", id="pathlib"),
        pytest.param("from urllib.request import urlopen\n", "activity", id="urllib-request"),
        pytest.param("import httpx\n", "activity", id="httpx"),
        pytest.param("import logging\n", "workflow.logger", id="logging"),
        pytest.param("from importlib.metadata import version\n", "activity", id="metadata"),
        pytest.param("from llmmixer.activities import llm\n", "as an activity", id="activities"),
        pytest.param("import pickle\n", "not a workflow-safe module", id="not-allow-listed"),
    ],
)
def test_an_io_or_nondeterministic_import_is_refused(
    tmp_path: Path, source: str, expected: str
) -> None:
    message = only(plant(tmp_path, source))
    assert "planted.py:1: " in message and expected in message


def test_a_late_import_inside_a_function_is_refused(tmp_path: Path) -> None:
    message = only(plant(tmp_path, "def f():\n    import os\n\n    return f\n"))
    assert "planted.py:2: import of os" in message


def test_reading_the_environment_is_refused_even_through_an_allowed_name(tmp_path: Path) -> None:
    # A module could get hold of os without importing it by name.
    found = plant(
        tmp_path,
        """\
        import os as _o


        def key():
            return _o.environ["LLMMIXER_PAYLOAD_KEY"], _o.getenv("HOME")
        """,
    )
    assert any(":1: import of os" in f for f in found)
    assert any(":5: os.environ" in f for f in found)
    assert any(":5: os.getenv:" in f for f in found)


def test_module_level_state_written_from_a_function_is_refused(tmp_path: Path) -> None:
    found = plant(
        tmp_path,
        """\
        SEEN: list[str] = []
        COUNTS: dict[str, int] = {}
        NAMES = set()
        TABLE = {"a": 1}  # built at import: once per worker, allowed
        TABLE["b"] = 2


        def remember(step: str) -> None:
            SEEN.append(step)
            COUNTS[step] = COUNTS.get(step, 0) + 1
            NAMES.add(step)
            del TABLE["a"]
            TABLE.setdefault(step, 0)


        class Handler:
            def handle(self, step: str) -> None:
                COUNTS.update({step: 1})


        def local_names_are_fine(step: str) -> list[str]:
            SEEN = []
            SEEN.append(step)
            counts: dict[str, int] = {}
            counts[step] = 1
            return SEEN
        """,
    )
    lines = sorted(int(f.split(":")[1]) for f in found)
    assert lines == [9, 10, 11, 12, 13, 18], found
    assert any(":9: SEEN.append() changes module-level 'SEEN'" in f for f in found)
    assert any(":10: writes into module-level 'COUNTS'" in f for f in found)
    assert all("shared by every run" in f for f in found)


def test_a_global_statement_is_refused(tmp_path: Path) -> None:
    message = only(plant(tmp_path, "RUNS = 0\n\n\ndef count():\n    global RUNS\n    RUNS += 1\n"))
    assert "planted.py:5: global RUNS" in message


def test_allowed_workflow_code_passes(tmp_path: Path) -> None:
    # What the real workflow does: the workflow API's clock, timedelta, hashing.
    assert (
        plant(
            tmp_path,
            """\
            import asyncio
            import hashlib
            from datetime import datetime, timedelta

            from temporalio import workflow

            from .dag import RunState

            TIMEOUT = timedelta(seconds=30)


            async def step(state: RunState) -> datetime:
                await asyncio.sleep(1)
                digest = hashlib.sha256(b"x").hexdigest()
                state.notes.append(digest)
                return workflow.now() + TIMEOUT
            """,
        )
        == []
    )
