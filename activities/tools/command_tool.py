"""``run_tool_command``: a command tool's call, run exactly like a ``pty`` step.

The model's arguments are checked against the tool's JSON Schema, then fill
whole argv elements (``core.tools.render_argv``: no shell, nothing spliced),
and the command goes through the worker's ``CommandActivities.run_command``:
the same ``LLMMIXER_PTY_ALLOW``, scrubbed environment, redaction, timeout and
output cap as every other command. What the workflow sees::

    result, is_error=False   the command exited with one of success_codes
    result, is_error=True    arguments refused (nothing ran), or another exit
                             code: the model reads why
    CommandRefused           the worker's policy refused the command (raised,
                             non-retryable, as for a pty step)
    CommandTimeout           ran past the tool's timeout_s (raised)
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema.exceptions
import jsonschema.validators
from temporalio import activity
from temporalio.exceptions import ApplicationError

from llmmixer.activities.commands import CommandActivities
from llmmixer.core.contracts import (
    TOOL_COMMAND_ACTIVITY,
    CommandCall,
    ErrorType,
    ToolRunRequest,
    ToolRunResult,
)
from llmmixer.core.redaction import redact
from llmmixer.core.tools import ToolArgumentError, render_argv

__all__ = ["CommandToolActivities", "argument_problem"]

_EXIT_CODE = re.compile(r"exited with code (-?\d+)")


def argument_problem(parameters: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """Why ``arguments`` do not match the tool's JSON Schema ``parameters``, or None."""
    validator = jsonschema.validators.validator_for(parameters)(parameters)
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path)
    return f"{where or '(arguments)'}: {error.message}"


class CommandToolActivities:
    """Registers ``run_tool_command`` over the worker's ``CommandActivities``."""

    def __init__(self, commands: CommandActivities) -> None:
        self.commands = commands

    @activity.defn(name=TOOL_COMMAND_ACTIVITY)
    async def run_tool_command(self, request: ToolRunRequest) -> ToolRunResult:
        tool, call = request.tool, request.call
        attempt = activity.info().attempt

        def refused(reason: str) -> ToolRunResult:
            return ToolRunResult(
                call_id=call.id,
                name=call.name,
                content=redact(
                    f"arguments refused, nothing ran: {reason}; call `{tool.name}` again with "
                    "arguments that match its parameters",
                    self.commands.secrets,
                ),
                is_error=True,
                attempt=attempt,
            )

        problem = argument_problem(tool.parameters, call.arguments)
        if problem is not None:
            return refused(problem)
        try:
            argv = render_argv(tool, call.arguments)
        except ToolArgumentError as error:
            return refused(str(error))
        command = CommandCall(
            workflow_id=request.workflow_id,
            step_id=request.step_id,
            argv=argv,
            cwd=tool.cwd,
            env=tool.env,
            timeout_s=tool.timeout_s,
            success_codes=tool.success_codes,
            max_output_bytes=tool.max_output_bytes,
        )
        try:
            outcome = await self.commands.run_command(command)
        except ApplicationError as error:
            if error.type != ErrorType.COMMAND_FAILED:
                raise
            # Another exit code is an answer the model reads (grep found
            # nothing, a test failed), not a failure of the step.
            details = error.details[0] if error.details else {}
            output = details.get("partial_output") if isinstance(details, dict) else None
            code = _EXIT_CODE.search(error.message)
            exit_code = int(code.group(1)) if code else None
            return ToolRunResult(
                call_id=call.id,
                name=call.name,
                content=f"exit code {exit_code}\n{output or ''}",
                is_error=True,
                exit_code=exit_code,
                attempt=attempt,
            )
        return ToolRunResult(
            call_id=call.id,
            name=call.name,
            content=outcome.output,
            exit_code=outcome.exit_code,
            truncated=outcome.truncated,
            duration_ms=outcome.duration_ms,
            attempt=attempt,
        )
