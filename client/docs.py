"""Reference pages generated from the code, so they cannot drift from it.

    python -m llmmixer.client.docs write DOCS_DIR   # rewrite the generated pages
    python -m llmmixer.client.docs cli|api|spec|settings  # print one generated part

``docs/cli.md``, ``docs/api.md`` and ``docs/settings.md`` are generated
whole: the parser of ``llmmixer``, the OpenAPI document of ``llmmixer serve``
and the settings tree (``runtime/settings.py``) are their source.
``docs/spec.md`` is written by hand above the marker line and generated
below it, from the spec's JSON Schema and the providers' closed option
models. ``tests/test_docs.py`` fails when a committed page differs from
what this module writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

GENERATED_MARKER = "<!-- Generated below by `python -m llmmixer.client.docs write docs`. -->"

_EXIT_CODES = [
    ("0", "completed (or the command did what it was asked)"),
    (
        "1",
        "the run failed or was cancelled, or the operation could not be done "
        "(Temporal unreachable, an intervention refused)",
    ),
    (
        "2",
        "invalid spec or usage (`validate` prints one error per line: "
        "`step <id>: <field>: <message>`)",
    ),
    ("3", "the run waits for a person (`run`, `status`, `watch`)"),
    ("130", "interrupted (Ctrl-C)"),
]


# ---- cli.md ------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def _option_row(action: argparse.Action) -> str:
    metavar = action.metavar if isinstance(action.metavar, str) else None
    if action.option_strings:
        name = ", ".join(f"`{option}`" for option in action.option_strings)
        if action.nargs != 0:
            name += f" `{metavar or action.dest.upper()}`"
    else:
        name = f"`{(metavar or action.dest).upper()}`"
    notes = [action.help or ""]
    if action.required and action.option_strings:
        notes.append("required")
    if isinstance(action, argparse._AppendAction):
        notes.append("repeatable")
    if action.choices:
        notes.append("one of " + ", ".join(f"`{choice}`" for choice in action.choices))
    if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
        notes.append(f"default `{action.default}`")
    return f"| {name} | {'; '.join(note for note in notes if note)} |"


def cli_markdown() -> str:
    """docs/cli.md: every subcommand of ``llmmixer`` with its arguments."""
    from llmmixer.client.cli import build_parser

    parser = build_parser()
    commands = _subcommands(parser)
    helps = _helps(parser)
    lines = [
        "# The `llmmixer` command line",
        "",
        "Generated from the command's own parser (`python -m llmmixer.client.docs write docs`).",
        "`llmmixer COMMAND --help` prints the same. Every command takes `-v`/`--verbose`",
        "before the command name to log more. Connection settings (`TEMPORAL_ADDRESS`,",
        "`LLMMIXER_TASK_QUEUE`, ...) are in [settings.md](settings.md).",
        "",
        "## Exit status",
        "",
        "| code | meaning |",
        "| --- | --- |",
        *(f"| {code} | {meaning} |" for code, meaning in _EXIT_CODES),
        "",
        "## Commands",
        "",
        "| command | what it does |",
        "| --- | --- |",
    ]
    lines += [f"| [`{name}`](#llmmixer-{name}) | {helps.get(name, '')} |" for name in commands]
    # A command with actions of its own (`schedule create`, ...) documents each.
    sections = dict(commands)
    for name, command in commands.items():
        for action_name, action in _subcommands(command).items():
            sections[f"{name} {action_name}"] = action
            helps[f"{name} {action_name}"] = _helps(command).get(action_name, "")
    for name, command in sections.items():
        actions = [a for a in command._actions if not isinstance(a, argparse._HelpAction)]
        usage = " ".join(command.format_usage().split()[1:])
        lines += ["", f"## llmmixer {name}", "", helps.get(name, ""), "", f"    {usage}", ""]
        if actions:
            lines += ["| argument | meaning |", "| --- | --- |"]
            lines += [_option_row(action) for action in actions]
    return "\n".join(lines).rstrip() + "\n"


# ---- api.md ------------------------------------------------------------------------


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document ``llmmixer serve`` serves at ``/openapi.json``."""
    from llmmixer.client.http import create_app
    from llmmixer.client.mixer import MixerClient

    # Building the document reads only the routes; no request reaches the client.
    document: dict[str, Any] = create_app(typing.cast(MixerClient, None)).openapi()
    return document


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return f"`{schema['$ref'].rsplit('/', 1)[-1]}`"
    if "anyOf" in schema:
        return " or ".join(_schema_name(option) for option in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_schema_name(schema.get('items', {}))}"
    return f"`{schema.get('type', 'any')}`"


