"""Prefect events at the end of a run, for Prefect Automations to act on (notify someone).

``tryon.run.completed`` for every run that ends with a summary, whatever its outcome, and
``tryon.run.budget-exhausted`` as well when the budget stopped it. Both carry the run's counts
and spend in their payload (README, "Notifications: Prefect events and automations").

``run_events`` builds them from a ``RunSummary`` and touches nothing (tested without Prefect);
``emit_run_events`` sends them and waits until Prefect's events worker has handed them to the
server, so neither the flow's return nor the process's exit loses them. Sending never fails
a run: its results are already committed when this runs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Final

from prefect.events import emit_event
from prefect.events.schemas.events import Event
from prefect.events.worker import EventsWorker
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from schemas.summary import RunSummary
from tasks.manifest import redact_uri

COMPLETED: Final = "tryon.run.completed"
BUDGET_EXHAUSTED: Final = "tryon.run.budget-exhausted"

# A fatal error's message is cut here in the payload: enough for a notification, and a
# provider's text (already free of secrets) stays short. The summary has it whole.
FATAL_MESSAGE_CHARS: Final = 200
# How long the flow waits for its events to reach the server before going on without
# knowing (the events worker keeps sending; the process's exit drains it too).
FLUSH_TIMEOUT_S: Final = 10.0

# ``str(ProviderError)``: "[provider CODE] message" (providers/base.py).
_FATAL = re.compile(r"\[(?:(?P<provider>[^\s\]]+) )?(?P<code>[^\s\]]+)\]\s*(?P<message>.*)", re.S)


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One event to emit: ``prefect.events.emit_event``'s arguments."""

    event: str
    resource: dict[str, str]
    payload: dict[str, Any]
    related: list[dict[str, str]] = field(default_factory=list)


def fatal_error_fields(fatal_error: str | None) -> dict[str, str | None] | None:
    """``{"code", "provider", "message"}`` of a summary's fatal error (the message cut short),
    or None when nothing stopped the run."""
    if not fatal_error:
        return None
    found = _FATAL.match(fatal_error.strip())
    if found is None:  # not a ProviderError's text: no code to give
        code, provider, message = None, None, fatal_error.strip()
    else:
        code, provider, message = found["code"], found["provider"], found["message"]
    if len(message) > FATAL_MESSAGE_CHARS:
        message = message[: FATAL_MESSAGE_CHARS - 1] + "…"
    return {"code": code, "provider": provider, "message": message}


def run_payload(summary: RunSummary) -> dict[str, Any]:
    """What an automation's notification can say about the run (JSON types only)."""
    return {
        "run_id": summary.run_id,
        "provider": summary.provider,
        "lake": redact_uri(summary.lake),
        "summary_uri": redact_uri(summary.summary_uri),
        "contact_sheet_uri": (
            redact_uri(summary.contact_sheet_uri) if summary.contact_sheet_uri else None
        ),
        "total_rows": summary.total_rows,
        "counts": dict(summary.counts),
        "refine_counts": dict(summary.refine_counts) if summary.refine_counts is not None else None,
        "compare_counts": {name: dict(c) for name, c in summary.compare_counts.items()},
        "fell_back": summary.fell_back,
        "already_done": summary.already_done,
        "unfinished": summary.unfinished,
        "provider_calls": summary.provider_calls,
        "duration_s": summary.duration_s,
        "currency": summary.currency,
        "cost": summary.cost,
        "budget": summary.budget,
        "budget_exhausted": summary.budget_exhausted,
        "fatal_error": fatal_error_fields(summary.fatal_error),
        # Codes and counts only: an example message may quote a provider or the manifest.
        "top_errors": [
            {"stage": e.stage, "code": e.code, "count": e.count, "source": e.source}
            for e in summary.top_errors
        ],
    }


def run_events(
    summary: RunSummary, *, flow_run_id: str | None, flow_run_name: str | None
) -> list[EventSpec]:
    """The events a finished run emits: ``tryon.run.completed`` always, then
    ``tryon.run.budget-exhausted`` when the budget stopped the run.

    The resource is the run (``tryon.run.<run_id>``), labelled with what an automation's
    trigger can match on (``match`` reads resource labels, not the payload): its provider,
    lake and unfinished count (``"!0"`` matches runs a retry would continue). The flow run is
    related (role ``flow-run``), so the events show on its page and an action's template can
    reach it as ``flow_run``.
    """
    resource = {
        "prefect.resource.id": f"tryon.run.{summary.run_id}",
        "prefect.resource.name": flow_run_name or summary.run_id,
        "tryon.provider": summary.provider,
        "tryon.lake": redact_uri(summary.lake),
        "tryon.unfinished": str(summary.unfinished),
    }
    related: list[dict[str, str]] = []
    if flow_run_id:
        flow_run_resource = {
            "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
            "prefect.resource.role": "flow-run",
        }
        if flow_run_name:
            flow_run_resource["prefect.resource.name"] = flow_run_name
        related.append(flow_run_resource)
    payload = run_payload(summary)
    names = [COMPLETED, *([BUDGET_EXHAUSTED] if summary.budget_exhausted else [])]
    return [
        EventSpec(event=name, resource=dict(resource), payload=payload, related=list(related))
        for name in names
    ]


async def emit_run_events(
    summary: RunSummary,
    *,
    flow_run_id: str | None = None,
    flow_run_name: str | None = None,
    flush_timeout_s: float = FLUSH_TIMEOUT_S,
) -> list[Event]:
    """Emit the run's events (the current flow run's id and name unless given) and wait, at
    most ``flush_timeout_s``, until they are sent. Returns the events emitted (none when
    Prefect emits no events here). Never raises: a failure is a warning in the run's log."""
    # Notifications must not fail a run whose results are committed: errors are warnings.
    logger = _logger()
    emitted: list[Event] = []
    try:
        specs = run_events(
            summary,
            flow_run_id=flow_run_id or flow_run.get_id(),
            flow_run_name=flow_run_name or flow_run.get_name(),
        )
        for spec in specs:
            event = emit_event(
                event=spec.event,
                resource=spec.resource,
                related=spec.related,
                payload=spec.payload,
            )
            if event is not None:
                emitted.append(event)
    except Exception as exc:  # e.g. EventTooLarge: the ones already queued are still sent
        logger.warning("run events not emitted: %s: %s", type(exc).__name__, exc)
    try:
        if emitted and not await flush_events(flush_timeout_s):
            logger.warning(
                "run events not confirmed sent within %.0f s; they may arrive late or not at all",
                flush_timeout_s,
            )
    except Exception as exc:
        logger.warning("run events not flushed: %s: %s", type(exc).__name__, exc)
    return emitted


async def flush_events(timeout_s: float) -> bool:
    """Wait until Prefect's events worker has sent everything queued; False after
    ``timeout_s``.

    ``emit_event`` only queues: the worker sends from Prefect's loop thread, and a process
    drains it at a normal exit, but not when it is ended abruptly once its flow run is final
    (killed, its container stopped). The wait is on a daemon thread, since
    ``wait_until_empty`` has no timeout and never returns if the worker died with items queued.
    """
    worker = EventsWorker.instance()  # emit_event's own: same settings, same instance
    waiter = threading.Thread(
        target=worker.wait_until_empty, name="tryon-events-flush", daemon=True
    )
    waiter.start()
    await asyncio.to_thread(waiter.join, timeout_s)
    return not waiter.is_alive()


def _logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow run (tests, scripts)
        return logging.getLogger(__name__)
