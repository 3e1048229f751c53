"""A small stdio MCP server for the tests, written with the official `mcp` SDK.

Run as a script (``python tests/fakes/mcp_server.py --counter FILE --starts
FILE``): it imports nothing of llmmixer, since a worker starts MCP servers in
a scrubbed environment without the test's PYTHONPATH.

- ``--starts FILE``: one line with this process's pid is appended at start,
  so a test counts how often the worker started the server (and can kill it).
- ``bump``: appends one line to ``--counter FILE`` and returns the new count;
  a side effect a test can count.
- ``echo``: returns its text.
- ``secret``: returns the value of a file's first line (to test redaction).
- ``fail``: a tool error the model should see.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mcp.server.mcpserver import MCPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counter", type=Path, required=True)
    parser.add_argument("--starts", type=Path)
    args = parser.parse_args()
    if args.starts is not None:
        with args.starts.open("a", encoding="utf-8") as starts:
            starts.write(f"{os.getpid()}\n")

    server = MCPServer("llmmixer-test")

    @server.tool(description="Add one to the counter file and return the new count.")
    def bump(note: str = "") -> str:
        with args.counter.open("a", encoding="utf-8") as counter:
            counter.write(f"{note}\n")
        return str(len(args.counter.read_text(encoding="utf-8").splitlines()))

    @server.tool(description="Return the text unchanged.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Return the first line of a file.")
    def read_first_line(path: str) -> str:
        return Path(path).read_text(encoding="utf-8").splitlines()[0]

    @server.tool(description="Always fails.")
    def fail(reason: str) -> str:
        raise ValueError(f"failed on purpose: {reason}")

    server.run("stdio")


if __name__ == "__main__":
    main()
