"""A small MCP server over one repository, for examples/mcp.yaml.

Run by the worker as a stdio server (``python3 examples/mcp_repo_server.py
--root .``), written with the official ``mcp`` SDK. Its reading tools never
leave ``--root``; ``save_notes`` writes one file there, and the spec has a
person approve every call of it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from mcp.server.mcpserver import MCPServer

MAX_CHARS = 64 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    root = args.root.resolve()

    def inside(path: str) -> Path:
        target = (root / path).resolve()
        if target != root and root not in target.parents:
            raise ValueError(f"{path!r} is outside the repository")
        return target

    server = MCPServer("repository")

    @server.tool(description="List a directory of the repository (default: its root).")
    def list_files(path: str = ".") -> str:
        entries = sorted(inside(path).iterdir())
        return "\n".join(e.name + ("/" if e.is_dir() else "") for e in entries)

    @server.tool(description="Read a file of the repository.")
    def read_file(path: str) -> str:
        return inside(path).read_text(encoding="utf-8", errors="replace")[:MAX_CHARS]

    @server.tool(description="Search the repository's text files for a regular expression.")
    def search(pattern: str, path: str = ".") -> str:
        expression = re.compile(pattern)
        found: list[str] = []
        for file in sorted(inside(path).rglob("*")):
            if ".git" in file.parts or not file.is_file():
                continue
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            for number, line in enumerate(lines, start=1):
                if expression.search(line):
                    found.append(f"{file.relative_to(root)}:{number}: {line[:200]}")
                    if len(found) >= 200:
                        return "\n".join(found)
        return "\n".join(found) or "no match"

    @server.tool(description="The latest commits, optionally only those touching a path.")
    def git_log(path: str = ".", count: int = 30) -> str:
        argv = ["git", "log", "--oneline", "-n", str(min(max(count, 1), 200)), "--"]
        done = subprocess.run(
            [*argv, str(inside(path))], cwd=root, capture_output=True, text=True, check=False
        )
        return done.stdout or done.stderr

    @server.tool(description="Write a summary to NOTES.md in the repository's root.")
    def save_notes(text: str) -> str:
        (root / "NOTES.md").write_text(text, encoding="utf-8")
        return f"saved {len(text)} characters to NOTES.md"

    server.run("stdio")


if __name__ == "__main__":
    main()
