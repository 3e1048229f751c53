"""Agents stay in their box: the attacks a spec or an agent can try, played for real.

A fake ``claude`` runs the Python code it is given as its prompt, so each
test's prompt is the attacker: it rewrites ``.git``, sets git config that runs
programs, or the spec asks for flags and variables only the operator may set.
Every attack aims at a marker file; the marker must never appear.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from llmmixer.activities.agents import (
    ENV_AGENT_SKIP_PERMISSIONS,
    ENV_AGENT_TRUST_FOLDERS,
    AgentArgsRefusedError,
    AgentName,
    AgentNotInstalledError,
    AgentSettings,
    agent_command,
    prepare_agent,
)
from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.core.contracts import AgentCall
from llmmixer.workers.worker import WorkerSettings, mixer_worker
from llmmixer.workflows.records import StepStatus

pytestmark = pytest.mark.timeout(120)

REAL_GIT = shutil.which("git")
if REAL_GIT is None and os.environ.get("CI") != "true":
    pytest.skip("git is not installed", allow_module_level=True)

FAKE_AGENT = f"""#!{sys.executable}
import json, sys
print("ARGV " + json.dumps(sys.argv[1:-1]))
exec(sys.argv[-1])
print("AGENT RAN")
"""

# Records the environment of every git call, then runs the real git.
FAKE_GIT = f"""#!{sys.executable}
import json, os, sys
with open(os.path.join(os.path.dirname(__file__), "git-calls.jsonl"), "a") as log:
    log.write(json.dumps(dict(os.environ)) + "\\n")
