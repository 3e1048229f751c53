"""``llmmixer estimate``: a spec's cost range before it runs, offline."""

from __future__ import annotations

import asyncio
import inspect
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import tiktoken_ext.openai_public as openai_public
from fakes.provider_server import FakeProviderServer, Reply
from temporalio.testing import WorkflowEnvironment

from llmmixer.activities.pricing import PriceTable
from llmmixer.client.cli import main
from llmmixer.client.estimate import (
    ASSUMED_MAX_TOKENS,
    Estimate,
    StepEstimate,
    estimate_spec,
    format_estimate,
)
from llmmixer.client.files import File
from llmmixer.client.mixer import MixerClient
from llmmixer.client.specfile import prepare_spec
from llmmixer.client.tokens import _PATTERNS, _SPECIAL, count_tokens, encoding, image_tokens
from llmmixer.core.attachments import image_dimensions, pdf_page_count

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
PRICES = PriceTable.load()


def _estimate(body: dict[str, Any], inputs: dict[str, Any] | None = None) -> Estimate:
    return estimate_spec(prepare_spec(body, inputs=inputs)[1], PRICES)


def _step(estimate: Estimate, step_id: str) -> StepEstimate:
    return next(s for s in estimate.steps if s.step == step_id)


def _one(step: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"name": "t", "steps": [{"id": "a", **step}], **spec}


GPT = {"provider": "openai", "model": "gpt-4.1-mini", "max_tokens": 500}


# ---- tokens ------------------------------------------------------------------------


def test_the_shipped_encodings_are_tiktokens_own_and_load_offline() -> None:
    # The split patterns and special tokens are those tiktoken defines; the
    # data files are checked against the SHA-256 tiktoken expects on load.
    for name in ("o200k_base", "cl100k_base"):
        source = inspect.getsource(getattr(openai_public, name))
        assert _PATTERNS[name] in source or all(
            part in source for part in _PATTERNS[name].split("|")
        )
        for token, rank in _SPECIAL[name].items():
            assert f"{rank}" in source
            assert token.strip("<|>").upper() in source
    # Token ids OpenAI's tokenizer gives for these strings.
    assert encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert encoding("cl100k_base").encode("hello world") == [15339, 1917]


def test_an_openai_steps_input_is_its_rendered_prompts_exact_token_count() -> None:
    text = "Summarise the incident report below in five bullet points.\n" + (
        "The database failover took 14 minutes because the replica's WAL lagged. " * 40
    )
    spec = _one({**GPT, "system": "Be terse.", "prompt": "{{inputs.report}}"})
    spec["inputs"] = {"report": ""}
    estimate = _estimate(spec, {"report": text})
    tokens = _step(estimate, "a").input_tokens
    o200k = encoding("o200k_base")
    # What OpenAI counts for the chat request: each message plus its framing.
    counted = len(o200k.encode("Be terse.")) + len(o200k.encode(text)) + 2 * (3 + 1) + 3
    assert tokens.low == tokens.expected == counted
    assert "o200k_base" in format_estimate(estimate)


def test_other_providers_are_counted_by_a_labelled_approximation() -> None:
    count = count_tokens("anthropic", "claude-haiku-4-5", None, ["a fairly ordinary sentence"])
    assert count.low < count.expected < count.high
    assert "approximation" in count.method
    estimate = _estimate(
        _one({"provider": "anthropic", "model": "claude-haiku-4-5", "prompt": "hi there"})
    )
    assert "approximation" in format_estimate(estimate)


# ---- bounds ------------------------------------------------------------------------


def test_min_expected_and_max_bound_every_example_step() -> None:
    for path in EXAMPLES:
        estimate = estimate_spec(prepare_spec(path)[1], PRICES)
        for step in estimate.steps:
            cost = step.cost_usd
            assert 0 <= cost.low <= cost.expected <= cost.high, (path.name, step.step)
            assert step.input_tokens.low <= step.input_tokens.expected <= step.input_tokens.high
        assert estimate.cost_usd.high > 0, path.name


