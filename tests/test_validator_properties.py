"""Whatever a spec or plan holds, the validators answer with issues, never a crash or a hang.

Hypothesis generates documents from the spec's own field names (``steps``,
``needs``, ``kind``, ``provider``, ``command``, ``env``, ...) mixed with junk,
and throws them at the spec validator, the plan checker and the document
loader. Each may only return a result or raise its own error type
(``SpecError``, ``DocumentError``), within a deadline.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmmixer.core.documents import DocumentError, check_document, load_document
from llmmixer.core.plans import PlanContext, check_plan, limits_for
from llmmixer.core.spec import KINDS, DecomposeStep, Spec
from llmmixer.core.validation import SpecError, SpecIssue, find_issues, validate_spec

# Modest counts: the whole file runs in well under a minute on a busy machine,
# and the deadline is generous for the same reason; a hang blows through it.
PROPERTY = settings(
    max_examples=60,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FIELDS = [
    "id",
    "kind",
    "needs",
    "prompt",
    "system",
    "messages",
    "provider",
    "model",
    "role",
    "fallback",
    "best_of",
    "targets",
    "judge",
    "n",
    "command",
    "env",
    "cwd",
    "stdin",
    "respond",
    "agent",
    "args",
    "max_steps",
    "max_depth",
    "allow_kinds",
    "budget",
    "max_tokens",
    "max_cost_usd",
    "retry",
    "max_attempts",
    "on_failure",
    "json_schema",
    "response_format",
    "provider_options",
    "base_url",
    "api_key",
    "token",
    "steps",
    "inputs",
    "defaults",
    "routes",
    "allow",
    "output",
]
WORDS = [
    *KINDS,
    "openai",
    "anthropic",
    "gemini",
    "mistral",
    "gpt-4.1",
    "a",
    "b",
    "split",
    "skip",
    "fail",
    "pause",
    "json",
    "claude-code",
    "{{inputs.x}}",
    "{{steps.a.output}}",
    "{{steps.split.children}}",
    '{{join(steps.a*, ",")}}',
    "{{ bad",
    "sk-" + "x" * 24,
    "",
]

keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities too: the workflow validates specs from any client
    st.sampled_from(WORDS),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(keys, inner, max_size=5),
    ),
    max_leaves=25,
)
steps = st.dictionaries(keys, values, max_size=8) | st.fixed_dictionaries(
    {"id": st.sampled_from(["a", "b", "split", "x-1", "Bad Id", ""])},
    optional={
        "kind": st.sampled_from([*KINDS, "nope"]),
        "needs": st.lists(st.sampled_from(["a", "b", "split", "zz"]), max_size=3) | values,
        "prompt": st.sampled_from(WORDS) | values,
        "provider": st.sampled_from(WORDS) | values,
        "model": st.sampled_from(WORDS) | values,
        "command": st.lists(st.sampled_from(WORDS), max_size=3) | values,
        "env": st.dictionaries(st.sampled_from(["PATH", "API_KEY", "X"]), values, max_size=3),
        "fallback": values,
        "best_of": values,
        "role": values,
        "allow_kinds": values,
        "max_steps": values,
    },
)
specs = st.one_of(
    values,
    st.fixed_dictionaries(
        {"steps": st.lists(steps, max_size=5) | values},
        optional={
            "name": values,
            "inputs": values,
            "defaults": st.fixed_dictionaries(
                {}, optional={"provider": values, "model": values, "retry": values}
            )
            | values,
            "routes": st.dictionaries(st.sampled_from(["r", "reviewer"]), values, max_size=2),
            "allow": values,
            "budget": values,
            "output": values,
        },
    ),
)


@PROPERTY
@given(specs)
def test_the_spec_validator_answers_any_document_with_issues(raw: Any) -> None:
    issues = list(find_issues(raw))
    assert all(isinstance(issue, SpecIssue) for issue in issues)
    assert all(isinstance(str(issue), str) for issue in issues)
    try:
        spec = validate_spec(raw)
    except SpecError as error:
        assert error.issues
    else:
        assert isinstance(spec, Spec) and not issues


def plan_context() -> PlanContext:
    spec = validate_spec(
        {
            "name": "plans",
            "inputs": {"diff": "d"},
            "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
            "routes": {"reviewer": [{"provider": "anthropic", "model": "claude-opus-5-5"}]},
            "allow": [{"provider": "openai"}, {"provider": "anthropic"}],
            "steps": [
                {"id": "fetch", "prompt": "get {{inputs.diff}}"},
                {
                    "id": "split",
                    "kind": "decompose",
                    "needs": ["fetch"],
                    "prompt": "split",
                    "allow_kinds": ["approval", "decompose"],
                    "max_depth": 2,
                },
            ],
        }
    )
    step = spec.step("split")
    assert isinstance(step, DecomposeStep)
    return PlanContext(
        step_id="split",
        limits=limits_for(step),
        spec=spec,
        taken_ids=frozenset(s.id for s in spec.steps),
        context_ids=("fetch",),
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


plan_texts = st.one_of(
    st.lists(steps, max_size=4).map(lambda items: _dumps({"steps": items})),
    values.map(_dumps),
    specs.map(_dumps),
    st.lists(steps, max_size=3).map(lambda items: "```json\n" + _dumps({"steps": items}) + "\n```"),
    st.text(alphabet='{}[]":,` \n\\ujson0123', max_size=200),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: "```\n" + "\n" * n + "x"),
    st.text(max_size=100),
)


@PROPERTY
@given(plan_texts)
def test_the_plan_checker_answers_any_reply_with_steps_or_reasons(text: str) -> None:
    planned, issues = check_plan(text, plan_context())
    assert bool(planned) != bool(issues)
    assert all(isinstance(issue, SpecIssue) and str(issue) for issue in issues)


yaml_texts = st.one_of(
    st.text(alphabet="abc:-[]{},&*!|>'\"#?<=\n .0123456789", max_size=200),
    st.text(max_size=200),
    values.map(lambda value: yaml.safe_dump(value, allow_unicode=True)),
    values.map(_dumps),
)


@PROPERTY
@given(yaml_texts)
def test_the_loader_returns_plain_data_or_a_document_error(text: str) -> None:
    try:
        value = load_document(text, source="the spec")
    except DocumentError as error:
        assert str(error)
        return
    # Plain data only: what JSON can carry, within the limits.
    check_document(value, source="the spec")
    assert json.loads(json.dumps(value)) == value


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@PROPERTY
@given(json_values)
def test_the_loader_reads_back_what_yaml_and_json_write(value: Any) -> None:
    # A document is a mapping (a bare `1e-05` is text to YAML 1.1, a number to JSON).
    document = {"value": value}
    assert load_document(json.dumps(document), source="the spec") == document
    assert load_document(yaml.safe_dump(document), source="the spec") == document