def api_markdown() -> str:
    """docs/api.md: every path and operation of the HTTP API, and its schemas."""
    document = openapi_document()
    info = document.get("info", {})
    lines = [
        "# The HTTP API of `llmmixer serve`",
        "",
        "Generated from the server's OpenAPI document",
        "(`python -m llmmixer.client.docs write docs`); a running server serves the",
        "same document at `GET /openapi.json`. Authentication (`LLMMIXER_API_TOKEN`,",
        "a bearer token), the browser rules (`Origin`, `Sec-Fetch-Site`, `Host`) and",
        "the body limit are described in the README section",
        '"Over HTTP" and in [security.md](security.md). Every `POST` needs',
        '`Content-Type: application/json`. Errors answer `{"errors": ["..."]}`.',
        "",
        f"{info.get('title', '')} {info.get('version', '')}: {info.get('summary', '')}",
        "",
        "| method | path | summary |",
        "| --- | --- | --- |",
    ]
    operations = [
        (path, method, operation)
        for path, item in document.get("paths", {}).items()
        for method, operation in item.items()
    ]
    for path, method, operation in operations:
        lines.append(f"| `{method.upper()}` | `{path}` | {operation.get('summary', '')} |")
    for path, method, operation in operations:
        lines += ["", f"## {method.upper()} {path}", ""]
        if operation.get("description"):
            lines += [operation["description"].strip(), ""]
        for parameter in operation.get("parameters", []):
            required = "required" if parameter.get("required") else "optional"
            lines.append(
                f"- {parameter['in']} `{parameter['name']}` "
                f"({_schema_name(parameter.get('schema', {}))}, {required})"
                + (f": {parameter['description']}" if parameter.get("description") else "")
            )
        body = operation.get("requestBody", {}).get("content", {})
        for media, content in body.items():
            lines.append(f"- body ({media}): {_schema_name(content.get('schema', {}))}")
        for status, response in operation.get("responses", {}).items():
            lines.append(f"- {status}: {response.get('description', '')}")
    schemas = document.get("components", {}).get("schemas", {})
    if schemas:
        lines += ["", "## Schemas"]
        for name, schema in schemas.items():
            lines += ["", f"### {name}", ""]
            if schema.get("description"):
                lines += [schema["description"].strip(), ""]
            if "enum" in schema:
                lines.append("One of " + ", ".join(f"`{value}`" for value in schema["enum"]) + ".")
            needed = set(schema.get("required", []))
            for field, value in schema.get("properties", {}).items():
                mark = " (required)" if field in needed else ""
                lines.append(f"- `{field}`{mark}: {_schema_name(value)}")
    return "\n".join(lines).rstrip() + "\n"


# ---- spec.md (the generated part) ---------------------------------------------------