def test_output_is_bounded_by_max_tokens_and_an_unset_one_is_warned_about() -> None:
    step = _step(_estimate(_one({**GPT, "prompt": "hi"})), "a")
    price = PRICES.price("openai", "gpt-4.1-mini")
    assert price is not None
    # Three attempts (the default retry), each billed for 500 tokens out at most.
    assert step.output_tokens.high == 3 * 500
    assert step.cost_usd.high == pytest.approx(
        3 * (step.input_tokens.high / 3 * price.input + 500 * price.output) / 1e6
    )
    unbounded = _estimate(_one({"provider": "openai", "model": "gpt-4.1-mini", "prompt": "hi"}))
    assert _step(unbounded, "a").output_tokens.high == 3 * ASSUMED_MAX_TOKENS
    assert any("max_tokens: not set" in w for w in unbounded.warnings)


def test_retries_and_fallbacks_widen_only_the_maximum() -> None:
    once = _step(_estimate(_one({**GPT, "prompt": "hi", "retry": {"max_attempts": 1}})), "a")
    five = _step(_estimate(_one({**GPT, "prompt": "hi", "retry": {"max_attempts": 5}})), "a")
    assert five.cost_usd.expected == once.cost_usd.expected
    assert five.cost_usd.high == pytest.approx(5 * once.cost_usd.high)
    fallback = {"fallback": [{"provider": "openai", "model": "gpt-4.1"}]}
    chained = _step(
        _estimate(_one({**GPT, "prompt": "hi", "retry": {"max_attempts": 1}, **fallback})), "a"
    )
    assert chained.cost_usd.expected == once.cost_usd.expected
    assert chained.cost_usd.high > 2 * once.cost_usd.high  # gpt-4.1 costs more than -mini


def test_best_of_counts_every_candidate_and_a_judge_that_reads_them_all() -> None:
    single = _step(_estimate(_one({**GPT, "prompt": "Write a haiku."})), "a")
    best = _step(
        _estimate(_one({**GPT, "prompt": "Write a haiku.", "best_of": {"n": 3}})),
        "a",
    )
    assert best.calls.expected == 4
    # Each candidate costs what the single call does; the judge reads all three.
    assert best.cost_usd.low >= 3 * single.cost_usd.low
    assert best.cost_usd.expected > 4 * single.cost_usd.expected
    assert best.cost_usd.high > 4 * single.cost_usd.high
    assert best.input_tokens.high >= 3 * 500 + 4 * single.input_tokens.high / 3
    assert best.cost_usd.low <= best.cost_usd.expected <= best.cost_usd.high


def _decompose(**fields: Any) -> dict[str, Any]:
    return {
        "name": "plan",
        "defaults": {"max_tokens": 800},
        "steps": [
            {
                "id": "split",
                "kind": "decompose",
                "provider": "openai",
                "model": "gpt-4.1",
                "prompt": "Split the review into parts.",
                **fields,
            },
            {
                "id": "merge",
                "needs": ["split"],
                "provider": "openai",
                "model": "gpt-4.1",
                "prompt": "Merge:\n{{steps.split.children}}",
            },
        ],
    }


def test_decompose_bounds_grow_with_max_steps_and_a_budget_caps_them() -> None:
    few = _estimate(_decompose(max_steps=2))
    many = _estimate(_decompose(max_steps=8))
    split_few, split_many = _step(few, "split"), _step(many, "split")
    assert split_few.cost_usd.low == split_many.cost_usd.low
    assert split_many.cost_usd.expected > split_few.cost_usd.expected
    assert split_many.cost_usd.high > 3 * split_few.cost_usd.high
    assert split_many.calls.high > split_few.calls.high
    # Its reader reads up to max_steps children of max_tokens each.
    assert _step(many, "merge").input_tokens.high >= 8 * 800
    for step in (split_few, split_many):
        assert step.cost_usd.low <= step.cost_usd.expected <= step.cost_usd.high
    capped = _step(_estimate(_decompose(max_steps=8, budget={"max_cost_usd": 0.01})), "split")
    sub_steps_only = split_many.cost_usd.high - capped.cost_usd.high
    assert sub_steps_only > 0
    assert "budget max_cost_usd" in "; ".join(capped.notes)
    nested = _step(
        _estimate(_decompose(max_steps=3, max_depth=2, allow_kinds=["decompose"])), "split"
    )
    assert nested.calls.high >= 9


