"""Tiny hostile documents are refused as invalid specs or plans within seconds.

The attacker writes a spec (a file for `llmmixer validate`/`run`, text or a
mapping for the HTTP API) or, through a prompt, a planner's reply. A YAML
alias bomb used to freeze the validator for hours; 5,000 nested brackets
raised RecursionError (a traceback, or a workflow task failing forever).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fakes.provider_server import FakeProviderServer

from llmmixer.client.mixer import MixerClient
from llmmixer.client.specfile import parse_inputs, prepare_spec, read_spec
from llmmixer.core.plans import PlanContext, check_plan, limits_for
from llmmixer.core.spec import DecomposeStep
from llmmixer.core.validation import SpecError, validate_spec
from llmmixer.workflows.records import RunStatus, StepStatus

DEEP = 5000


def laughs() -> str:
    """A "billion laughs" spec: 9 levels of 9 aliases, 9**9 strings once expanded."""
    names = "abcdefghi"
    lines = ["name: laughs", "inputs:", "  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for before, name in itertools.pairwise(names):
        lines.append(f"  {name}: &{name} [{', '.join([f'*{before}'] * 9)}]")
    lines += [
        "steps:",
        "  - {id: s, provider: openai, model: gpt-4.1-mini, prompt: '{{inputs.i}}'}",
    ]
    return "\n".join(lines) + "\n"


def deep_yaml() -> str:
    return "name: deep\nsteps: " + "[" * DEEP + "]" * DEEP + "\n"


def deep_json() -> str:
    return '{"name": "deep", "steps": ' + "[" * DEEP + "]" * DEEP + "}"


def validate(path: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "llmmixer.client.cli", "validate", str(path)],
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "LLMMIXER_HOME": str(tmp_path / "home"),
            "TEMPORAL_ADDRESS": "127.0.0.1:1",
            **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
        },
        capture_output=True,
        text=True,
        # The old loader ran for hours: a hang fails here instead of stalling the suite.
        timeout=90,
        check=False,
    )
    return done, time.monotonic() - started


def test_the_laughs_bomb_is_700_bytes() -> None:
    assert len(laughs().encode()) < 700


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("laughs.yaml", laughs(), "uses the YAML anchor &a (at line 3, column 6)"),
        ("deep.yaml", deep_yaml(), "nests mappings and lists more than 64 levels deep"),
        ("deep.json", deep_json(), "nests mappings and lists more than 64 levels deep"),
    ],
)
def test_validate_refuses_hostile_files_in_seconds_with_one_line(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    done, elapsed = validate(path, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"spec: (document): {path} "), lines[0]
    assert expected in lines[0]
    # Interpreter start-up dominates; the refusal itself takes milliseconds.
    assert elapsed < 60


def test_validate_refuses_oversized_and_binary_files_without_a_traceback(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("name: big\nnotes: " + "x" * (5 * 1024 * 1024) + "\n")
    done, _ = validate(big, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"spec: (document): {big} is larger than 4194304 bytes: "
        "split it up or move large text into inputs"
    )
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    done, _ = validate(binary, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"spec: (document): {binary} is not UTF-8 text (byte 6): save it as UTF-8"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", [laughs(), deep_yaml(), deep_json()])
def test_spec_text_over_the_api_is_refused_in_milliseconds(text: str) -> None:
    # `MixerClient.start` and the HTTP API hand spec text to prepare_spec.
    started = time.monotonic()
    with pytest.raises(SpecError) as caught:
        prepare_spec(text)
    assert time.monotonic() - started < 1.0
    [issue] = caught.value.issues
    assert str(issue).startswith("spec: (document): the spec ")


@pytest.mark.timeout(60)
def test_a_mapping_nested_5000_deep_is_an_invalid_spec_not_a_recursion_error() -> None:
    nested: Any = []
    for _ in range(DEEP):
        nested = [nested]
    with pytest.raises(SpecError) as caught:
        read_spec({"name": "deep", "steps": nested})
    assert [str(issue) for issue in caught.value.issues] == [
        "spec: (document): the spec nests mappings and lists more than 64 levels deep "
        "at steps.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0"
        ".0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0: flatten it"
    ]


def test_a_nan_budget_is_refused_not_silently_unlimited() -> None:
    # NaN compares false with everything: `spent > max_cost_usd` would never stop the run.
    text = "name: n\nbudget: {max_cost_usd: .nan}\nsteps: [{id: a, prompt: hi}]\n"
    with pytest.raises(SpecError) as caught:
        read_spec(text)
    assert "the number .nan, which is not finite" in str(caught.value)
    with pytest.raises(SpecError):
        read_spec('{"name": "n", "budget": {"max_cost_usd": NaN}, "steps": []}')


def test_an_unreadable_input_file_is_an_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        parse_inputs([f"diff=@{tmp_path / 'missing.txt'}"])
    assert str(caught.value).startswith("spec: inputs: --input diff=@")
    assert "cannot read it: No such file or directory" in str(caught.value)


# ---- plans -------------------------------------------------------------------------


def plan_context() -> PlanContext:
    spec = validate_spec(
        {
            "name": "plans",
            "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
            "steps": [{"id": "split", "kind": "decompose", "prompt": "split"}],
        }
    )
    step = spec.step("split")
    assert isinstance(step, DecomposeStep)
    return PlanContext("split", limits_for(step), spec, frozenset({"split"}))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            '{"steps": ' + "[" * DEEP + "]" * DEEP + "}",
            "step plan: (document): the reply nests mappings and lists more than 64 levels deep "
            "(at line 1, column 74): flatten it",
        ),
        (
            "```json\n" + "[" * DEEP + "]" * DEEP + "\n```",
            "step plan: (document): the reply nests mappings and lists more than 64 levels deep "
            "(at line 1, column 65): flatten it",
        ),
        (
            json.dumps({"steps": [{"id": "a", "prompt": "x" * (5 * 1024 * 1024)}]}),
            "step plan: (document): the reply is larger than 4194304 bytes: "
            "split it up or move large text into inputs",
        ),
        (
            '{"steps": [{"id": "a", "prompt": "x"}], "steps": []}',
            "step plan: (document): the reply has the key 'steps' twice in one mapping: "
            "keep only one",
        ),
        # The old fence pattern backtracked for minutes on this (cubic in its length).
        ("```\n" + "\n" * 2500 + "x", "step plan: (document): the reply is not JSON"),
    ],
)
def test_hostile_planner_replies_are_refused_as_plans_in_milliseconds(
    reply: str, expected: str
) -> None:
    started = time.monotonic()
    steps, issues = check_plan(reply, plan_context())
    assert time.monotonic() - started < 1.0
    assert steps == []
    assert str(issues[0]).startswith(expected)


def test_a_fenced_plan_is_still_read() -> None:
    plan = json.dumps({"steps": [{"id": "a", "prompt": "x"}]})
    for reply in (f"```json\n{plan}\n```", f"  ```\n{plan}```\n", plan):
        steps, issues = check_plan(reply, plan_context())
        assert issues == [] and [step["id"] for step in steps] == ["a"]


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


async def test_a_planner_replying_with_deep_nesting_gets_its_plan_refused_not_a_stuck_step(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    # 600 levels: plain json.loads copes, but the old plan check recursed twice
    # per level and raised RecursionError. Now the planner's reply is refused
    # as invalid JSON by the activity, before any plan check sees it.
    nested = '{"o": ' * 600 + "1" + "}" * 600
    bomb = '{"steps": [{"id": "a", "prompt": "x", "provider_options": ' + nested + "}]}"
    provider_server.reply("openai", bomb)
    provider_server.reply("openai", bomb)
    retry = {"max_attempts": 2, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}
    spec = {
        "name": "hostile-plan",
        "defaults": {"provider": "openai", "model": "gpt-4.1", "retry": retry},
        "steps": [
            {"id": "split", "kind": "decompose", "prompt": "split", "on_failure": "skip"},
        ],
    }
    handle = await mixer.start(spec)
    # Before, the plan check raised RecursionError inside the workflow: its
    # task failed and was retried forever, and this result never came.
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert result.status == RunStatus.COMPLETED
    split = result.steps["split"]
    assert split.status == StepStatus.SKIPPED and split.attempts == 2
    assert "the reply nests mappings and lists more than 64 levels deep" in (
        split.skipped_reason or ""
    )
