"""Plans of decompose steps, routes and aggregation in specs: pure checks, no Temporal."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmmixer.activities.dry_run import dry_run_reply
from llmmixer.core.contracts import ChatMessage, LlmCall
from llmmixer.core.plans import (
    PlanContext,
    check_plan,
    limits_for,
    plan_request,
    planner_prompt,
)
from llmmixer.core.spec import DecomposeStep, Spec
from llmmixer.core.validation import find_issues, validate_spec
from llmmixer.workflows.dag import RunState, StepNode
from llmmixer.workflows.records import BudgetLimits, Candidate, StepStatus


def base_spec(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "plans",
        "inputs": {"diff": "d"},
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "routes": {
            "reviewer": [
                {"provider": "anthropic", "model": "claude-opus-5-5"},
                {"provider": "openai", "model": "gpt-4.1"},
            ],
            "checker": [{"provider": "gemini", "model": "gemini-2.5-flash"}],
        },
        "steps": [
            {"id": "fetch", "prompt": "get {{inputs.diff}}"},
            {"id": "split", "kind": "decompose", "needs": ["fetch"], "prompt": "split"},
            {"id": "merge", "needs": ["split"], "prompt": "{{steps.split.children}}"},
        ],
    }
    spec.update(extra)
    return spec


def context(spec: Spec, step_id: str = "split", **limits: Any) -> PlanContext:
    step = spec.step(step_id)
    assert isinstance(step, DecomposeStep)
    step = step.model_copy(update=limits)
    return PlanContext(
        step_id=step_id,
        limits=limits_for(step),
        spec=spec,
        taken_ids=frozenset(s.id for s in spec.steps),
        context_ids=("fetch",),
    )


def plan(*steps: dict[str, Any]) -> str:
    return json.dumps({"steps": list(steps)})


def problems(text: str, ctx: PlanContext) -> list[str]:
    steps, issues = check_plan(text, ctx)
    assert not steps or not issues
    return [str(issue) for issue in issues]


def test_a_valid_plan_comes_back_with_kinds_filled_in() -> None:
    spec = validate_spec(base_spec())
    steps, issues = check_plan(
        plan(
            {"id": "a", "role": "reviewer", "prompt": "{{inputs.diff}} {{steps.fetch.output}}"},
            {"id": "b", "provider": "gemini", "model": "gemini-2.5-pro", "prompt": "x"},
            {"id": "c", "needs": ["a", "b"], "prompt": "{{steps.a.output}} {{steps.b.output}}"},
        ),
        context(spec),
    )
    assert issues == []
    assert [s["kind"] for s in steps] == ["llm", "llm", "llm"]
    assert steps[2]["needs"] == ["a", "b"]  # the implicit need is not written into the plan


def test_a_fenced_reply_is_read_like_the_json_activity_does() -> None:
    spec = validate_spec(base_spec())
    text = "```json\n" + plan({"id": "a", "prompt": "x"}) + "\n```"
    assert check_plan(text, context(spec))[1] == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", "plan: (document): the reply is not JSON"),
        ('{"tasks": []}', 'plan: (document): reply with one JSON object: {"steps"'),
        ('{"steps": []}', "plan: (document): the plan has no steps"),
        ('{"steps": [{"id": "a", "prompt": "x"}], "note": 1}', "only `steps` belongs"),
    ],
)
def test_replies_that_are_not_plans(text: str, expected: str) -> None:
    [problem] = problems(text, context(validate_spec(base_spec())))
    assert problem.startswith(expected) or expected in problem


def test_the_spec_validator_runs_on_the_plan() -> None:
    lines = problems(
        plan(
            {"id": "a", "provider": "mistral", "model": "m", "prompt": "x"},
            {"id": "b", "prompt": "{{steps.nope.output}}"},
            {"id": "c", "prompt": "{{steps.d.output}}"},
            {"id": "d", "prompt": "x"},
            {"id": "b", "prompt": "again"},
            {"id": "e", "role": "boss", "prompt": "x"},
            {"id": "f", "role": "reviewer", "model": "gpt-4.1", "prompt": "x"},
            {"id": "g", "prompt": "x", "api_key": "nope"},
        ),
        context(validate_spec(base_spec())),
    )
    expected = [
        "step a: provider: unknown provider 'mistral'",
        "step b: prompt: {{steps.nope.output}} reads unknown step 'nope'",
        "step c: prompt: {{steps.d.output}} reads step 'd', which is not among this step's",
        "step b: id: `b` is used by more than one step",
        "step e: role: unknown role 'boss': use one of checker, reviewer",
        "step f: model: a step with `role` gets its model from `routes`",
        "step g: api_key: secret-looking field",
    ]
    for line in expected:
        assert any(found.startswith(line) for found in lines), (line, lines)


def test_cycles_in_a_plan_are_named() -> None:
    lines = problems(
        plan(
            {"id": "a", "needs": ["b"], "prompt": "x"},
            {"id": "b", "needs": ["a"], "prompt": "x"},
        ),
        context(validate_spec(base_spec())),
    )
    assert any("needs: cycle" in line for line in lines), lines


def test_ids_must_be_new_to_the_run_and_needs_stay_inside_the_plan_or_its_context() -> None:
    lines = problems(
        plan(
            {"id": "merge", "prompt": "x"},
            {"id": "a", "needs": ["fetch"], "prompt": "{{steps.fetch.output}}"},
            {"id": "b", "needs": ["elsewhere"], "prompt": "x"},
        ),
        context(validate_spec(base_spec())),
    )
    assert "step merge: id: `merge` is already a step of this run: choose another id" in lines
    assert any(line.startswith("step b: needs.0: unknown step 'elsewhere'") for line in lines)
    assert not any(line.startswith("step a:") for line in lines), lines


def test_max_steps_refuses_an_oversized_plan() -> None:
    spec = validate_spec(base_spec())
    steps = [{"id": f"s{i}", "prompt": "x"} for i in range(4)]
    [line] = problems(plan(*steps), context(spec, max_steps=3))
    assert line == "step plan: steps: 4 steps is too many: this plan may have at most 3"


def test_kinds_default_to_llm_and_allow_kinds_adds_them() -> None:
    spec = validate_spec(base_spec())
    text = plan(
        {"id": "a", "prompt": "x"},
        {"id": "ok", "kind": "approval", "needs": ["a"]},
        {"id": "sh", "kind": "pty", "command": ["ls"]},
    )
    lines = problems(text, context(spec))
    assert "step ok: kind: kind 'approval' is not allowed in this plan: use llm" in lines
    assert "step sh: kind: kind 'pty' is not allowed in this plan: use llm" in lines
    lines = problems(text, context(spec, allow_kinds=["approval"], allow_fields=["command"]))
    assert lines == ["step sh: kind: kind 'pty' is not allowed in this plan: use llm, approval"]
    ok = context(spec, allow_kinds=["approval", "pty"], allow_fields=["command"])
    assert problems(text, ok) == []


def test_nesting_stops_at_max_depth() -> None:
    spec = validate_spec(base_spec())
    nested = plan({"id": "deeper", "kind": "decompose", "prompt": "split again"})
    [line] = problems(nested, context(spec, allow_kinds=["decompose"]))
    assert line.startswith("step deeper: kind: plans may not nest this deep (max_depth)")
    assert problems(nested, context(spec, allow_kinds=["decompose"], max_depth=2)) == []
    # a nested decompose step never gets more room than its parent left it
    outer = limits_for(DecomposeStep(id="o", prompt="x", max_depth=2, allow_kinds=["decompose"]))
    inner = limits_for(
        DecomposeStep(id="i", prompt="x", max_depth=5, allow_kinds=["decompose", "pty"]), outer
    )
    assert (inner.max_depth, inner.kinds) == (1, ("llm", "decompose"))


def test_allow_limits_what_a_plan_may_name_but_not_roles() -> None:
    spec = validate_spec(
        base_spec(allow=[{"provider": "anthropic"}, {"provider": "openai", "model": "gpt-4.1"}])
    )
    lines = problems(
        plan(
            {"id": "a", "role": "checker", "prompt": "x"},  # the owner chose gemini: fine
            {"id": "b", "provider": "anthropic", "model": "claude-opus-4-1", "prompt": "x"},
            {"id": "c", "provider": "openai", "model": "gpt-4.1", "prompt": "x"},
            {"id": "d", "provider": "openai", "model": "o3", "prompt": "x"},
            {
                "id": "e",
                "provider": "anthropic",
                "model": "claude-haiku-4-5",
                "prompt": "x",
                "fallback": [{"provider": "gemini", "model": "gemini-2.5-pro"}],
            },
        ),
        context(spec),
    )
    assert lines == [
        "step d: provider: openai/o3 is not allowed by this spec: use anthropic (any model), "
        "openai/gpt-4.1",
        "step e: fallback.0: gemini/gemini-2.5-pro is not allowed by this spec: use "
        "anthropic (any model), openai/gpt-4.1",
    ]


def test_planner_prompt_describes_the_limits_and_carries_the_last_refusal() -> None:
    spec = validate_spec(base_spec())
    ctx = context(spec, max_steps=4)
    prompt = planner_prompt("Review the diff", ctx, "step a: kind: not allowed")
    assert prompt.startswith("Review the diff")
    assert "At most 4 steps" in prompt and "checker, reviewer" in prompt
    assert "Finished steps it may read the same way: fetch" in prompt
    assert "split-1" in prompt and "merge" in prompt
    assert prompt.endswith(
        "Your previous plan was refused:\nstep a: kind: not allowed\n"
        "Fix every problem and reply with the whole plan again."
    )


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"routes": {}},
        {"routes": {}, "allow": [{"provider": "anthropic"}, {"provider": "gemini"}]},
    ],
)
def test_the_dry_run_planner_answers_with_a_valid_parallel_plan(extra: dict[str, Any]) -> None:
    raw = base_spec(**extra)
    spec = validate_spec(raw)
    ctx = context(spec)
    prompt = planner_prompt("Split {{ this }} diff", ctx)
    call = LlmCall(
        workflow_id="wf",
        step_id="split",
        provider="openai",
        model="gpt-4.1-mini",
        messages=[ChatMessage(role="user", content=prompt)],
        response_format="json",
        plan=plan_request(ctx),
    )
    text, _ = dry_run_reply(call)
    steps, issues = check_plan(text, ctx)
    assert issues == []
    assert len(steps) == 3 and all(not s.get("needs") for s in steps)
    named = {s.get("role") or s.get("provider") for s in steps}
    assert len(named) >= 2  # spread over several roles or providers


def test_spec_references_after_a_decompose_step_may_name_planned_steps() -> None:
    spec = base_spec()
    spec["steps"].append(
        {
            "id": "late",
            "needs": ["merge"],
            "prompt": '{{steps.split-1.output}} {{join(steps.split-*, "\\n")}}',
        }
    )
    spec["steps"].append({"id": "early", "prompt": "{{steps.split-1.output}}"})
    spec["steps"].append({"id": "joined", "needs": ["fetch"], "prompt": '{{join(steps.z*, ",")}}'})
    spec["steps"].append({"id": "kids", "needs": ["fetch"], "prompt": "{{steps.fetch.children}}"})
    spec["output"] = "{{steps.split-2.output}}"
    lines = [str(issue) for issue in find_issues(spec)]
    assert lines == [
        "step early: prompt: {{steps.split-1.output}} reads unknown step 'split-1'",
        'step joined: prompt: {{join(steps.z*, ",")}} matches none of this step\'s `needs` '
        "(directly or transitively): add a step whose id starts with 'z' to `needs`",
        "step kids: prompt: {{steps.fetch.children}} reads the sub-steps of 'fetch', "
        "which is not a decompose step",
    ]


def test_routes_and_best_of_are_checked() -> None:
    spec = base_spec(routes={"r": [{"provider": "bogus", "model": "m"}], "empty": []})
    spec["steps"][0]["best_of"] = {
        "n": 2,
        "targets": [{"provider": "nope", "model": "m"}],
        "judge": {"provider": "gone", "model": "m"},
    }
    lines = [str(issue) for issue in find_issues(spec)]
    assert (
        "spec: routes.r.0.provider: unknown provider 'bogus': use one of anthropic, openai, gemini"
        in lines
    )
    assert "spec: routes.empty: a route needs at least one provider/model" in lines
    assert any(line.startswith("step fetch: best_of.targets.0.provider: unknown") for line in lines)
    assert any(line.startswith("step fetch: best_of.judge.provider: unknown") for line in lines)


def test_plan_steps_join_the_dag_after_their_parent_and_before_its_dependants() -> None:
    state = RunState(
        "r",
        [
            StepNode("fetch", "llm", ()),
            StepNode("split", "decompose", ("fetch",)),
            StepNode("merge", "llm", ("split",)),
            StepNode("other", "llm", ()),
        ],
        dry_run=False,
    )
    for step_id in ("fetch", "split"):
        state.records[step_id].status = StepStatus.COMPLETED
    state.add_steps(
        "split",
        [
            StepNode("a", "llm", ("split",), parent="split", definition={"id": "a"}),
            StepNode("b", "llm", ("a", "split"), parent="split", definition={"id": "b"}),
        ],
    )
    assert list(state.nodes) == ["fetch", "split", "a", "b", "merge", "other"]
    assert list(state.records) == list(state.nodes)
    assert state.nodes["merge"].needs == ("split", "a", "b")
    assert state.records["a"].parent == "split"
    assert state.ready([], None) == ["a", "other"]
    assert state.children() == {"split": ["a", "b"]}
    assert state.ancestors("b") == {"a", "split", "fetch"}
    assert state.lineage("b") == ["split"]
    with pytest.raises(ValueError, match="already in the run"):
        state.add_steps("split", [StepNode("merge", "llm", ())])
    restored = RunState("r", [], dry_run=False)
    restored.restore(state.snapshot())
    assert restored.nodes == state.nodes and restored.children() == state.children()


def test_budgets_count_the_run_or_a_decompose_steps_sub_steps() -> None:
    state = RunState(
        "r", [StepNode("split", "decompose", ()), StepNode("solo", "llm", ())], dry_run=False
    )
    state.add_steps("split", [StepNode("a", "llm", ("split",), parent="split")])
    state.records["solo"].usage.input_tokens = 500
    state.records["a"].usage.output_tokens = 60
    state.records["a"].cost_usd = 0.5
    assert state.spent() == (560, 0.5)
    assert state.spent("split") == (60, 0.5)
    state.budgets["split"] = BudgetLimits(max_tokens=100)
    assert state.over_budget("a") is None and state.over_budget("solo") is None
    state.budgets[""] = BudgetLimits(max_cost_usd=0.5)
    hold = state.over_budget("solo")
    assert hold is not None and hold.reason().startswith("budget: $0.5 spent of max_cost_usd 0.5")
    state.budgets[""] = BudgetLimits(max_cost_usd=1)
    state.records["a"].usage.output_tokens = 100
    held_by_split = state.over_budget("a")
    assert held_by_split is not None and held_by_split.reason().startswith(
        "budget: 100 tokens spent of max_tokens 100 (the budget of split)"
    )
    assert state.over_budget("solo") is None


def test_best_of_candidates_are_cut_in_the_answer_too() -> None:
    state = RunState("r", [StepNode("pick", "llm", ())], dry_run=False, workflow_id="wf-9")
    record = state.records["pick"]
    record.candidates = [
        Candidate(provider="openai", model="m", output="c" * 400_000) for _ in range(3)
    ]
    answer = state.progress()
    assert len(answer.model_dump_json()) < 256 * 1024
    assert "the whole text: llmmixer audit wf-9" in (
        answer.steps["pick"].candidates[0].output or ""
    )
    assert state.records["pick"].candidates[0].output == "c" * 400_000


# ---- plans may not move requests or commands (allow_fields) -----------------

EVIL = "http://evil.example"


@pytest.mark.parametrize(
    ("step", "field"),
    [
        (
            {
                "id": "a",
                "provider": "gemini",
                "model": "gemini-2.5-flash",
                "prompt": "x",
                "provider_options": {"generation_config": {"top_k": 5}},
            },
            "provider_options",
        ),
        ({"id": "a", "prompt": "x", "base_url": EVIL}, "base_url"),
        (
            {
                "id": "a",
                "prompt": "x",
                "fallback": [{"provider": "openai", "model": "gpt-4.1", "base_url": EVIL}],
            },
            "fallback.0.base_url",
        ),
        (
            {
                "id": "a",
                "prompt": "x",
                "best_of": {"targets": [{"provider": "openai", "model": "o3", "base_url": EVIL}]},
            },
            "best_of.targets.0.base_url",
        ),
        (
            {"id": "a", "kind": "pty", "command": ["make"], "env": {"LD_PRELOAD": "/tmp/x.so"}},
            "env",
        ),
        ({"id": "a", "kind": "pty", "command": ["make"], "cwd": "/"}, "cwd"),
        ({"id": "a", "kind": "agent", "agent": "codex", "prompt": "x", "cwd": "/"}, "cwd"),
        (
            {"id": "a", "kind": "agent", "agent": "codex", "prompt": "x", "args": ["--yolo"]},
            "args",
        ),
    ],
)
def test_plans_may_not_move_requests_or_commands(step: dict[str, Any], field: str) -> None:
    spec = validate_spec(base_spec())
    # pty and agent steps are allowed, and so is `command`: only `field` is refused.
    ctx = context(spec, allow_kinds=["pty", "agent"], allow_fields=["command"])
    [line] = problems(plan(step), ctx)
    name = field.rsplit(".", 1)[-1]
    assert line.startswith(f"step a: {field}: plans may not set `{name}` unless decompose step")
    assert f"add {name!r} to `allow_fields` of decompose step 'split'" in line
    # The spec's owner may allow it.
    allowed = context(spec, allow_kinds=["pty", "agent"], allow_fields=["command", name])
    assert problems(plan(step), allowed) == []


def test_provider_options_that_move_a_request_are_refused_even_when_allowed() -> None:
    spec = validate_spec(base_spec())
    step = {
        "id": "a",
        "provider": "gemini",
        "model": "gemini-2.5-flash",
        "prompt": "x",
        "provider_options": {"generation_config": {"http_options": {"base_url": EVIL}}},
    }
    allowed = context(spec, allow_fields=["provider_options"])
    [line] = problems(plan(step), allowed)
    assert line.startswith("step a: provider_options.generation_config.http_options: not allowed")


def test_a_pty_step_needs_command_in_allow_fields_not_only_allow_kinds() -> None:
    spec = validate_spec(base_spec())
    pty = plan({"id": "sh", "kind": "pty", "command": ["rm", "-rf", "/"]})
    [line] = problems(pty, context(spec, allow_kinds=["pty"]))
    assert line.startswith("step sh: command: a pty step runs `command`, which this plan may not")
    assert "(`allow_kinds: [pty]` alone is not enough)" in line
    assert "add 'command' to its `allow_fields`" in line
    assert problems(pty, context(spec, allow_kinds=["pty"], allow_fields=["command"])) == []


def test_empty_values_move_nothing_and_are_accepted() -> None:
    spec = validate_spec(base_spec())
    text = plan({"id": "a", "prompt": "x", "base_url": None, "provider_options": {}})
    assert problems(text, context(spec)) == []


def test_a_nested_decompose_step_never_gets_more_fields_than_its_parent() -> None:
    outer = limits_for(
        DecomposeStep(
            id="o",
            prompt="x",
            max_depth=2,
            allow_kinds=["decompose", "pty"],
            allow_fields=["command", "cwd"],
        )
    )
    assert outer.fields == ("cwd", "command")
    inner = limits_for(
        DecomposeStep(
            id="i",
            prompt="x",
            allow_kinds=["pty"],
            allow_fields=["command", "env", "base_url"],
        ),
        outer,
    )
    assert inner.fields == ("command",)
    assert limits_for(DecomposeStep(id="d", prompt="x")).fields == ()


def test_allow_fields_outside_the_list_are_refused_in_the_spec() -> None:
    raw = base_spec()
    raw["steps"][1]["allow_fields"] = ["base_url", "api_key"]
    lines = [str(issue) for issue in find_issues(raw)]
    assert any(line.startswith("step split: allow_fields.1: use 'base_url'") for line in lines)


def test_the_planner_is_told_which_fields_it_may_not_set() -> None:
    spec = validate_spec(base_spec())
    prompt = planner_prompt("Split", context(spec))
    assert "Do not set base_url, provider_options, env, cwd, command, args, tools" in prompt
    request = plan_request(context(spec, allow_kinds=["pty"], allow_fields=["command"]))
    assert request.fields == ["command"]
    prompt = planner_prompt("Split", context(spec, allow_kinds=["pty"], allow_fields=["command"]))
    assert '"kind": "pty", "command": [' in prompt
    assert (
        "Do not set base_url, provider_options, env, cwd, args, tools: this plan may not" in prompt
    )
