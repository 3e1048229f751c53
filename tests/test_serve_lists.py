"""``llmmixer serve``'s lists: runs filtered by search attributes, and schedules.

Over real HTTP against a real uvicorn, a real Temporal dev server (with
llmmixer's search attributes registered, as ``llmmixer setup`` leaves it) and
a real worker. The page's filters and schedule list are in
``test_serve_browser.py``; the guard on the schedules' POST routes is in
``test_serve_security.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fakes.workers import eventually
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleSpec,
)
from test_serve import TOKEN, Served, dry_chain, serve_in_process

from llmmixer.client.http import ServeSettings, create_app
from llmmixer.client.mixer import MixerClient
from llmmixer.client.setup import register_search_attributes
from llmmixer.workflows.records import StepStatus


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates need a cache: see conftest.workflow_cache


@pytest.fixture
async def served(mixer: MixerClient) -> AsyncIterator[Served]:
    app = create_app(mixer, ServeSettings(token=TOKEN))
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        yield Served(url, app, http)


@pytest.fixture
async def registered(client: Client) -> Client:
    await register_search_attributes(client, client.namespace)
    return client


def named(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return {**spec, "name": name}


async def test_runs_are_filtered_by_state_and_spec_name(
    registered: Client, served: Served, mixer: MixerClient
) -> None:
    http = served.http
    auth = {"Authorization": f"Bearer {TOKEN}"}
    name = f"filtered-{uuid.uuid4().hex[:8]}"
    gated = await mixer.start(named(dry_chain("f", 1, gate_after=1), name), dry_run=True)
    done = await mixer.start(named(dry_chain("d", 1), name), dry_run=True)
    other = await mixer.start(named(dry_chain("o", 1), f"{name}-other"), dry_run=True)
    await done.result()
    await other.result()

    async def ids(**params: str) -> set[str]:
        response = await http.get("/workflows", params=params, headers=auth)
        assert response.status_code == 200, response.text
        return {run["workflow_id"] for run in response.json()["runs"]}

    waiting = await eventually(
        lambda: ids(state="waiting", spec=name), lambda found: gated.id in found, "waiting run"
    )
    assert waiting == {gated.id}
    completed = await eventually(
        lambda: ids(state="completed", spec=name),
        lambda found: done.id in found,
        "completed run",
    )
    assert completed == {done.id}, "another spec's run, or a waiting one, passed the filter"
    assert await eventually(
        lambda: ids(spec=name), lambda found: found == {gated.id, done.id}, "the spec's runs"
    )

    # The list says "waiting" for a run that waits for a person, and names its spec.
    listed = (await http.get("/workflows", params={"spec": name}, headers=auth)).json()["runs"]
    by_id = {run["workflow_id"]: run for run in listed}
    assert by_id[gated.id]["status"] == "waiting"
    assert by_id[done.id]["status"] == "completed"
    assert by_id[done.id]["spec"] == name

    # A spec name cannot widen the query: it is quoted as `llmmixer list` quotes it.
    assert await ids(spec=f'{name}" OR WorkflowType="MixerWorkflow') == set()
    refused = await http.get("/workflows", params={"state": "asleep"}, headers=auth)
    assert refused.status_code == 422
    assert "state" in refused.json()["errors"][0]
    await gated.approve("fgate")
    await gated.result()
    assert (await gated.progress()).steps["fgate"].status == StepStatus.COMPLETED


async def test_schedules_are_listed_paused_unpaused_and_triggered(
    served: Served, mixer: MixerClient, client: Client
) -> None:
    http = served.http
    auth = {"Authorization": f"Bearer {TOKEN}"}
    name = f"weekly-{uuid.uuid4().hex[:8]}"
    # Another application's schedule in the namespace: never listed, never triggered.
    foreign = f"payroll-{uuid.uuid4().hex[:8]}"
    await client.create_schedule(
        foreign,
        Schedule(
            action=ScheduleActionStartWorkflow(
                "PayrollWorkflow", {"salary": 1}, id=f"{foreign}-run", task_queue="nobody"
            ),
            spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(days=365))]),
        ),
    )
    await mixer.create_schedule(
        name, named(dry_chain("s", 1), "weekly-review"), cron="0 9 * * 1", dry_run=True
    )
    try:

        async def listed() -> dict[str, dict[str, Any]]:
            response = await http.get("/schedules", headers=auth)
            assert response.status_code == 200, response.text
            return {item["schedule_id"]: item for item in response.json()["schedules"]}

        found = await eventually(listed, lambda items: name in items, "the schedule in the list")
        entry = found[name]
        assert entry["spec"] == "weekly-review"
        assert entry["cron"] == ["0 9 * * 1"]
        assert entry["paused"] is False
        assert entry["next_run"] is not None and "T09:00:00" in entry["next_run"]
        assert foreign not in found

        pause = await http.post(f"/schedules/{name}/pause", json={"note": "holidays"}, headers=auth)
        assert pause.status_code == 200, pause.text
        assert pause.json()["paused"] is True and pause.json()["note"] == "holidays"
        assert (await mixer.describe_schedule(name)).paused, "the API said paused; it is not"
        paused = await eventually(
            listed, lambda items: items.get(name, {}).get("paused") is True, "the pause shown"
        )
        assert paused[name]["note"] == "holidays"
        # Without a note (an empty body, as the page sends) the change is still explained.
        unpause = await http.post(f"/schedules/{name}/unpause", json={}, headers=auth)
        assert unpause.status_code == 200, unpause.text
        assert unpause.json()["paused"] is False and "llmmixer serve" in unpause.json()["note"]
        assert not (await mixer.describe_schedule(name)).paused
        typo = await http.post(f"/schedules/{name}/pause", json={"reason": "x"}, headers=auth)
        assert typo.status_code == 422, "an unknown field must not pause silently without its note"
        assert not (await mixer.describe_schedule(name)).paused

        triggered = await http.post(f"/schedules/{name}/trigger", json={}, headers=auth)
        assert triggered.status_code == 202, triggered.text
        described = await eventually(
            lambda: mixer.describe_schedule(name),
            lambda schedule: bool(schedule.recent_runs),
            "the triggered run",
        )
        run = described.recent_runs[0].workflow_id
        assert (await mixer.get_handle(run).result()).status.value == "completed"

        for target in (foreign, f"missing-{uuid.uuid4().hex[:8]}"):
            for action in ("trigger", "pause", "unpause"):
                response = await http.post(f"/schedules/{target}/{action}", json={}, headers=auth)
                assert response.status_code == 404, (action, response.text)
                assert "GET /schedules" in response.json()["errors"][0]
        foreign_info = await client.get_schedule_handle(foreign).describe()
        assert foreign_info.info.num_actions == 0, "serve triggered another application's schedule"
        assert not foreign_info.schedule.state.paused, "serve paused another application's schedule"
    finally:
        await mixer.delete_schedule(name)
        await client.get_schedule_handle(foreign).delete()
