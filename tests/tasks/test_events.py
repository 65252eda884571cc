"""The events a finished run emits, built from its summary: names, resource, related flow run,
payload, and nothing secret in any of them."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pytest
from prefect.events.schemas.events import Event
from prefect.exceptions import EventTooLarge

from schemas.summary import ErrorCount, RunSummary
from tasks import events
from tasks.events import (
    BUDGET_EXHAUSTED,
    COMPLETED,
    FATAL_MESSAGE_CHARS,
    emit_run_events,
    fatal_error_fields,
    run_events,
)

RUN_ID = "0b6c2b4e-6a8e-4c1e-9a55-0d1b2c3d4e5f"
SECRET_LAKE = "s3://AKIAEXAMPLEKEY:wJalrSecretKey@bucket/lake?X-Amz-Signature=deadbeef"


def summary(**changes: Any) -> RunSummary:
    fields: dict[str, Any] = {
        "run_id": RUN_ID,
        "provider": "changeclothes",
        "lake": "/data/lake",
        "results_uri": "/data/lake/outputs",
        "metadata_uri": "/data/lake/metadata/**/*.parquet",
        "summary_uri": f"/data/lake/runs/{RUN_ID}/summary.json",
        "contact_sheet_uri": f"/data/lake/runs/{RUN_ID}/contact_sheet.html",
        "counts": {"succeeded": 7, "failed": 2, "invalid": 1},
        "unfinished": 2,
        "total_rows": 10,
        "provider_calls": 9,
        "duration_s": 3.25,
        "currency": "USD",
        "cost": 0.63,
        "budget": 5.0,
    }
    return RunSummary.model_validate({**fields, **changes})


def names(specs: list[events.EventSpec]) -> list[str]:
    return [spec.event for spec in specs]


def test_every_finished_run_emits_completed_and_only_a_budget_stop_adds_budget_exhausted() -> None:
    ids = {"flow_run_id": RUN_ID, "flow_run_name": "manifest-changeclothes-20250601T140322Z"}
    assert names(run_events(summary(), **ids)) == [COMPLETED]
    assert names(run_events(summary(unfinished=0, counts={"succeeded": 10}), **ids)) == [COMPLETED]
    stopped = summary(
        budget_exhausted=True,
        fatal_error="[changeclothes BUDGET_EXHAUSTED] spent 5.00 USD of a 5.00 USD budget",
    )
    assert names(run_events(stopped, **ids)) == [COMPLETED, BUDGET_EXHAUSTED]
    assert COMPLETED == "tryon.run.completed"
    assert BUDGET_EXHAUSTED == "tryon.run.budget-exhausted"


def test_the_resource_is_the_run_and_the_flow_run_is_related() -> None:
    (spec,) = run_events(summary(), flow_run_id=RUN_ID, flow_run_name="sample-run")
    assert spec.resource == {
        "prefect.resource.id": f"tryon.run.{RUN_ID}",
        "prefect.resource.name": "sample-run",
        "tryon.provider": "changeclothes",
        "tryon.lake": "/data/lake",
        "tryon.unfinished": "2",
    }
    assert spec.related == [
        {
            "prefect.resource.id": f"prefect.flow-run.{RUN_ID}",
            "prefect.resource.role": "flow-run",
            "prefect.resource.name": "sample-run",
        }
    ]
    # What emit_event builds from it: Prefect's own validation accepts it.
    event = Event(
        event=spec.event, resource=spec.resource, related=spec.related, payload=spec.payload
    )
    assert event.resource.id == f"tryon.run.{RUN_ID}"
    assert [r.role for r in event.related] == ["flow-run"]


def test_outside_a_flow_run_there_is_no_related_flow_run_and_the_run_names_itself() -> None:
    (spec,) = run_events(summary(), flow_run_id=None, flow_run_name=None)
    assert spec.related == []
    assert spec.resource["prefect.resource.name"] == RUN_ID


def test_the_payload_has_the_counts_and_the_spend() -> None:
    (spec,) = run_events(
        summary(
            refine_counts={"succeeded": 6, "skipped": 1},
            compare_counts={"hidream": {"succeeded": 8, "skipped": 1}},
            fell_back=1,
            already_done=3,
            top_errors=[
                ErrorCount(stage="tryon", code="FETCH_NOT_FOUND", count=2, source="input fetch")
            ],
        ),
        flow_run_id=RUN_ID,
        flow_run_name="sample-run",
    )
    assert spec.payload == {
        "run_id": RUN_ID,
        "provider": "changeclothes",
        "lake": "/data/lake",
        "summary_uri": f"/data/lake/runs/{RUN_ID}/summary.json",
        "contact_sheet_uri": f"/data/lake/runs/{RUN_ID}/contact_sheet.html",
        "total_rows": 10,
        "counts": {"succeeded": 7, "failed": 2, "invalid": 1},
        "refine_counts": {"succeeded": 6, "skipped": 1},
        "compare_counts": {"hidream": {"succeeded": 8, "skipped": 1}},
        "fell_back": 1,
        "already_done": 3,
        "unfinished": 2,
        "provider_calls": 9,
        "duration_s": 3.25,
        "currency": "USD",
        "cost": 0.63,
        "budget": 5.0,
        "budget_exhausted": False,
        "fatal_error": None,
        "top_errors": [
            {"stage": "tryon", "code": "FETCH_NOT_FOUND", "count": 2, "source": "input fetch"}
        ],
    }
    assert json.loads(json.dumps(spec.payload)) == spec.payload  # JSON as it is


def test_an_unknown_price_is_a_null_cost() -> None:
    (spec,) = run_events(summary(cost=None), flow_run_id=None, flow_run_name=None)
    assert spec.payload["cost"] is None and spec.payload["currency"] == "USD"


def test_the_budget_event_says_what_stopped_the_run() -> None:
    stopped = summary(
        budget_exhausted=True,
        fatal_error="[changeclothes BUDGET_EXHAUSTED] spent 5.00 USD of a 5.00 USD budget",
    )
    completed, exhausted = run_events(stopped, flow_run_id=RUN_ID, flow_run_name="r")
    assert exhausted.payload == completed.payload
    assert exhausted.resource == completed.resource
    assert exhausted.payload["budget_exhausted"] is True
    assert exhausted.payload["fatal_error"] == {
        "code": "BUDGET_EXHAUSTED",
        "provider": "changeclothes",
        "message": "spent 5.00 USD of a 5.00 USD budget",
    }


def test_a_fatal_error_gives_its_code_and_a_short_message() -> None:
    long = fatal_error_fields("[tencent 30002] " + "no credits left; " * 40)
    assert long is not None
    assert (long["code"], long["provider"]) == ("30002", "tencent")
    assert long["message"] is not None and len(long["message"]) == FATAL_MESSAGE_CHARS
    assert long["message"].endswith("…")
    assert fatal_error_fields(None) is None
    # Not a provider error's text: no code is made up.
    assert fatal_error_fields("the lake went away") == {
        "code": None,
        "provider": None,
        "message": "the lake went away",
    }


def test_no_credential_of_the_lake_and_no_error_example_reaches_an_event() -> None:
    leaky = summary(
        lake=SECRET_LAKE,
        summary_uri=f"{SECRET_LAKE.split('?')[0]}/runs/{RUN_ID}/summary.json?token=deadbeef",
        contact_sheet_uri=f"{SECRET_LAKE.split('?')[0]}/runs/{RUN_ID}/contact_sheet.html",
        budget_exhausted=True,
        fatal_error="[changeclothes BUDGET_EXHAUSTED] budget spent",
        top_errors=[
            ErrorCount(
                stage="tryon",
                code="PROVIDER_REJECTED",
                count=1,
                source="changeclothes",
                example="vendor said: account sk-live-0123 is over quota",
            )
        ],
    )
    specs = run_events(leaky, flow_run_id=RUN_ID, flow_run_name="r")
    text = json.dumps([[s.resource, s.related, s.payload] for s in specs])
    for secret in ("AKIAEXAMPLEKEY", "wJalrSecretKey", "deadbeef", "sk-live-0123"):
        assert secret not in text
    assert specs[0].resource["tryon.lake"] == "s3://***@bucket/lake?***"


async def test_emitting_never_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**_: Any) -> None:
        raise RuntimeError("no events today")

    monkeypatch.setattr(events, "emit_event", broken)
    with caplog.at_level(logging.WARNING, logger=events.__name__):
        assert await emit_run_events(summary(), flow_run_id=RUN_ID, flow_run_name="r") == []
    assert "run events not emitted: RuntimeError: no events today" in caplog.text


async def test_events_are_flushed_before_emitting_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any]] = []
    flushed: list[float] = []

    def fake_emit(**kwargs: Any) -> Event:
        sent.append(kwargs)
        return Event(**kwargs)

    async def fake_flush(timeout_s: float) -> bool:
        flushed.append(timeout_s)
        return True

    monkeypatch.setattr(events, "emit_event", fake_emit)
    monkeypatch.setattr(events, "flush_events", fake_flush)
    stopped = summary(budget_exhausted=True)
    emitted = await emit_run_events(stopped, flow_run_id=RUN_ID, flow_run_name="r")
    assert [e.event for e in emitted] == [COMPLETED, BUDGET_EXHAUSTED]
    assert [s["event"] for s in sent] == [COMPLETED, BUDGET_EXHAUSTED]
    assert flushed == [events.FLUSH_TIMEOUT_S]  # once, after both are queued


async def test_a_flush_that_times_out_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def slow_flush(timeout_s: float) -> bool:
        return False

    monkeypatch.setattr(events, "emit_event", lambda **kwargs: Event(**kwargs))
    monkeypatch.setattr(events, "flush_events", slow_flush)
    with caplog.at_level(logging.WARNING, logger=events.__name__):
        emitted = await emit_run_events(summary(), flow_run_id=None, flow_run_name=None)
    assert len(emitted) == 1
    assert "not confirmed sent within 10 s" in caplog.text


async def test_events_queued_before_a_failure_are_still_flushed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    flushed: list[float] = []

    def emit(**kwargs: Any) -> Event:
        if kwargs["event"] == BUDGET_EXHAUSTED:
            raise EventTooLarge(2_000_000, 1_500_000)
        return Event(**kwargs)

    async def flush(timeout_s: float) -> bool:
        flushed.append(timeout_s)
        return True

    monkeypatch.setattr(events, "emit_event", emit)
    monkeypatch.setattr(events, "flush_events", flush)
    with caplog.at_level(logging.WARNING, logger=events.__name__):
        emitted = await emit_run_events(summary(budget_exhausted=True), flow_run_id=None)
    assert [e.event for e in emitted] == [COMPLETED]
    assert flushed == [events.FLUSH_TIMEOUT_S]
    assert "run events not emitted: EventTooLarge" in caplog.text


async def test_a_worker_that_never_drains_does_not_hold_the_flow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class StuckWorker:
        def wait_until_empty(self) -> None:
            threading.Event().wait()  # as a worker that died with items queued

    monkeypatch.setattr(events.EventsWorker, "instance", classmethod(lambda cls: StuckWorker()))
    assert await events.flush_events(0.2) is False
