"""The docs that ship with the project say what the code does, and only point inside it.

Each test fails when the code grows a name (a command, an option, an HTTP
path, a setting, an event) that the pages do not document, or when a page
links to a file that does not exist.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from llmmixer.client.cli import build_parser
from llmmixer.client.docs import (
    GENERATED_MARKER,
    cli_markdown,
    openapi_document,
    settings_markdown,
    spec_reference_markdown,
)
from llmmixer.core.contracts import EventType
from llmmixer.core.providers import provider_names
from llmmixer.runtime.settings import declared_settings

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
REGENERATE = "regenerate with `python -m llmmixer.client.docs write docs`"


def page(name: str) -> str:
    return (DOCS / name).read_text()


def source_files(*suffixes: str) -> list[Path]:
    # build/ and dist/ hold copies a `pip install .` leaves behind.
    skip = {".git", ".venv", "build", "dist", "node_modules", "__pycache__", ".mypy_cache"}
    skip |= {".ruff_cache", ".pytest_cache"}
    return [
        path
        for path in REPO.rglob("*")
        if path.suffix in suffixes and path.is_file() and not skip & set(path.parts)
    ]


def test_cli_md_documents_every_command_and_option() -> None:
    text = page("cli.md")
    for action in build_parser()._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, command in action.choices.items():
            assert f"## llmmixer {name}\n" in text, f"cli.md lacks `{name}`: {REGENERATE}"
            for option in command._actions:
                if isinstance(option, argparse._HelpAction):
                    continue
                for flag in option.option_strings:
                    assert f"`{flag}`" in text, f"cli.md lacks {name} {flag}: {REGENERATE}"
    assert text == cli_markdown(), f"cli.md is stale: {REGENERATE}"


def test_cli_md_lists_the_exit_codes() -> None:
    text = page("cli.md")
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |"):
        assert code in text


def test_api_md_documents_every_path_and_method_of_the_openapi_document() -> None:
    text = page("api.md")
    for path, item in openapi_document()["paths"].items():
        for method in item:
            assert f"## {method.upper()} {path}\n" in text, f"api.md lacks {path}: {REGENERATE}"


def test_the_field_reference_in_spec_md_is_generated_from_the_models() -> None:
    head, marker, tail = page("spec.md").partition(GENERATED_MARKER)
    assert marker, "spec.md lost its generated-part marker"
    assert tail.lstrip("\n") == spec_reference_markdown(), f"spec.md is stale: {REGENERATE}"
    for name in ("allow_fields", "allow_kinds", "routes", "allow", "budget", "best_of"):
        assert f"**`{name}`**" in head, f"the prose part of spec.md does not explain {name}"
    for words in ("RE2", "anchors", "aliases", "64 levels", "4 MiB", "provider_options"):
        assert words in head


def test_settings_md_is_generated_from_the_settings_tree() -> None:
    # Which names the code may read at all is tests/test_settings.py's concern:
    # every one must be declared in the tree this page is written from.
    assert page("settings.md") == settings_markdown(), f"settings.md is stale: {REGENERATE}"
    documented = set(re.findall(r"`(LLMMIXER_[A-Z0-9_]+)`", page("settings.md")))
    assert {setting.name for setting in declared_settings()} <= documented
    assert {f"LLMMIXER_{name.upper()}_CONCURRENCY" for name in provider_names()} <= documented


def workflow_names() -> set[str]:
    source = (REPO / "workflows" / "mixer.py").read_text()
    return set(re.findall(r'@workflow\.(?:signal|update|query)\(name="([a-z_]+)"\)', source))


def test_interventions_md_names_every_signal_update_query_and_event() -> None:
    text = page("interventions.md")
    names = workflow_names()
    assert {"retry", "retry_step", "progress", "raise_budget"} <= names
    for name in names:
        assert f"`{name}`" in text, f"interventions.md does not name {name}"
    for event in EventType:
        assert f"`{event.value}`" in text, f"interventions.md does not list {event.value}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize(
    "document",
    [REPO / "README.md", *sorted(DOCS.glob("*.md"))],
    ids=lambda path: path.name,
)
def test_relative_links_resolve_to_files_in_the_repository(document: Path) -> None:
    for target in LINK.findall(document.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (document.parent / target).exists(), f"{document.name} links to missing {target}"


def test_the_docs_index_and_the_readme_link_every_page() -> None:
    index = page("README.md")
    for path in DOCS.iterdir():
        if path.name != "README.md":
            assert f"]({path.name})" in index, f"docs/README.md does not link {path.name}"
    assert "](docs/README.md)" in (REPO / "README.md").read_text()


def test_no_file_points_outside_the_repository() -> None:
    # Spelled in pieces so this file does not match itself.
    outside = ("../" + "shared", "CONTRACT" + ".md")
    offenders = [
        f"{path.relative_to(REPO)}: {needle}"
        for path in source_files(".py", ".md")
        for needle in outside
        if needle in path.read_text(errors="replace")
    ]
    assert not offenders, "users do not have these files: " + ", ".join(offenders)


# Files other helpers were editing when the references were replaced; remove
# each from this set once its comments say what they mean.
_NOT_YET_REWORDED: set[str] = set()


def test_comments_say_what_they_mean_instead_of_citing_contract_sections() -> None:
    citation = re.compile(r"CONTRACT (?:section )?\d")
    offenders = {
        str(path.relative_to(REPO))
        for path in source_files(".py", ".md")
        if citation.search(path.read_text(errors="replace"))
    }
    assert offenders <= _NOT_YET_REWORDED, sorted(offenders - _NOT_YET_REWORDED)