def _type_text(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"]
            return " or ".join(_type_text(option) for option in options)
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type_text(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"mapping of `string` to {_type_text(schema['additionalProperties'])}"
    return f"`{kind}`"


_LIMITS = {
    "minimum": ">= {}",
    "exclusiveMinimum": "> {}",
    "maximum": "<= {}",
    "exclusiveMaximum": "< {}",
    "minLength": "at least {} characters",
    "maxLength": "at most {} characters",
    "minItems": "at least {} items",
    "pattern": "matches `{}`",
}


def _limits(schema: dict[str, Any]) -> list[str]:
    found = [text.format(schema[key]) for key, text in _LIMITS.items() if key in schema]
    for option in schema.get("anyOf", []):
        found += _limits(option)
    if schema.get("type") == "array":
        found += [f"each {limit}" for limit in _limits(schema.get("items", {}))]
    return found


def _field_rows(definition: dict[str, Any]) -> Iterator[str]:
    required = set(definition.get("required", []))
    for name, schema in definition.get("properties", {}).items():
        if name in required:
            default = "required"
        elif "default" in schema:
            default = f"`{json.dumps(schema['default'])}`"
        else:
            default = "empty"
        limits = "; ".join(_limits(schema))
        yield f"| `{name}` | {_type_text(schema)} | {default} | {limits} |"


def _model_fields(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        key = field.alias or name
        annotation = field.annotation
        nested = [
            arg
            for arg in typing.get_args(annotation) or (annotation,)
            for arg in (typing.get_args(arg) or (arg,))
            if isinstance(arg, type) and issubclass(arg, BaseModel)
        ]
        if nested:
            yield from _model_fields(nested[0], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def provider_options_markdown() -> str:
    from llmmixer.core.provider_options import option_model
    from llmmixer.core.providers import provider_names

    lines = [
        "## provider_options, per provider",
        "",
        "A closed list: any other key (at any level) is refused by `llmmixer validate`",
        "and by the worker, naming its path. Nothing here can set an endpoint, a",
        "header, a timeout or a key.",
        "",
    ]
    for provider in provider_names():
        model = option_model(provider)
        if model is None:
            continue
        fields = ", ".join(f"`{name}`" for name in _model_fields(model, ""))
        lines.append(f"- **{provider}**: {fields}")
    return "\n".join(lines) + "\n"


def spec_reference_markdown() -> str:
    """The generated half of docs/spec.md: every model's fields, then provider_options."""
    from llmmixer.core.schema import spec_json_schema

    schema = spec_json_schema()
    sections = [("Spec", schema), *sorted(schema["$defs"].items())]
    lines = [
        "## Field reference",
        "",
        "Every field of every object, its type, default and the limits the models",
        "enforce (the same as [spec.schema.json](spec.schema.json)). `required` has no",
        "default; `null` means unset. No object accepts a field not listed here.",
    ]
    for name, definition in sections:
        lines += ["", f"### {name}", ""]
        if definition.get("description"):
            lines += [definition["description"], ""]
        lines += ["| field | type | default | limits |", "| --- | --- | --- | --- |"]
        lines += list(_field_rows(definition))
    return "\n".join(lines) + "\n\n" + provider_options_markdown()


# ---- settings.md -------------------------------------------------------------------

_SETTINGS_INTRO = [
    "# Settings: environment variables",
    "",
    "Every `LLMMIXER_*` variable llmmixer reads: what it does, its default and a",
    "value that works. The list comes from the settings tree in `runtime/settings.py`;",
    "`llmmixer doctor` prints the values in force and whether each is set or a",
    "default. Booleans accept `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off` in any",
    "case; a blank value counts as unset. A bad value stops the process with one",
    "line per bad variable, naming it and giving an example.",
    "",
    "Credentials (provider keys, `TEMPORAL_API_KEY`, `LLMMIXER_API_TOKEN`,",
    "`LLMMIXER_PAYLOAD_KEY`, `LLMMIXER_CODEC_TOKEN`) are read by the process that",
    "needs them and never travel in a spec, a plan, history or a command's",
    "environment: see [security.md](security.md). `llmmixer doctor` shows only that",
    "they are set. A spec never sets any of these variables.",
    "",
    "Temporal's own connection variables (`TEMPORAL_ADDRESS`, default",
    "`localhost:7233`; `TEMPORAL_NAMESPACE`, default `default`; `TEMPORAL_API_KEY`,",
    "`TEMPORAL_TLS*`, `TEMPORAL_PROFILE`, `TEMPORAL_CONFIG_FILE`) follow",
    "`temporalio.envconfig`. Provider keys and endpoints are each SDK's own:",
]


def settings_markdown() -> str:
    """docs/settings.md: every variable of the settings tree, by group."""
    from llmmixer.core.providers import PROVIDER_SPECS
    from llmmixer.runtime.settings import declared_settings

    providers = "; ".join(
        " or ".join(f"`{name}`" for name in spec.key_variables) + f"/`{spec.base_url_variable}`"
        for spec in PROVIDER_SPECS
    )
    lines = [*_SETTINGS_INTRO, f"{providers}."]
    group: type | None = None
    for setting in declared_settings():
        if setting.group is not group:
            group = setting.group
            lines += ["", f"## {setting.group.title}", "", setting.group.intro, ""]
            lines += [
                "| variable | what it does | default | example |",
                "| --- | --- | --- | --- |",
            ]
        env = setting.env
        lines.append(
            f"| `{env.name}` | {env.description} | {setting.default_text} "
            f"| `{env.name}={env.example}` |"
        )
    return "\n".join(lines) + "\n"


# ---- the command -------------------------------------------------------------------


def write(docs: Path) -> None:
    """Rewrite the generated pages (and spec.md's generated half) under ``docs``."""
    (docs / "cli.md").write_text(cli_markdown())
    (docs / "api.md").write_text(api_markdown())
    (docs / "settings.md").write_text(settings_markdown())
    spec = docs / "spec.md"
    head = spec.read_text().split(GENERATED_MARKER)[0]
    spec.write_text(f"{head}{GENERATED_MARKER}\n\n{spec_reference_markdown()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmmixer.client.docs")
    parser.add_argument("page", choices=["cli", "api", "spec", "settings", "write"])
    parser.add_argument("docs", nargs="?", default="docs", help="directory for `write`")
    args = parser.parse_args(argv)
    if args.page == "write":
        write(Path(args.docs))
        return 0
    pages = {
        "cli": cli_markdown,
        "api": api_markdown,
        "spec": spec_reference_markdown,
        "settings": settings_markdown,
    }
    sys.stdout.write(pages[args.page]())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