def test_a_worst_case_beyond_the_budget_is_a_warning() -> None:
    spec = {**_one({**GPT, "prompt": "hi"}), "budget": {"max_cost_usd": 0.000001}}
    estimate = _estimate(spec)
    assert any("exceeds max_cost_usd" in w for w in estimate.warnings)
    assert "warning: budget: worst case" in format_estimate(estimate)
    roomy = _estimate({**spec, "budget": {"max_cost_usd": 100}})
    assert not any("budget" in w for w in roomy.warnings)


def test_an_unpriced_model_is_named_not_counted_as_free_silently() -> None:
    estimate = _estimate(_one({**GPT, "model": "gpt-from-the-future-x", "prompt": "hi"}))
    assert estimate.unpriced == ["openai/gpt-from-the-future-x"]
    assert any("no price for openai/gpt-from-the-future-x" in w for w in estimate.warnings)


# ---- the command -------------------------------------------------------------------


def test_estimate_prints_a_cost_range_for_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", *map(str, EXAMPLES)]) == 0
    out = capsys.readouterr().out
    for path in EXAMPLES:
        assert f"== {path}" in out
    assert out.count("\ntotal ") == len(EXAMPLES)
    assert "$" in out


def test_estimate_takes_inputs_and_refuses_an_invalid_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: s\ninputs: {doc: ''}\nsteps:\n"
        "  - {id: a, provider: openai, model: gpt-4.1, max_tokens: 10, prompt: '{{inputs.doc}}'}\n"
    )
    assert main(["estimate", str(spec), "--json"]) == 0
    short = capsys.readouterr().out
    assert main(["estimate", str(spec), "--input", "doc=" + "word " * 1000, "--json"]) == 0
    long = capsys.readouterr().out
    import json

    assert json.loads(long)["steps"][0]["input_tokens"]["low"] >= (
        json.loads(short)["steps"][0]["input_tokens"]["low"] + 1000
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nsteps:\n  - {id: a, prompt: '{{inputs.nope}}'}\n")
    assert main(["estimate", str(bad)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["estimate", str(bad), "--json"]) == 2
    assert "nope" in capsys.readouterr().err


async def test_run_dry_run_ends_with_the_estimate(
    env: WorkflowEnvironment,
    mixer: MixerClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", env.client.service_client.config.target_host)
    monkeypatch.setenv("LLMMIXER_TASK_QUEUE", mixer.task_queue)
    hello = next(p for p in EXAMPLES if p.name == "hello.yaml")
    assert await asyncio.to_thread(main, ["run", str(hello), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "estimate for hello run for real (a dry run costs nothing)" in err
    assert "\ntotal " in err


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


def _openai_count(body: dict[str, Any]) -> int:
    """OpenAI's own count of a chat request's prompt (its cookbook's rule, o200k_base)."""
    o200k = encoding("o200k_base")
    total = 3  # the reply's start
    for message in body["messages"]:
        total += 3 + sum(len(o200k.encode(str(value))) for value in message.values())
    return total


async def test_an_openai_estimate_is_within_2_percent_of_what_the_provider_is_sent(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(text="fine"))
    report = "Latency rose after the deploy; the cache hit rate fell from 92% to 61%. " * 25
    spec = {
        "name": "tok",
        "inputs": {"report": report},
        "steps": [
            {
                "id": "a",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "max_tokens": 100,
                "system": "You are an SRE. Answer in one paragraph.",
                "messages": [
                    {"role": "user", "content": "What changed?"},
                    {"role": "assistant", "content": "Share the report."},
                ],
                "prompt": "Report:\n{{inputs.report}}",
            }
        ],
    }
    estimated = _step(_estimate(spec), "a").input_tokens.expected
    await (await mixer.start(spec)).result()
    [call] = [c for c in provider_server.calls if c.provider == "openai"]
    sent = _openai_count(call.body)
    # Within 2% as the issue asks; in fact equal, framing included.
    assert abs(estimated - sent) <= 0.02 * sent, (estimated, sent)
    assert estimated == sent


# ---- tool loops --------------------------------------------------------------------

TOOL = {
    "kind": "command",
    "name": "grep_repo",
    "description": "search the repository",
    "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}},
    "argv": ["grep", "-rn", "--", "{{args.pattern}}", "."],
    "max_output_bytes": 4096,
}


def test_a_tool_loop_widens_the_maximum_to_every_turn_resending_the_conversation() -> None:
    once = {"defaults": {"retry": {"max_attempts": 1}}}
    plain = _step(_estimate(_one({**GPT, "prompt": "find the bug"}, **once)), "a")
    looped = _step(
        _estimate(_one({**GPT, "prompt": "find the bug", "tools": [TOOL], "max_turns": 3}, **once)),
        "a",
    )
    declarations = count_tokens(
        "openai",
        "gpt-4.1-mini",
        None,
        [
            '[{"name": "grep_repo", "description": "search the repository", "parameters": '
            '{"type": "object", "properties": {"pattern": {"type": "string"}}}}]'
        ],
    ).high
    prompt = plain.input_tokens.high
    # Turn k re-sends the prompt, the declarations, and k - 1 replies (500
    # tokens) and tool results (4096 bytes / 4) before it.
    growth = (500 + 1024) * (0 + 1 + 2)
    assert looped.input_tokens.high == 3 * (prompt + declarations) + growth
    assert looped.output_tokens.high == 3 * 500
    assert (looped.calls.low, looped.calls.expected, looped.calls.high) == (1, 2, 3)
    # One turn at least: the minimum is the plain step's plus the declarations.
    assert looped.input_tokens.low == prompt + declarations
    assert looped.cost_usd.high > 3 * plain.cost_usd.high
    assert looped.cost_usd.low <= looped.cost_usd.expected <= looped.cost_usd.high
    assert any("max_turns" in note and "tool result" in note for note in looped.notes)

    # The spec's default of 10 turns, when the step sets none.
    default = _step(
        _estimate(_one({**GPT, "prompt": "find the bug", "tools": [TOOL]}, **once)), "a"
    )
    assert default.calls.high == 10


def test_a_single_turn_tool_loop_keeps_its_bounds_in_order() -> None:
    one = _step(
        _estimate(_one({**GPT, "prompt": "find the bug", "tools": [TOOL], "max_turns": 1})), "a"
    )
    for span in (one.calls, one.input_tokens, one.output_tokens, one.cost_usd):
        assert span.low <= span.expected <= span.high


# ---- files ---------------------------------------------------------------------------

IMAGES = Path(__file__).resolve().parent / "data" / "images"


def _png(width: int, height: int) -> bytes:
    """A real PNG of ``width`` x ``height`` grey pixels (stdlib only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _pdf(pages: int) -> bytes:
    """A real PDF of ``pages`` empty pages, with its cross-reference table."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
        *(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>" for _ in range(pages)),
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out


def test_image_sizes_and_pdf_pages_are_read_from_real_files() -> None:
    for suffix in ("png", "jpg", "gif", "webp"):
        data = (IMAGES / f"python16.{suffix}").read_bytes()
        assert image_dimensions(data) == (16, 16), suffix
    # Width and height are not swapped.
    assert image_dimensions(_png(300, 200)) == (300, 200)
    assert image_dimensions((IMAGES / "python16.jpg").read_bytes()[:20]) is None
    assert image_dimensions(b"not an image") is None
    assert pdf_page_count(_pdf(3)) == 3
    assert pdf_page_count(b"%PDF-1.4\n%%EOF\n") is None


def test_image_tokens_follow_each_providers_published_rule() -> None:
    # Anthropic: width*height/750, scaled down to ~1600 tokens at most.
    assert image_tokens("anthropic", 1000, 1000) == 1334
    assert image_tokens("anthropic", 200, 200) == 54
    assert image_tokens("anthropic", 4000, 3000) <= 1600
    # OpenAI (high detail): 85 + 170 per 512-px tile after fitting 2048 and a 768 short side.
    assert image_tokens("openai", 1024, 1024) == 765
    assert image_tokens("openai", 2048, 4096) == 1105
    assert image_tokens("openai", 16, 16) == 255
    # Gemini: 258 up to 384 px a side, else 258 per 768-px tile.
    assert image_tokens("gemini", 384, 384) == 258
    assert image_tokens("gemini", 1000, 500) == 516


def _vision(provider: str, model: str, **files: str) -> dict[str, Any]:
    step = {"provider": provider, "model": model, "max_tokens": 100, "prompt": "describe"}
    return _one({**step, "attachments": list(files)})


@pytest.mark.parametrize(
    ("provider", "model", "tokens"),
    [
        ("anthropic", "claude-sonnet-5-5", 1334),
        ("openai", "gpt-4.1-mini", 765),
        ("gemini", "gemini-2.5-flash", 258 * 4),
    ],
)
def test_an_attached_image_adds_its_providers_image_tokens(
    provider: str, model: str, tokens: int
) -> None:
    image = _png(1000, 1000)
    bare = _step(_estimate(_vision(provider, model)), "a")
    _, spec = prepare_spec(
        _vision(provider, model, diagram=""), inputs={"diagram": File("d.png", image)}
    )
    seen = _step(estimate_spec(spec, PRICES, {"diagram": image}), "a")
    assert seen.input_tokens.expected - bare.input_tokens.expected == tokens
    assert seen.cost_usd.expected > bare.cost_usd.expected
    assert any("d.png: ≈ 1000x1000 image" in note for note in seen.notes), seen.notes
    assert "files ≈ each provider's published rule" in seen.tokenizer


def test_a_file_without_its_bytes_is_counted_by_type_and_size_and_says_so() -> None:
    document = _pdf(2)
    _, spec = prepare_spec(
        _vision("anthropic", "claude-sonnet-5-5", doc=""), inputs={"doc": File("s.pdf", document)}
    )
    known = _step(estimate_spec(spec, PRICES, {"doc": document}), "a")
    guessed = _step(estimate_spec(spec, PRICES), "a")
    bare = _step(_estimate(_vision("anthropic", "claude-sonnet-5-5")), "a")
    assert known.input_tokens.expected - bare.input_tokens.expected == 2 * 2250
    assert any("≈ 2 PDF page(s)" in note for note in known.notes), known.notes
    assert any("PDF pages guessed from its size" in note for note in guessed.notes)
    # An image of unknown size spans the provider's smallest to largest charge.
    _, images = prepare_spec(
        _vision("anthropic", "claude-sonnet-5-5", d=""), inputs={"d": File("x.png", _png(40, 30))}
    )
    unknown = _step(estimate_spec(images, PRICES), "a")
    assert unknown.input_tokens.high - bare.input_tokens.high >= 1600
    assert any("image of unknown size" in note for note in unknown.notes)


def test_estimate_reads_the_size_of_files_given_by_path_or_at_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    (tmp_path / "wide.png").write_bytes(_png(2048, 4096))
    (tmp_path / "s.yaml").write_text(
        "name: s\ninputs: {diagram: {file: wide.png}}\nsteps:\n"
        "  - {id: a, provider: openai, model: gpt-4.1-mini, max_tokens: 10, prompt: hi,"
        " attachments: [diagram]}\n"
    )
    assert main(["estimate", str(tmp_path / "s.yaml"), "--json"]) == 0
    [step] = json.loads(capsys.readouterr().out)["steps"]
    assert any("wide.png: ≈ 2048x4096 image" in n and "1105 tokens" in n for n in step["notes"])
    (tmp_path / "small.png").write_bytes(_png(16, 16))
    assert (
        main(
            [
                "estimate",
                str(tmp_path / "s.yaml"),
                "--input",
                f"diagram=@{tmp_path / 'small.png'}",
                "--json",
            ]
        )
        == 0
    )
    [step] = json.loads(capsys.readouterr().out)["steps"]
    assert any("small.png: ≈ 16x16 image" in n and "255 tokens" in n for n in step["notes"])


def test_files_placed_in_message_parts_count_like_attachments() -> None:
    image = _png(1024, 1024)
    step = {
        "provider": "openai",
        "model": "gpt-4.1-mini",
        "max_tokens": 100,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "describe"}, {"type": "image", "input": "d"}],
            }
        ],
    }
    bare = _step(
        _estimate(_one({**step, "messages": [{"role": "user", "content": "describe"}]})), "a"
    )
    _, spec = prepare_spec(_one(step), inputs={"d": File("d.png", image)})
    seen = _step(estimate_spec(spec, PRICES, {"d": image}), "a")
    assert seen.input_tokens.expected - bare.input_tokens.expected == 765
