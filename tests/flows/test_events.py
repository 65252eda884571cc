"""End to end: a run's events arrive on a real Prefect server (the session's), with its counts
and spend, and related to its flow run."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import UUID

import pytest
from prefect import flow, get_client
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ReceivedEvent
from prefect.runtime import flow_run as prefect_flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Crashed

from emulator.server import EmulatorServer
from flows.batch import BatchParams, tryon_batch
from schemas.summary import RunSummary
from tasks.events import BUDGET_EXHAUSTED, COMPLETED, emit_run_events
from tests.flows.conftest import REPO
from tests.flows.test_batch import sample_rows, write_manifest

pytestmark = pytest.mark.e2e

# The server persists events in batches (every 5 s by default): wait for them that long and more.
ARRIVAL_TIMEOUT_S = 60.0


async def run_events_on_server(run_id: str, expected: int) -> list[ReceivedEvent]:
    """The ``tryon.run.*`` events of run ``run_id`` the server has stored, oldest first, once
    there are ``expected`` of them (or as many as arrived in time)."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    async with get_client() as client:
        while True:
            page = await client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(prefix=["tryon.run."]),
                    resource=EventResourceFilter(id=[f"tryon.run.{run_id}"]),
                ),
                limit=50,
            )
            if len(page.events) >= expected or time.monotonic() > deadline:
                return sorted(page.events, key=lambda e: e.occurred)
            await asyncio.sleep(0.5)


def flow_run_of(event: ReceivedEvent) -> dict[str, str]:
    (related,) = [r for r in event.related if r.role == "flow-run"]
    return dict(related)


def budget_stopped_summary(tmp_path: Path) -> RunSummary:
    """A run the budget stopped (its run id is replaced by that of the flow run emitting it)."""
    lake = tmp_path / "lake"
    return RunSummary(
        run_id="replaced-by-the-flow-run-id",
        provider="changeclothes",
        lake=str(lake),
        results_uri=str(lake / "outputs"),
        metadata_uri=str(lake / "metadata"),
        summary_uri=str(lake / "summary.json"),
        counts={"succeeded": 4, "skipped": 6},
        unfinished=6,
        total_rows=10,
        provider_calls=4,
        duration_s=1.5,
        fatal_error="[changeclothes BUDGET_EXHAUSTED] spent 2.00 USD of a 2.00 USD budget",
        currency="USD",
        cost=2.0,
        budget=2.0,
        budget_exhausted=True,
    )


def prefect_env(tmp_path: Path) -> dict[str, str]:
    """A child process's environment: the session's Prefect server, a Prefect home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


async def test_a_runs_completed_event_arrives_with_its_counts(
    use_emulator: EmulatorServer, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sample_rows(3))
    lake = tmp_path / "lake"
    summary = await tryon_batch(BatchParams(manifest=str(manifest), lake=str(lake)))

    (event,) = await run_events_on_server(summary.run_id, expected=1)
    async with get_client() as client:
        flow_run = await client.read_flow_run(summary.run_id)  # the run's id is its flow run's

    assert event.event == COMPLETED
    assert dict(event.resource) == {
        "prefect.resource.id": f"tryon.run.{summary.run_id}",
        "prefect.resource.name": flow_run.name,
        "tryon.provider": "changeclothes",
        "tryon.lake": str(lake),
        "tryon.unfinished": "0",
    }
    assert flow_run_of(event) == {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.role": "flow-run",
        "prefect.resource.name": flow_run.name,
    }
    # Prefect's events worker adds the rest of the run's context.
    flow_resource = f"prefect.flow.{flow_run.flow_id}"
    assert any(r.role == "flow" and r.id == flow_resource for r in event.related)
    payload = event.payload
    assert payload["counts"] == summary.counts == {"succeeded": 3}
    assert (payload["total_rows"], payload["unfinished"]) == (3, 0)
    assert payload["provider_calls"] == summary.provider_calls == 3
    assert payload["duration_s"] == summary.duration_s
    assert payload["budget_exhausted"] is False and payload["fatal_error"] is None
    assert payload["summary_uri"] == summary.summary_uri


# A flow that emits a budget-stopped run's events, then ends its process at once: no flow
# end, no exit-time drain of Prefect's events worker. The events reach the server only if
# emit_run_events sent them before returning.
BUDGET_STOPPED_RUN = """
import asyncio, os, sys
from prefect import flow
from prefect.runtime import flow_run
from schemas.summary import RunSummary
from tasks.events import emit_run_events

@flow(name="tryon-events-test", flow_run_name="budget-stopped-run")
async def budget_stopped() -> None:
    summary = RunSummary.model_validate_json(sys.argv[1])
    summary = summary.model_copy(update={"run_id": flow_run.get_id()})
    emitted = await emit_run_events(summary)
    print(summary.run_id, len(emitted), flush=True)
    os._exit(0)

