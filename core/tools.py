"""Tools an ``llm`` step offers its model: commands, MCP servers and other specs.

Pure models and helpers (no I/O): the spec reads them, the workflow records
them, and the worker's tool activities (``activities/tools``) run them. Rules
across fields (names, placeholders, schemas) live in ``validation.py``.

Compatibility: like every spec model, a field added here gets a default and
an existing one never changes meaning; specs of runs in flight are re-read on
replay.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ARG_PLACEHOLDER",
    "DEFAULT_MAX_TURNS",
    "TOOL_KINDS",
    "TOOL_NAME_PATTERN",
    "CommandTool",
    "McpTool",
    "SpecTool",
    "Tool",
    "ToolArgumentError",
    "argv_placeholder",
    "empty_parameters",
    "render_argv",
    "tool_allows",
]

# The strictest of the providers' function-name rules (Anthropic, OpenAI and
# Gemini all accept this set), so one spec works with every provider.
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
TOOL_KINDS: tuple[str, ...] = ("command", "mcp", "spec")
# Model turns of a tool loop when the step does not set `max_turns`.
DEFAULT_MAX_TURNS = 10
# An argv element that is exactly one placeholder: it becomes exactly one
# element. Nothing else of `{{...}}` is allowed in an argv, so an argument can
# never be spliced into a longer string (`--file={{args.x}}`, `sh -c "... {{args.x}}"`).
ARG_PLACEHOLDER = re.compile(r"^\{\{\s*args\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")


def empty_parameters() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ToolBase(_Strict):
    # The name the model calls the tool by (for `mcp`: the server's label).
    name: str = Field(max_length=64)
    description: str | None = None
    # Every call of this tool waits for a person to approve it.
    approve: bool = False


class CommandTool(_ToolBase):
    """A program run with an argv whose `{{args.x}}` elements the model fills.

    It runs like a `pty` step: the worker's LLMMIXER_PTY_ALLOW, scrubbed
    environment, redaction, timeout and output cap all apply.
    """

    kind: Literal["command"] = "command"
    # JSON Schema (an object) of the arguments; the model's arguments are
    # checked against it before anything runs.
    parameters: dict[str, Any] = Field(default_factory=empty_parameters)
    argv: list[str] = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(default=120.0, gt=0)
    success_codes: list[int] = Field(default_factory=lambda: [0])
    max_output_bytes: int = Field(default=256 * 1024, ge=1024)
    # An argument starting with `-` is refused unless `--` comes before its
    # placeholder: a path argument must not become an option (`--output=...`).
    allow_option_arguments: bool = False


class McpTool(_ToolBase):
    """An MCP server whose tools the model may call: stdio `command` or HTTP `url`."""

    kind: Literal["mcp"] = "mcp"
    # A stdio server: started under the worker's command policy.
    command: list[str] | None = Field(default=None, min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    # A streamable HTTP server: a URL the worker's LLMMIXER_ALLOWED_MCP_URLS lists.
    url: str | None = None
    # Offer only these of the server's tools (None: all of them) ...
    include: list[str] | None = None
    # ... minus these.
    exclude: list[str] = Field(default_factory=list)
    timeout_s: float = Field(default=120.0, gt=0)


class SpecTool(_ToolBase):
    """Another spec run as a child workflow; its inputs are the tool's arguments."""

    kind: Literal["spec"] = "spec"
    parameters: dict[str, Any] = Field(default_factory=empty_parameters)
    # A spec file's path (read by the client when the run starts) or the spec itself.
    spec: str | dict[str, Any]


Tool = Annotated[CommandTool | McpTool | SpecTool, Field(discriminator="kind")]


class ToolArgumentError(ValueError):
    """The model's arguments cannot fill a command's argv; the message says why."""


def argv_placeholder(element: str) -> str | None:
    """The argument name if ``element`` is exactly ``{{args.<name>}}``, else None."""
    match = ARG_PLACEHOLDER.match(element)
    return match.group(1) if match else None


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def render_argv(tool: CommandTool, arguments: dict[str, Any]) -> list[str]:
    """The argv with each placeholder replaced by its argument, as one element.

    No shell ever sees it, and a value never joins another element, so spaces,
    ``;``, ``$(...)`` and quotes are plain characters. A placeholder whose
    argument is absent (optional, not given) drops its element. Raises
    ToolArgumentError for a value that would be read as an option.
    """
    rendered: list[str] = []
    after_separator = False
    for element in tool.argv:
        name = argv_placeholder(element)
        if name is None:
            rendered.append(element)
            after_separator = after_separator or element == "--"
            continue
        if name not in arguments or arguments[name] is None:
            continue
        value = _as_text(arguments[name])
        if "\0" in value:
            raise ToolArgumentError(f"argument `{name}` holds a NUL character")
        if value.startswith("-") and not after_separator and not tool.allow_option_arguments:
            raise ToolArgumentError(
                f"argument `{name}` starts with `-` and would be read as an option; "
                "pass a value that does not start with `-`"
            )
        rendered.append(value)
    return rendered


def tool_allows(server: McpTool, tool_name: str) -> bool:
    """Whether ``server``'s include/exclude lists offer ``tool_name`` to the model."""
    if server.include is not None and tool_name not in server.include:
        return False
    return tool_name not in server.exclude
