"""Lint and type checks are part of the test suite, configured in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["workflows", "activities", "workers", "client", "runtime"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def test_ruff_lint_passes() -> None:
    done = _run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_is_applied() -> None:
    done = _run("ruff", "format", "--check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_passes(tmp_path: Path) -> None:
    # The repository root is the `llmmixer` package; a link named `llmmixer`
    # lets mypy see the source tree under the package's real import name.
    (tmp_path / "llmmixer").symlink_to(REPO)
    env = {**os.environ, "MYPYPATH": str(tmp_path)}
    args = [arg for package in PACKAGES for arg in ("-p", f"llmmixer.{package}")]
    done = _run("mypy", "--cache-dir", str(tmp_path / "cache"), *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