asyncio.run(budget_stopped())
"""


async def test_a_budget_stop_is_an_event_on_the_server_even_if_the_process_dies_next(
    tmp_path: Path,
) -> None:
    stopped = budget_stopped_summary(tmp_path)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", BUDGET_STOPPED_RUN, stopped.model_dump_json()],
        cwd=REPO,
        env=prefect_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    run_id, emitted = done.stdout.split()
    assert emitted == "2"

    try:
        events = await run_events_on_server(run_id, expected=2)
        assert {e.event for e in events} == {COMPLETED, BUDGET_EXHAUSTED}
        for event in events:
            assert flow_run_of(event)["prefect.resource.id"] == f"prefect.flow-run.{run_id}"
            assert event.resource["prefect.resource.name"] == "budget-stopped-run"
            assert event.resource["tryon.unfinished"] == "6"
            payload = event.payload
            assert payload["budget_exhausted"] is True
            assert (payload["currency"], payload["cost"], payload["budget"]) == ("USD", 2.0, 2.0)
            assert payload["counts"] == {"succeeded": 4, "skipped": 6}
            assert payload["fatal_error"]["code"] == "BUDGET_EXHAUSTED"
    finally:  # the process ended inside its flow run: do not leave that run Running
        async with get_client() as client:
            await client.set_flow_run_state(
                run_id, Crashed(message="ended by the test"), force=True
            )


README_BLOCK = re.compile(
    r"<!-- automations: (?P<tag>[\w-]+) -->\n```bash\n(?P<script>.*?)```", re.S
)


def readme_blocks() -> dict[str, str]:
    blocks = {
        m["tag"]: m["script"] for m in README_BLOCK.finditer((REPO / "README.md").read_text())
    }
    assert set(blocks) == {"block", "cli"}, "the README lost its tagged automation blocks"
    return blocks


class Webhook(ThreadingHTTPServer):
    """Collects the JSON bodies POSTed to it (a notification block's messages)."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict[str, str]] = queue.Queue()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                webhook.received.put(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:  # quiet
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/notify"


@flow(name="tryon-events-test", flow_run_name="budget-stopped-run")
async def emit_budget_stopped(summary: RunSummary) -> str:
    run_id = str(prefect_flow_run.get_id())
    await emit_run_events(summary.model_copy(update={"run_id": run_id}))
    return run_id


async def test_the_readme_automations_notify_when_a_budget_stops_a_run(tmp_path: Path) -> None:
    """The README's commands create the automations from deployments/automations.yaml; a
    budget-stopped run's events then fire both, and their messages arrive at the block."""
    webhook = Webhook()
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    block_id = await CustomWebhookNotificationBlock(
        name="tryon-test", url=webhook.url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
    ).asave("tryon-events-test-webhook", overwrite=True)

    # A user's checkout: the venv and the automations file where the README expects them.
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (tmp_path / "deployments").mkdir()
    shutil.copy(REPO / "deployments" / "automations.yaml", tmp_path / "deployments")
    blocks = readme_blocks()
    # The README's block-making line runs as written (a Slack block nobody calls); the
    # automations are then pointed at this test's webhook instead.
    script = "\n".join(
        [
            "set -euo pipefail",
            blocks["block"],
            'echo "slack block $BLOCK_ID"',
            f"BLOCK_ID={block_id}",
            blocks["cli"],
        ]
    )
    done = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", script],
        cwd=tmp_path,
        env=prefect_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    slack_block = re.search(r"slack block (\S+)", done.stdout)
    assert slack_block is not None and UUID(slack_block[1])

    async with get_client() as client:
        names = ["tryon budget exhausted", "tryon run incomplete"]
        automations = [a for n in names for a in await client.read_automations_by_name(n)]
        assert len(automations) == 2
        try:
            run_id = await emit_budget_stopped(budget_stopped_summary(tmp_path))
            messages = [
                await asyncio.to_thread(webhook.received.get, timeout=ARRIVAL_TIMEOUT_S)
                for _ in names
            ]
        finally:
            for automation in automations:
                await client.delete_automation(automation.id)
            webhook.shutdown()

    by_subject = {m["subject"]: m["body"] for m in messages}
    assert set(by_subject) == {
        "tryon: budget spent, budget-stopped-run stopped",
        "tryon: budget-stopped-run left 6 rows unfinished",
    }
    budget = by_subject["tryon: budget spent, budget-stopped-run stopped"]
    assert "spent its budget of 2.0 USD (cost 2.0)" in budget
    assert "4 of 10 rows succeeded; 6 unfinished" in budget
    incomplete = by_subject["tryon: budget-stopped-run left 6 rows unfinished"]
    assert "Stopped by BUDGET_EXHAUSTED: spent 2.00 USD of a 2.00 USD budget" in incomplete
    assert "Calls: 4; cost: 2.0 USD." in incomplete
    for body in by_subject.values():
        # The flow run's page, or its id from a server that does not know its UI's address.
        assert f"Flow run: {run_id}" in body or f"/runs/flow-run/{run_id}" in body
