"""Static validation: every class of error, each naming step and field, all at once."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llmmixer.client.specfile import read_spec
from llmmixer.core.validation import SpecError, find_issues, parse_spec_shape, validate_spec

GOOD: dict[str, Any] = {
    "name": "review",
    "inputs": {"diff": "x"},
    "defaults": {"provider": "anthropic", "model": "claude-sonnet-5-5"},
    "steps": [
        {"id": "plan", "prompt": "Review {{inputs.diff}}"},
        {"id": "tests", "kind": "pty", "command": ["pytest", "-q"]},
        {"id": "gate", "kind": "approval", "needs": ["plan", "tests"]},
        {
            "id": "summary",
            "provider": "gemini",
            "model": "gemini-2.5-flash",
            "needs": ["gate"],
            "prompt": "{{steps.plan.output}} {{steps.tests.output}}",
        },
    ],
    "output": "{{steps.summary.output}}",
}


def issues_of(spec: Any) -> list[str]:
    return [str(issue) for issue in find_issues(spec)]


def mutate(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD)
    spec.update(changes)
    return spec


def test_the_contract_example_is_valid() -> None:
    spec = validate_spec(GOOD)
    assert [step.id for step in spec.steps] == ["plan", "tests", "gate", "summary"]
    assert spec.step("plan").kind == "llm"  # kind defaults to llm


def test_a_cycle_is_named_with_its_path() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][0]["needs"] = ["summary"]
    assert any(
        line.startswith("step ") and "needs: cycle" in line and "plan" in line and "gate" in line
        for line in issues_of(spec)
    ), issues_of(spec)


def test_duplicate_and_malformed_ids() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"].append({"id": "plan", "prompt": "again"})
    spec["steps"].append({"id": "Bad Id", "prompt": "x"})
    lines = issues_of(spec)
    assert "step plan: id: `plan` is used by more than one step: give each a unique id" in lines
    assert any(line.startswith("step #6: id: 'Bad Id' is not a valid id") for line in lines)


def test_unknown_needs_lists_the_known_steps() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][2]["needs"] = ["plan", "nope"]
    assert any(
        line.startswith("step gate: needs.1: unknown step 'nope'") and "plan" in line
        for line in issues_of(spec)
    )


def test_reference_to_a_step_that_is_not_an_ancestor() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][0]["prompt"] = "{{steps.tests.output}}"
    lines = issues_of(spec)
    assert any(
        line.startswith("step plan: prompt: {{steps.tests.output}} reads step 'tests'")
        and "add 'tests' to `needs`" in line
        for line in lines
    ), lines


def test_transitive_ancestors_may_be_read() -> None:
    spec = copy.deepcopy(GOOD)
    # summary needs gate which needs plan: plan is a transitive ancestor
    assert issues_of(spec) == []


def test_unknown_input_and_unknown_template() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][0]["prompt"] = "{{inputs.missing}} {{ whatever }}"
    lines = issues_of(spec)
    assert any("reads input 'missing'" in line and "--input missing=" in line for line in lines)
    assert any("unknown template {{ whatever }}" in line for line in lines)


def test_unknown_kind_and_provider() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][0]["kind"] = "shell"
    spec["steps"][3]["provider"] = "mistral"
    lines = issues_of(spec)
    assert (
        "step plan: kind: unknown kind 'shell': use one of llm, pty, approval, decompose, agent"
        in lines
    )
    assert (
        "step summary: provider: unknown provider 'mistral': use one of anthropic, openai, gemini"
        in lines
    )


def test_missing_required_fields() -> None:
    spec = copy.deepcopy(GOOD)
    del spec["defaults"]
    spec["steps"][0] = {"id": "plan"}
    spec["steps"][1] = {"id": "tests", "kind": "pty"}
    lines = issues_of(spec)
    assert "step plan: provider: no provider: set `provider` on the step or in `defaults`" in lines
    assert "step plan: model: no model: set `model` on the step or in `defaults`" in lines
    assert "step plan: prompt: an llm step needs `prompt` or `messages`" in lines
    assert "step tests: command: is required: add it" in lines


def test_typo_in_a_field_is_refused() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][0]["promt"] = "typo"
    assert "step plan: promt: is not a known field: remove it or check its spelling" in issues_of(
        spec
    )


def test_secret_looking_fields_and_values_are_refused() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][0]["api_key"] = "abc"
    spec["steps"][1]["env"] = {"OPENAI_KEY": "sk-proj-abcdefghijklmnopqrstuvwx"}
    lines = issues_of(spec)
    assert any(line.startswith("step plan: api_key: secret-looking field") for line in lines)
    assert any(
        line.startswith("step tests: env.OPENAI_KEY: looks like a credential") for line in lines
    )
    # the secret value itself is never echoed back
    assert not any("abcdefghijklmnop" in line for line in lines)


def test_max_tokens_is_not_mistaken_for_a_secret() -> None:
    assert issues_of(mutate(defaults={**GOOD["defaults"], "max_tokens": 100})) == []


def test_all_errors_are_reported_at_once() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][0]["kind"] = "shell"
    spec["steps"][2]["needs"] = ["nope"]
    spec["max_parallel"] = 0
    with pytest.raises(SpecError) as caught:
        validate_spec(spec)
    assert len(caught.value.issues) >= 3
    assert "spec: max_parallel:" in str(caught.value)


def test_top_level_shape_errors() -> None:
    assert issues_of([]) == ["spec: (document): the spec must be a mapping with `name` and `steps`"]
    assert "spec: steps: a spec needs a non-empty list of steps under `steps`" in issues_of(
        {"name": "x", "steps": []}
    )


def test_yaml_and_json_text_load_to_the_same_spec(tmp_path: Any) -> None:
    import json

    import yaml

    as_yaml = tmp_path / "spec.yaml"
    as_yaml.write_text(yaml.safe_dump(GOOD))
    as_json = tmp_path / "spec.json"
    as_json.write_text(json.dumps(GOOD))
    assert read_spec(as_yaml) == read_spec(as_json) == read_spec(json.dumps(GOOD)) == GOOD


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(SpecError) as caught:
        read_spec("name: x\nsteps:\n  - id: [unclosed\n")
    assert "not valid YAML or JSON at line" in str(caught.value)


def test_spec_lists_every_model_it_names_for_price_checks() -> None:
    spec = validate_spec(
        {
            "defaults": {"provider": "openai", "model": "gpt-4.1"},
            "routes": {"code": [{"provider": "anthropic", "model": "claude-opus-4-1"}]},
            "allow": [{"provider": "gemini", "model": "gemini-2.5-pro"}, {"provider": "openai"}],
            "steps": [
                {"id": "a", "prompt": "x", "fallback": [{"provider": "gemini", "model": "g-f"}]},
                {"id": "b", "role": "code", "prompt": "x"},
                {
                    "id": "c",
                    "prompt": "x",
                    "model": "gpt-4.1-mini",
                    "best_of": {
                        "n": 2,
                        "targets": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
                        "judge": {"provider": "openai", "model": "o3"},
                    },
                },
                {"id": "d", "kind": "decompose", "prompt": "x", "budget": {"max_cost_usd": 2}},
            ],
        }
    )
    assert spec.has_cost_limit()
    assert spec.models() == {
        ("openai", "gpt-4.1"),  # a and d, from the defaults
        ("gemini", "g-f"),
        ("anthropic", "claude-opus-4-1"),  # b, through its route
        ("gemini", "gemini-2.5-pro"),
        ("openai", "gpt-4.1-mini"),
        ("anthropic", "claude-haiku-4-5"),
        ("openai", "o3"),
    }


# ---- what a replay reads: the shape only -------------------------------------


def test_the_shape_reads_every_valid_spec_as_validate_spec_does() -> None:
    assert parse_spec_shape(copy.deepcopy(GOOD)) == validate_spec(copy.deepcopy(GOOD))


def test_the_shape_checks_no_rule_so_a_tightened_rule_cannot_refuse_a_recorded_run() -> None:
    # Refused by the rules (unknown need, no provider, a secret), but well formed:
    # a replay of a run started when such a spec passed must still read it.
    spec = mutate(defaults={}, description="sk-ant-" + "a" * 30)
    spec["steps"] = [*spec["steps"], {"id": "late", "needs": ["nope"], "prompt": "x"}]
    assert issues_of(spec)
    assert [s.id for s in parse_spec_shape(spec).steps][-1] == "late"


def test_a_shape_error_names_step_and_field() -> None:
    spec = mutate(defaults={"timeout_s": -1}, bogus=1)
    spec["steps"] = [
        {"id": "a", "kind": "pty"},
        {"id": "b", "kind": "teleport"},
        "not a step",
        {"id": "c", "prompt": 3},
    ]
    with pytest.raises(SpecError) as caught:
        parse_spec_shape(spec)
    assert str(caught.value).splitlines() == [
        "spec: defaults.timeout_s: input should be greater than 0",
        "step a: command: is required: add it",
        "step b: kind: unknown kind 'teleport': use one of llm, pty, approval, decompose, agent",
        "step #3: (step): each step must be a mapping with `id`",
        "step c: prompt: input should be a valid string",
        "spec: bogus: is not a known field: remove it or check its spelling",
    ]
    with pytest.raises(SpecError, match=r"^spec: steps: a spec needs a non-empty list"):
        parse_spec_shape(mutate(steps=[]))
    with pytest.raises(SpecError, match=r"^spec: \(document\): the spec must be a mapping"):
        parse_spec_shape(["steps"])


def test_provider_options_that_move_a_request_are_refused_for_every_provider_of_the_chain() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][3]["provider_options"] = {
        "generation_config": {"http_options": {"base_url": "http://evil.example"}}
    }
    spec["steps"][3]["fallback"] = [{"provider": "anthropic", "model": "claude-sonnet-5-5"}]
    found = issues_of(spec)
    assert any(
        line.startswith(
            "step summary: provider_options.generation_config.http_options: not allowed"
        )
        and "(the step's chain calls gemini)" in line
        for line in found
    ), found
    # The fallback gets the same options, and Anthropic takes no generation_config.
    assert any("(the step's chain calls anthropic)" in line for line in found), found


def test_a_model_name_that_would_change_the_request_path_is_refused() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][3]["model"] = "gemini-2.5-flash/%2e%2e/files"
    assert any(
        line.startswith("step summary: model: gemini model name") for line in issues_of(spec)
    )


def test_generation_settings_in_provider_options_still_validate() -> None:
    spec = copy.deepcopy(GOOD)
    spec["steps"][3]["provider_options"] = {"generation_config": {"top_k": 20}}
    assert issues_of(spec) == []
