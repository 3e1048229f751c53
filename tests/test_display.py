"""What `run`, `status` and `watch` show: the commands to type, and only safe text."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from llmmixer.client.display import ProgressView, terminal_safe, unblock_hints
from llmmixer.core.contracts import EventType, MixerEvent
from llmmixer.workflows.records import (
    BudgetHold,
    RunProgress,
    RunStatus,
    StepRecord,
    StepStatus,
    ToolApproval,
)


def waiting(record: StepRecord) -> RunProgress:
    return RunProgress(status=RunStatus.WAITING, steps={"s": record}, waiting=["s"])


def test_a_failed_step_gets_retry_skip_override() -> None:
    record = StepRecord(status=StepStatus.WAITING, waiting_reason="failed: boom", error="boom")
    assert unblock_hints("wf", waiting(record)) == [
        "step s waits: failed: boom",
        "  llmmixer retry wf s",
        "  llmmixer skip wf s",
        "  llmmixer override wf s --output TEXT",
    ]


def test_a_hint_quotes_the_reason_without_control_sequences() -> None:
    reason = "failed: \x1b]52;c;cm0gLXJm\x07exit 1\x1b[2A"
    record = StepRecord(status=StepStatus.WAITING, waiting_reason=reason, error="x")
    assert unblock_hints("wf", waiting(record))[0] == "step s waits: failed: exit 1"


def test_an_approval_gets_approve_reject() -> None:
    record = StepRecord(kind="approval", status=StepStatus.WAITING, waiting_reason="approval: ok?")
    assert unblock_hints("wf", waiting(record))[1:] == [
        "  llmmixer approve wf s",
        "  llmmixer reject wf s",
    ]


def test_an_llm_step_waiting_on_a_tool_call_gets_approve_and_reject_with_a_reason() -> None:
    approval = ToolApproval(turn=1, call_id="c", name="write", arguments={"path": "a"})
    record = StepRecord(
        status=StepStatus.WAITING,
        waiting_reason='tool approval: write {"path": "a"}',
        tool_approval=approval,
    )
    assert unblock_hints("wf", waiting(record))[1:] == [
        "  llmmixer approve wf s",
        "  llmmixer reject wf s --reason WHY",
    ]


def test_a_budget_hold_names_the_budget_to_raise() -> None:
    hold = BudgetHold(step="plan", limit="max_tokens", spent=900, current=800)
    record = StepRecord(status=StepStatus.WAITING, waiting_reason=hold.reason(), budget_hold=hold)
    hints = unblock_hints("wf", waiting(record))
    assert hints[1] == "  llmmixer raise-budget wf --step plan --max-tokens NEW_LIMIT"
    assert hints[2] == "  llmmixer skip wf s"
    spec_hold = BudgetHold(limit="max_cost_usd", spent=2, current=2)
    spec_level = StepRecord(
        status=StepStatus.WAITING, waiting_reason=spec_hold.reason(), budget_hold=spec_hold
    )
    hint = unblock_hints("wf", waiting(spec_level))[1]
    assert hint == "  llmmixer raise-budget wf --max-cost-usd NEW_LIMIT"


# ---- terminal control sequences in model and command text ----------------------------------

#: What may reach a terminal from text a run produced: no C0 but newline and tab, no DEL, no C1.
FORBIDDEN = {chr(c) for c in range(0x20) if chr(c) not in "\n\t"} | {
    chr(c) for c in range(0x7F, 0xA0)
}


@pytest.mark.parametrize(
    ("hostile", "shown"),
    [
        # OSC 52: writes the clipboard (BEL- and ST-terminated)
        ("copy \x1b]52;c;Y3VybCBldmlsLnNofHNo\x07this", "copy this"),
        ("copy \x1b]52;c;Y3VybA==\x1b\\this", "copy this"),
        # OSC 8: a hyperlink whose target is not what it shows
        ("\x1b]8;;https://evil.example\x1b\\docs\x1b]8;;\x1b\\ here", "docs here"),
        # CSI: cursor up and erase, to overwrite what the screen showed
        ("ok\x1b[2A\x1b[2K\x1b[1;31mfake\x1b[0m", "okfake"),
        # the window title
        ("\x1b]0;title\x07after", "after"),
        # C1 CSI (one byte) and C1 OSC
        ("c1\x9b2Jx\x9d0;t\x9cy", "c1xy"),
        # DCS, APC, PM, SOS strings; ESC c resets the terminal; a charset switch
        ("a\x1bPq#0;2\x1b\\b\x1b_apc\x1b\\c\x1b^pm\x1b\\d\x1bXsos\x1b\\e", "abcde"),
        ("reset\x1bc now \x1b(0x", "reset now x"),
        # an unterminated string swallows the rest, as the terminal would
        ("tail \x1b]52;c;never-ends", "tail "),
        ("lone escape\x1b", "lone escape"),
        # other C0 controls: bell, backspace over text, carriage return, NUL, DEL
        ("bell\x07 back\x08\x08 cr\rnul\x00del\x7f", "bell back crnuldel"),
    ],
)
def test_terminal_safe_removes_control_sequences(hostile: str, shown: str) -> None:
    assert terminal_safe(hostile) == shown


def test_terminal_safe_keeps_text_newlines_tabs_and_unicode() -> None:
    text = "résumé\tline → 世界 🙂\n[link=https://x]not markup here[/link]\n"
    assert terminal_safe(text) == text


@given(st.text(alphabet=st.characters(codec=None, max_codepoint=0x2FF)))
def test_terminal_safe_leaves_no_control_character(text: str) -> None:
    safe = terminal_safe(text)
    assert not FORBIDDEN & set(safe)
    assert terminal_safe(safe) == safe


def _event(kind: EventType, step: str = "a", **data: Any) -> MixerEvent:
    return MixerEvent(type=kind, step=step, attempt=1, data=data)


HOSTILE_CHUNKS = [
    "answer \x1b]52;c;ZWNobyBwd25lZA==",  # split: the sequence ends in the next chunk
    "\x07done\x1b[2A\n",
    "\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\\n",
    "\x9b2J\x1b]0;pwned\x07last\n",
]


def test_plain_view_prints_no_control_sequence() -> None:
    out = io.StringIO()
    with ProgressView("run-1", out) as view:
        view.event(_event(EventType.STEP_STARTED))
        for chunk in HOSTILE_CHUNKS:
            view.event(_event(EventType.STEP_DELTA, text=chunk))
        view.event(_event(EventType.STEP_FAILED, error="\x1b]0;title\x07boom \x1b[31mred"))
        view.note("note \x1b]52;c;eA==\x07")
    printed = out.getvalue()
    assert not FORBIDDEN - {"\n"} & set(printed), repr(printed)
    assert printed.splitlines() == [
        "[running] a",
        "  a| answer done",
        "  a| click",
        "  a| last",
        "[failed] a error: boom red",
        "note ",
    ]


def test_live_view_renders_hostile_text_and_names_as_plain_text() -> None:
    view = ProgressView("run-1", io.StringIO(), force_terminal=True)
    markup = "[link=https://evil.example]docs[/link]"
    progress = RunProgress(
        name=f"demo{markup}\x1b]0;t\x07",
        steps={
            "a": StepRecord(
                status=StepStatus.RUNNING, provider="openai", model=f"m{markup}\x1b]8;;x\x1b\\"
            )
        },
        running=["a"],
        status=RunStatus.RUNNING,
    )
    view.update(progress)  # not entered: rendered by hand below, no refresh thread
    for chunk in HOSTILE_CHUNKS:
        view.event(_event(EventType.STEP_DELTA, text=chunk))
    screen = io.StringIO()
    Console(file=screen, width=200, force_terminal=True, color_system="truecolor").print(view)
    shown = screen.getvalue()
    # rich colours the table (CSI "m" sequences); nothing else may reach the terminal
    assert "\x1b]" not in shown and "\x9b" not in shown and "\x07" not in shown, repr(shown)
    assert not {match[-1] for match in re.findall(r"\x1b\[[0-9;]*[A-Za-z]", shown)} - {"m"}
    assert markup in shown  # shown as the characters it is, not made a link
    assert "answer done" in shown and "click" in shown and "last" in shown