os.execv({REAL_GIT!r}, [{REAL_GIT!r}, *sys.argv[1:]])
"""

SECRET = "sk-ant-box-test-0123456789abcdef"


def _git(repo: Path, *args: str) -> str:
    # The repository may carry the attacker's config by now: never run its programs.
    safe = ["-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null"]
    return subprocess.run(
        ["git", *safe, *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = (tmp_path / "root").resolve()
    path.mkdir()
    return path


@pytest.fixture
def repo(root: Path) -> Path:
    path = root / "repo"
    path.mkdir()
    _git(path, "init", "-q")
    (path / "app.py").write_text("print('v1')\n")
    _git(path, "add", "app.py")
    _git(path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "start")
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER"


@pytest.fixture
def ran(tmp_path: Path) -> Path:
    return tmp_path / "RAN"


@pytest.fixture
def agent_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("claude", FAKE_AGENT), ("git", FAKE_GIT)):
        program = bin_dir / name
        program.write_text(text)
        program.chmod(0o755)
    return bin_dir


@pytest.fixture
def extra_worker_env() -> dict[str, str]:
    return {}


@pytest.fixture
def worker_env(
    agent_bin: Path, tmp_path: Path, root: Path, extra_worker_env: dict[str, str]
) -> dict[str, str]:
    return {
        "PATH": f"{agent_bin}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LLMMIXER_PTY_ALLOW": "claude",
        "LLMMIXER_PTY_ROOT": str(root),
        "ANTHROPIC_API_KEY": SECRET,
        **extra_worker_env,
    }


def _spec(prompt: str, **step: Any) -> dict[str, Any]:
    return {
        "name": "agent-box",
        "defaults": {"on_failure": "fail"},
        "steps": [
            {"id": "code", "kind": "agent", "agent": "claude-code", "prompt": prompt, **step}
        ],
    }


def _attack(code: str, *, ran: Path, marker: Path, **paths: Path) -> str:
    prompt = f"open({str(ran)!r}, 'w').write('ran')\n{code}"
    prompt = prompt.replace("MARKER", str(marker))
    for name, path in paths.items():
        prompt = prompt.replace(name, str(path))
    return prompt


async def _completed(mixer: MixerClient, spec: dict[str, Any]) -> str:
    result = await (await mixer.start(spec)).result()
    record = result.steps["code"]
    assert record.status == StepStatus.COMPLETED, record.error
    return record.output or ""


async def _refused(mixer: MixerClient, spec: dict[str, Any], match: str) -> None:
    handle = await mixer.start(spec)
    with pytest.raises(RunFailed, match=match):
        await handle.result()
    progress = await handle.progress()
    assert progress.steps["code"].attempts == 1  # a refusal is not retried


def _exists(path: Path) -> bool:
    return path.exists()


def _read(path: Path) -> str:
    return path.read_text()


def _no_llmmixer_branches(repo: Path) -> None:
    assert _git(repo, "branch", "--list", "llmmixer/*").strip() == ""
    assert len(_git(repo, "worktree", "list").splitlines()) == 1


# --- cwd and repository inside LLMMIXER_PTY_ROOT -------------------------------


async def test_a_worktree_step_cannot_reach_a_repository_outside_the_root(
    mixer: MixerClient, tmp_path: Path, ran: Path, marker: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _git(outside, "init", "-q")
    (outside / "secret.txt").write_text("the worker's private repository\n")
    _git(outside, "add", "secret.txt")
    _git(outside, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "s")

    spec = _spec(_attack("", ran=ran, marker=marker), cwd=str(outside), worktree=True)
    await _refused(mixer, spec, r"outside LLMMIXER_PTY_ROOT")
    assert not _exists(ran), "the agent ran in a checkout of a repository outside the root"
    _no_llmmixer_branches(outside)


async def test_a_worktree_step_cannot_check_out_a_repository_enclosing_the_root(
    client: Client, task_queue: str, tmp_path: Path, agent_bin: Path, ran: Path, marker: Path
) -> None:
    # The root is a directory inside a bigger repository: git would find that
    # repository from the root, and the agent would get all of it.
    enclosing = tmp_path / "home"
    enclosing.mkdir()
    _git(enclosing, "init", "-q")
    (enclosing / "private.txt").write_text("outside the root\n")
    _git(enclosing, "add", "private.txt")
    _git(enclosing, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "s")
    inner_root = enclosing / "work"
    inner_root.mkdir()
    environ = {
        "PATH": f"{agent_bin}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LLMMIXER_PTY_ALLOW": "claude",
        "LLMMIXER_PTY_ROOT": str(inner_root),
    }
    settings = dataclasses.replace(
        WorkerSettings.from_env(environ), task_queue=task_queue, shutdown_grace_s=2.0
    )
    async with mixer_worker(client, settings, environ=environ) as worker, worker:
        mixer = MixerClient(client, task_queue)
        spec = _spec(_attack("", ran=ran, marker=marker), worktree=True)
        await _refused(mixer, spec, r"outside LLMMIXER_PTY_ROOT")
    assert not _exists(ran)
    _no_llmmixer_branches(enclosing)


# --- git runs nothing the repository or the agent chose -------------------------

PLANT_GIT_FILE = """
import os, pathlib, subprocess
def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
common = os.path.abspath(git("rev-parse", "--git-common-dir"))
base = git("rev-parse", "HEAD")
evil = pathlib.Path("EVIL")
git("init", "-q", str(evil))
evil_git = evil / ".git"
(evil_git / "objects" / "info" / "alternates").write_text(os.path.join(common, "objects") + "\\n")
(evil_git / "llmmixer-base").write_text(base + "\\n")
git("--git-dir", str(evil_git), "config", "core.fsmonitor", "touch MARKER; false")
pathlib.Path(".git").unlink()
pathlib.Path(".git").write_text("gitdir: %s\\n" % evil_git)
pathlib.Path("agent-was-here.txt").write_text("hi\\n")
"""

SHARED_FSMONITOR = """
import pathlib, subprocess
subprocess.run(["git", "config", "core.fsmonitor", "touch MARKER; false"], check=True)
pathlib.Path("agent-was-here.txt").write_text("hi\\n")
"""

FILTER_DRIVER = """
import pathlib, subprocess
subprocess.run(["git", "config", "filter.evil.clean", "touch MARKER; cat"], check=True)
subprocess.run(["git", "config", "filter.evil.required", "true"], check=True)
pathlib.Path(".gitattributes").write_text("* filter=evil\\n")
pathlib.Path("agent-was-here.txt").write_text("hi\\n")
"""


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(PLANT_GIT_FILE, id="planted-git-file"),
        pytest.param(SHARED_FSMONITOR, id="core.fsmonitor"),
        pytest.param(FILTER_DRIVER, id="filter-driver"),
    ],
)
async def test_what_the_agent_writes_runs_nothing_when_llmmixer_collects_its_diff(
    mixer: MixerClient, repo: Path, tmp_path: Path, ran: Path, marker: Path, attack: str
) -> None:
    prompt = _attack(attack, ran=ran, marker=marker, EVIL=tmp_path / "evil")
    handle = await mixer.start(_spec(prompt, cwd=str(repo), worktree=True))
    failed: RunFailed | None = None
    try:
        await handle.result()
    except RunFailed as exc:
        failed = exc
    assert _exists(ran)
    assert not _exists(marker), "llmmixer's git ran a command the agent chose"
    assert failed is None, str(failed)
    output = (await handle.result()).steps["code"].output or ""
    # The diff still comes from the real worktree, against the recorded base.
    assert "--- changes ---" in output and "agent-was-here.txt" in output
    assert "+hi" in output
    _no_llmmixer_branches(repo)
    assert not (repo / "agent-was-here.txt").exists()


@pytest.mark.parametrize("where", ["hooks-dir", "core.hooksPath"])
async def test_repository_hooks_do_not_run_when_llmmixer_makes_and_removes_the_worktree(
    mixer: MixerClient, repo: Path, tmp_path: Path, ran: Path, marker: Path, where: str
) -> None:
    # As an earlier agent step (without a worktree) could have left them: hooks
    # run with whatever environment git has, and outside LLMMIXER_PTY_ALLOW.
    if where == "hooks-dir":
        hooks = repo / ".git" / "hooks"
    else:
        hooks = tmp_path / "hooks"
        hooks.mkdir()
        _git(repo, "config", "core.hooksPath", str(hooks))
    for name in ("post-checkout", "reference-transaction", "post-index-change"):
        hook = hooks / name
        hook.write_text(f"#!/bin/sh\nenv > {marker}\n")
        hook.chmod(0o755)

    output = await _completed(
        mixer, _spec(_attack("", ran=ran, marker=marker), cwd=str(repo), worktree=True)
    )
    assert _exists(ran), output
    assert not _exists(marker), "a repository hook ran: " + _read(marker)[:200]
    _no_llmmixer_branches(repo)


@pytest.mark.parametrize("how", ["config", "includeIf-onbranch"])
async def test_repository_filters_do_not_run_when_llmmixer_checks_out_the_worktree(
    mixer: MixerClient, repo: Path, tmp_path: Path, ran: Path, marker: Path, how: str
) -> None:
    (repo / ".gitattributes").write_text("* filter=evil\n")
    _git(repo, "add", ".gitattributes")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "attrs")
    if how == "config":
        config = repo / ".git" / "config"
    else:  # only on llmmixer's branches, which a look at the main checkout would miss
        config = tmp_path / "evil.cfg"
        _git(repo, "config", "includeIf.onbranch:llmmixer/**.path", str(config))
    with config.open("a") as out:
        out.write(f'[filter "evil"]\n\tsmudge = "touch {marker}; cat"\n\trequired = true\n')

    output = await _completed(
        mixer, _spec(_attack("", ran=ran, marker=marker), cwd=str(repo), worktree=True)
    )
    assert _exists(ran), output
    assert not _exists(marker), "a filter from the repository's config ran"
    _no_llmmixer_branches(repo)


async def test_git_gets_the_scrubbed_command_environment_and_no_user_config(
    mixer: MixerClient, repo: Path, agent_bin: Path, ran: Path, marker: Path
) -> None:
    output = await _completed(
        mixer, _spec(_attack("", ran=ran, marker=marker), cwd=str(repo), worktree=True)
    )
    assert _exists(ran), output
    log = agent_bin / "git-calls.jsonl"
    assert _exists(log), "llmmixer did not run git from the worker's PATH"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls
    for environ in calls:
        assert SECRET not in json.dumps(environ), "git saw the worker's provider key"
        assert environ.get("GIT_CONFIG_NOSYSTEM") == "1"
        assert environ.get("GIT_CONFIG_GLOBAL") == os.devnull
        overrides = {
            environ[f"GIT_CONFIG_KEY_{i}"]: environ[f"GIT_CONFIG_VALUE_{i}"]
            for i in range(int(environ["GIT_CONFIG_COUNT"]))
        }
        assert overrides["core.hooksPath"] == os.devnull
        assert overrides["core.fsmonitor"] == "false"


# --- the operator's settings, not the spec's ----------------------------------------


@pytest.mark.parametrize(
    "extra_worker_env",
    [pytest.param({}, id="operator-did-not-allow")],
)
async def test_a_spec_cannot_make_the_agent_skip_its_permission_checks(
    mixer: MixerClient, repo: Path, ran: Path, marker: Path
) -> None:
    spec = _spec(
        _attack("", ran=ran, marker=marker),
        cwd=str(repo),
        args=["--model", "m1", "--dangerously-skip-permissions"],
    )
    await _refused(mixer, spec, r"--dangerously-skip-permissions.*LLMMIXER_AGENT_SKIP_PERMISSIONS")
    assert not _exists(ran), "the agent ran with its permission checks off"


@pytest.mark.parametrize(
    "extra_worker_env",
    [pytest.param({ENV_AGENT_SKIP_PERMISSIONS: "1"}, id="operator-allowed")],
)
async def test_the_operator_can_let_specs_skip_permission_checks(
    mixer: MixerClient, repo: Path, ran: Path, marker: Path
) -> None:
    spec = _spec(
        _attack("", ran=ran, marker=marker),
        cwd=str(repo),
        args=["--dangerously-skip-permissions"],
    )
    output = await _completed(mixer, spec)
    assert _exists(ran)
    argv = json.loads(output.split("ARGV ", 1)[1].splitlines()[0])
    assert "--dangerously-skip-permissions" in argv


async def test_a_spec_cannot_point_the_agent_at_other_configuration(
    mixer: MixerClient, repo: Path, ran: Path, marker: Path
) -> None:
    # A settings.json the spec (or an earlier agent) wrote, with hooks in it.
    config = repo / "evil-claude"
    config.mkdir()
    spec = _spec(
        _attack("", ran=ran, marker=marker),
        cwd=str(repo),
        env={"CLAUDE_CONFIG_DIR": str(config)},
    )
    await _refused(mixer, spec, r"env: CLAUDE_CONFIG_DIR")
    assert not _exists(ran)


# Only the worker's environment holds the key (a spec may not carry one).
CHECK_KEY = """
import os
print("KEY PASSED" if os.environ.get("ANTHROPIC_API_KEY") else "NO KEY")
"""


@pytest.mark.parametrize(
    ("extra_worker_env", "expected"),
    [
        pytest.param({}, "NO KEY", id="scrubbed"),
        pytest.param(
            {"LLMMIXER_PTY_ENV_PASSTHROUGH": "ANTHROPIC_API_KEY"}, "KEY PASSED", id="passed"
        ),
    ],
)
async def test_the_agent_gets_its_provider_key_only_when_the_operator_passes_it(
    mixer: MixerClient, repo: Path, ran: Path, marker: Path, expected: str
) -> None:
    output = await _completed(
        mixer, _spec(_attack(CHECK_KEY, ran=ran, marker=marker), cwd=str(repo), worktree=True)
    )
    assert expected in output


# --- which args are the operator's -------------------------------------------------

REFUSED: list[tuple[AgentName, list[str]]] = [
    ("claude-code", ["--dangerously-skip-permissions"]),
    ("claude-code", ["--allow-dangerously-skip-permissions"]),
    ("claude-code", ["--permission-mode", "bypassPermissions"]),
    ("claude-code", ["--permission-mode=bypassPermissions"]),
    ("claude-code", ["--allowedTools", "Read", "Bash(*)"]),
    ("claude-code", ["--allowed-tools=Bash"]),
    ("claude-code", ["--settings", '{"hooks": {}}']),
    ("claude-code", ["--setting-sources", "user,project"]),
    ("claude-code", ["--mcp-config", "servers.json"]),
    ("claude-code", ["--plugin-dir", "plugins"]),
    ("claude-code", ["--add-dir", "/"]),
    ("codex", ["--dangerously-bypass-approvals-and-sandbox"]),
    ("codex", ["--yolo"]),
    ("codex", ["--full-auto"]),
    ("codex", ["--sandbox", "danger-full-access"]),
    ("codex", ["--sandbox=danger-full-access"]),
    ("codex", ["-s", "danger-full-access"]),
    ("codex", ["-sdanger-full-access"]),
    ("codex", ["-c", 'notify=["sh", "-c", "id"]']),
    ("codex", ["--config", "sandbox_mode=danger-full-access"]),
    ("codex", ["-C", "/"]),
    ("codex", ["--cd=/etc"]),
    ("gemini-cli", ["--yolo"]),
    ("gemini-cli", ["-y"]),
    ("gemini-cli", ["-dy"]),
    ("gemini-cli", ["--approval-mode", "yolo"]),
    ("gemini-cli", ["--approvalMode=yolo"]),
    ("gemini-cli", ["--allowed-tools", "run_shell_command"]),
    ("gemini-cli", ["--include-directories", "/"]),
]


@pytest.mark.parametrize(("agent", "args"), REFUSED, ids=lambda v: str(v))
def test_args_that_lift_the_agents_limits_are_the_operators(
    agent: AgentName, args: list[str], tmp_path: Path
) -> None:
    with pytest.raises(AgentArgsRefusedError) as refused:
        agent_command(agent, "hi", ["--verbose", *args], path=str(tmp_path))
    message = str(refused.value)
    assert message.startswith("args: `")
    assert args[0].split("=")[0] in message and ENV_AGENT_SKIP_PERMISSIONS in message
    assert isinstance(refused.value, CommandRefusedError)  # non-retryable


@pytest.mark.parametrize(
    ("agent", "args"), [("codex", ["--trust"]), ("gemini-cli", ["--skip-trust"])], ids=str
)
def test_args_that_trust_the_checkout_are_the_operators(
    agent: AgentName, args: list[str], tmp_path: Path
) -> None:
    with pytest.raises(AgentArgsRefusedError, match=ENV_AGENT_TRUST_FOLDERS):
        agent_command(agent, "hi", args, path=str(tmp_path))
    with pytest.raises(AgentArgsRefusedError, match=ENV_AGENT_TRUST_FOLDERS):
        agent_command(
            agent, "hi", args, path=str(tmp_path), settings=AgentSettings(skip_permissions=True)
        )
    with pytest.raises(AgentNotInstalledError):  # past the check: only the program is missing
        agent_command(
            agent, "hi", args, path=str(tmp_path), settings=AgentSettings(trust_folders=True)
        )


@pytest.mark.parametrize("trust", ["0", "1"])
async def test_gemini_is_told_to_trust_its_folder_only_by_the_operator(
    tmp_path: Path, trust: str
) -> None:
    program = tmp_path / "gemini"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    environ = {"PATH": str(tmp_path), ENV_AGENT_TRUST_FOLDERS: trust}
    policy = CommandPolicy.from_env(environ)
    call = AgentCall(workflow_id="wf", step_id="s", agent="gemini-cli", prompt="hi")
    launch = await prepare_agent(call, policy)
    assert ("GEMINI_CLI_TRUST_WORKSPACE" in launch.command.env) is (trust == "1")

    told = call.model_copy(update={"env": {"GEMINI_CLI_TRUST_WORKSPACE": "true"}})
    if trust == "1":
        await prepare_agent(told, policy)
    else:
        with pytest.raises(
            AgentArgsRefusedError,
            match=f"env: GEMINI_CLI_TRUST_WORKSPACE.*{ENV_AGENT_TRUST_FOLDERS}",
        ):
            await prepare_agent(told, policy)


@pytest.mark.parametrize(("agent", "args"), REFUSED[:3], ids=lambda v: str(v))
def test_the_operator_setting_lets_those_args_through(
    agent: AgentName, args: list[str], tmp_path: Path
) -> None:
    from llmmixer.activities.agents import AGENTS

    program = tmp_path / AGENTS[agent].executable
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    argv, _ = agent_command(
        agent, "hi", args, path=str(tmp_path), settings=AgentSettings(skip_permissions=True)
    )
    assert all(arg in argv for arg in args)


@pytest.mark.parametrize(
    ("agent", "args"),
    [
        ("claude-code", ["--model", "opus", "--permission-mode", "plan"]),
        ("claude-code", ["--allowedTools", "Read,Edit", "--setting-sources", "user"]),
        ("codex", ["-m", "o3", "-s", "read-only", "--profile", "ci"]),
        ("codex", ["-mgpt-5-codex", "-sworkspace-write"]),
        ("gemini-cli", ["-m", "gemini-2.5-pro", "--approval-mode", "default"]),
    ],
    ids=lambda v: str(v),
)
def test_ordinary_args_pass(agent: AgentName, args: list[str], tmp_path: Path) -> None:
    from llmmixer.activities.agents import AGENTS

    program = tmp_path / AGENTS[agent].executable
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    argv, _ = agent_command(agent, "hi", args, path=str(tmp_path))
    assert all(arg in argv for arg in args)


def test_a_bad_setting_names_the_variable() -> None:
    with pytest.raises(CommandRefusedError, match=r"LLMMIXER_AGENT_TRUST_FOLDERS: .maybe."):
        AgentSettings.from_env({"LLMMIXER_AGENT_TRUST_FOLDERS": "maybe"})
    assert AgentSettings.from_env({}) == AgentSettings()
    assert AgentSettings.from_env(
        {"LLMMIXER_AGENT_TRUST_FOLDERS": "1", ENV_AGENT_SKIP_PERMISSIONS: "true"}
    ) == AgentSettings(trust_folders=True, skip_permissions=True)
