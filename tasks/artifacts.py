"""Prefect artifacts for a run: a status table, a scorecard, a markdown report and a live
progress bar.

Thin: the tallies and the contact sheet are built in ``tasks.report`` (Prefect-free). Every
call here uses the explicit async forms of Prefect 3.9 (``acreate_*``,
``aupdate_progress_artifact``), so the async flow awaits them on its own event loop instead of
going through ``async_dispatch``'s guessing.

Keys are stable across runs (``tryon-run-summary``...): Prefect versions an artifact per key,
so the Artifacts page shows the latest run with its history, and each flow run's page shows
its own. Strings from the manifest or providers are escaped before they reach markdown, which
the UI renders.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol
from uuid import UUID

import polars as pl
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from schemas.results import RowRecord, Status
from tasks.lake import Lake
from tasks.process import ProgressSink
from tasks.report import (
    ContactSheetUris,
    FailureGroup,
    StatusCount,
    ThumbnailBank,
    count_statuses,
    group_failures,
    read_run_records,
    write_contact_sheet,
)
from tasks.scorecard import (
    SCORECARD_FILE,
    run_scorecard,
    scorecard_bytes,
    scorecard_rows,
)

__all__ = [
    "PROGRESS_KEY",
    "REPORT_KEY",
    "SCORECARD_KEY",
    "SUMMARY_TABLE_KEY",
    "ProgressTee",
    "RunFacts",
    "RunProgressArtifact",
    "RunReport",
    "artifact_key",
    "publish_report_markdown",
    "publish_run_outputs",
    "publish_scorecard_table",
    "publish_summary_table",
    "render_report_markdown",
    "scorecard_table",
    "summary_table",
]

SUMMARY_TABLE_KEY: Final = "tryon-run-summary"
REPORT_KEY: Final = "tryon-run-report"
PROGRESS_KEY: Final = "tryon-run-progress"
SCORECARD_KEY: Final = "tryon-run-scorecard"

_STATUS_COLUMNS: Final = tuple(str(s) for s in Status)
_KEY_JUNK_RE: Final = re.compile(r"[^a-z0-9-]+")
# Values sit mid-line (sentences, table cells): only inline markup and the cell separator count.
_MARKDOWN_SPECIAL_RE: Final = re.compile(r"([\\`*_{}\[\]()|~])")
_MESSAGE_CHARS: Final = 200


def artifact_key(text: str) -> str:
    """``text`` as a valid Prefect artifact key: lowercase letters, digits and dashes only."""
    key = _KEY_JUNK_RE.sub("-", text.lower()).strip("-")
    if not key:
        raise ValueError(f"no artifact key can be made from {text!r}")
    return key


def _logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow run (tests, scripts)
        return logging.getLogger(__name__)


# -------------------------------------------------------------------------------- table


def summary_table(counts: Sequence[StatusCount]) -> list[dict[str, str | int]]:
    """One row per (provider, stage), a column per status, and the total."""
    tallies: dict[tuple[str, str], dict[str, int]] = {}
    for count in counts:
        tally = tallies.setdefault((count.provider, count.stage), dict.fromkeys(_STATUS_COLUMNS, 0))
        tally[count.status] = tally.get(count.status, 0) + count.records
    return [
        {"provider": provider, "stage": stage, **tally, "total": sum(tally.values())}
        for (provider, stage), tally in sorted(tallies.items())
    ]


async def publish_summary_table(
    counts: Sequence[StatusCount], *, key: str = SUMMARY_TABLE_KEY, description: str | None = None
) -> UUID:
    """A table artifact: records by provider x stage x status. Returns the artifact id."""
    return await acreate_table_artifact(
        summary_table(counts),
        key=artifact_key(key),
        description=description or "Rows by provider, stage and status",
    )


def scorecard_table(score: pl.DataFrame) -> list[dict[str, str | int | float | None]]:
    """The run's scorecard (``tasks.scorecard``) as table rows: codes as "CODE 3, CODE2 1",
    text escaped (the UI renders cells as markdown), numbers as they are; no run id (the
    artifact belongs to the run)."""
    return [
        {name: _md(value) if isinstance(value, str) else value for name, value in row.items()}
        for row in scorecard_rows(score.drop("run_id", strict=False))
    ]


async def publish_scorecard_table(
    score: pl.DataFrame, *, key: str = SCORECARD_KEY, description: str | None = None
) -> UUID:
    """A table artifact: the run's scorecard, a row per provider and stage."""
    return await acreate_table_artifact(
        scorecard_table(score),
        key=artifact_key(key),
        description=description or "Rows, outcomes, calls, time and fallbacks by provider",
    )


# ----------------------------------------------------------------------------- markdown


@dataclass(frozen=True, slots=True)
class RunReport:
    """What the markdown report says about one run."""

    run_id: str
    total_rows: int
    counts: Sequence[StatusCount]
    failures: Sequence[FailureGroup]
    results_uri: str
    metadata_uri: str  # the dataset, every run
    run_metadata_uri: str | None = None  # this run's partition
    summary_uri: str | None = None
    contact_sheet: ContactSheetUris | None = None
    scorecard_uri: str | None = None
    duration_s: float | None = None
    fatal_error: str | None = None
    currency: str | None = None  # set: the run counted money
    cost: float | None = None  # None with a currency: a price in play was unknown
    budget: float | None = None


def _md(text: object, *, limit: int | None = None) -> str:
    """Untrusted text as inert markdown: one line, no HTML, markdown punctuation escaped."""
    value = " ".join(str(text).split())
    if limit is not None and len(value) > limit:
        value = value[: limit - 3] + "..."
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL_RE.sub(r"\\\1", value)


def _md_code(text: str) -> str:
    """An id, a code or a URI verbatim in a code span (lake URIs are paths or s3://, not links);
    escaped text when it could break out of the span or a table cell, or carries markup."""
    return _md(text) if any(ch in text for ch in "`|<>&\n\r") else f"`{text}`"


def render_report_markdown(report: RunReport) -> str:
    lines = [f"# Try-on run {_md_code(report.run_id)}", ""]
    totals: dict[str, dict[str, int]] = {}
    for count in report.counts:
        stage = totals.setdefault(count.stage, {})
        stage[count.status] = stage.get(count.status, 0) + count.records
    summary = f"**{report.total_rows} rows.**"
    for stage_name, statuses in sorted(totals.items(), key=lambda kv: kv[0] != "tryon"):
        parts = ", ".join(f"{statuses[s]} {s}" for s in _STATUS_COLUMNS if s in statuses)
        summary += f" {_md(stage_name)}: {parts}."
    if report.duration_s is not None:
        summary += f" Took {report.duration_s:.1f} s."
    if report.currency is not None:
        currency = _md(report.currency)
        spent = f"{report.cost:g} {currency}" if report.cost is not None else "unknown"
        budget = f" of a {report.budget:g} {currency} budget" if report.budget is not None else ""
        unknown = " (a provider's price is unknown)" if report.cost is None else ""
        summary += f" Cost: {spent}{budget}{unknown}."
    lines += [summary, ""]
    if report.fatal_error:
        lines += [f"**Stopped submitting after a run-fatal error:** {_md(report.fatal_error)}", ""]

    table = summary_table(report.counts)
    if table:
        columns = list(table[0])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_md(row[c]) for c in columns) + " |" for row in table]
        lines.append("")

    lines += ["## Outputs", ""]
    if report.contact_sheet is not None:
        lines.append(
            f"- Contact sheet: {_md_code(report.contact_sheet.html)} "
            f"(image: {_md_code(report.contact_sheet.jpeg)})"
        )
    lines.append(f"- Results: {_md_code(report.results_uri)}")
    lines.append(f"- Metadata: {_md_code(report.metadata_uri)} (read with `polars.scan_parquet`)")
    if report.run_metadata_uri:
        lines.append(f"- This run's metadata: {_md_code(report.run_metadata_uri)}")
    if report.summary_uri:
        lines.append(f"- Summary: {_md_code(report.summary_uri)}")
    if report.scorecard_uri:
        lines.append(f"- Scorecard: {_md_code(report.scorecard_uri)} (per provider and stage)")
    lines.append("")

    if report.failures:
        lines += [
            "## Rows not succeeded, by error code",
            "",
            "| stage | status | code | kind | rows | examples | message |",
            "|---|---|---|---|---|---|---|",
        ]
        for group in report.failures:
            cells = [
                _md(group.stage),
                _md(group.status),
                _md_code(group.error_code) if group.error_code else "-",
                _md(group.error_kind or "-"),
                str(group.records),
                ", ".join(_md_code(row_id[:64]) for row_id in group.example_row_ids)
                + (", ..." if group.records > len(group.example_row_ids) else ""),
                _md(group.example_message or "", limit=_MESSAGE_CHARS),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


async def publish_report_markdown(
    report: RunReport, *, key: str = REPORT_KEY, description: str | None = None
) -> UUID:
    """A markdown artifact: counts, where the outputs are, failures by error code."""
    return await acreate_markdown_artifact(
        render_report_markdown(report),
        key=artifact_key(key),
        description=description or f"Try-on run {report.run_id}",
    )


# ----------------------------------------------------------------------------- progress


@dataclass(eq=False)
class RunProgressArtifact:
    """A progress artifact kept current while the run goes, without flooding the API.

    Also a ``ProgressSink`` (``started``/``row_done``), so the flow can hand it to the row
    pipeline. An update goes out only when at least ``min_interval_s`` has passed *and*
    progress moved by ``min_step_pct`` since the last one, one request at a time, in the
    background: a slow or failing API never slows rows down or fails the run.
    Use as ``async with RunProgressArtifact() as progress:``; leaving the block normally
    sends 100 %; leaving on an exception sends where the run stopped.
    """

    key: str = PROGRESS_KEY
    description: str | None = "Rows finished"
    min_interval_s: float = 1.0
    min_step_pct: float = 1.0
    clock: Callable[[], float] = time.monotonic
    artifact_id: UUID | None = field(default=None, init=False)
    total: int = field(default=0, init=False)
    done: int = field(default=0, init=False)
    sent: list[float] = field(default_factory=list, init=False)  # values the API accepted
    _last_pct: float = field(default=0.0, init=False)
    _last_at: float = field(default=float("-inf"), init=False)
    _pending: asyncio.Task[None] | None = field(default=None, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _loop_thread: int | None = field(default=None, init=False)

    async def __aenter__(self) -> RunProgressArtifact:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.artifact_id = await acreate_progress_artifact(
            0.0, key=artifact_key(self.key), description=self.description
        )
        self._last_at = self.clock()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.finish(complete=exc_type is None)

    @property
    def percent(self) -> float:
        if self.total <= 0:
            return 0.0
        return min(100.0, 100.0 * self.done / self.total)

    # -- ProgressSink ---------------------------------------------------------------------
    def started(self, total: int) -> None:
        self.total = total

    def row_done(self, record: RowRecord) -> None:
        self._on_loop(self._advance, 1)

    # -- direct use -------------------------------------------------------------------------
    def update(self, done: int, total: int | None = None) -> None:
        """Set rows done (and the total); sent if due. For callers that are not a sink."""
        self._on_loop(self._set, done, total)

    async def wait_sent(self) -> None:
        """Wait for the update in flight, if any."""
        if self._pending is not None:
            await self._pending

    async def finish(self, *, complete: bool = True) -> None:
        """Wait for any update in flight, then send the final value (100 when complete)."""
        await self.wait_sent()
        if self.artifact_id is None:
            return
        final = 100.0 if complete else self.percent
        if not self.sent or self.sent[-1] != final:
            await self._send(final)

    def _on_loop(self, action: Callable[..., None], *args: Any) -> None:
        """Run ``action`` on the flow's loop thread, so the counters need no lock."""
        if self._loop is None or threading.get_ident() == self._loop_thread:
            action(*args)
        else:
            self._loop.call_soon_threadsafe(action, *args)

    def _advance(self, rows: int) -> None:
        self.done += rows
        self._maybe_send()

    def _set(self, done: int, total: int | None) -> None:
        if total is not None:
            self.total = total
        self.done = done
        self._maybe_send()

    def _maybe_send(self) -> None:
        if self.artifact_id is None or self._loop is None:
            return
        if self._pending is not None and not self._pending.done():
            return
        pct, now = self.percent, self.clock()
        if now - self._last_at < self.min_interval_s or pct - self._last_pct < self.min_step_pct:
            return
        self._last_pct, self._last_at = pct, now
        self._pending = self._loop.create_task(self._send(pct))

    async def _send(self, pct: float) -> None:
        assert self.artifact_id is not None
        try:
            await aupdate_progress_artifact(self.artifact_id, round(pct, 1))
        # Progress is cosmetic: an API hiccup is logged, never raised into the run.
        except Exception as exc:
            _logger().warning("progress artifact update failed: %s", type(exc).__name__)
            return
        self.sent.append(round(pct, 1))


class ProgressTee:
    """One ``ProgressSink`` forwarding to several (``None``s ignored)."""

    def __init__(self, *sinks: ProgressSink | None) -> None:
        self.sinks = [sink for sink in sinks if sink is not None]

    def started(self, total: int) -> None:
        for sink in self.sinks:
            sink.started(total)

    def row_done(self, record: RowRecord) -> None:
        for sink in self.sinks:
            sink.row_done(record)


# ------------------------------------------------------------------------ all at run end


class RunFacts(Protocol):
    """What the end-of-run report needs from the flow's summary (``schemas.summary.RunSummary``)."""

    @property
    def run_id(self) -> str: ...
    @property
    def total_rows(self) -> int: ...
    @property
    def results_uri(self) -> str: ...
    @property
    def metadata_uri(self) -> str: ...
    @property
    def summary_uri(self) -> str: ...
    @property
    def duration_s(self) -> float: ...
    @property
    def fatal_error(self) -> str | None: ...
    @property
    def currency(self) -> str | None: ...
    @property
    def cost(self) -> float | None: ...
    @property
    def budget(self) -> float | None: ...


async def publish_run_outputs(
    lake: Lake,
    run: RunFacts,
    *,
    records: Sequence[RowRecord] | None = None,
    bank: ThumbnailBank | None = None,
    prompts: Mapping[int, str] | None = None,
) -> ContactSheetUris | None:
    """At the end of a run: the contact sheet and the scorecard in the lake, and the table,
    scorecard and report artifacts.

    Reads the run's records back from the lake (``read_run_records``) unless given. The sheet
    shows inputs only from ``bank`` (what the run held) and fetches nothing; ``prompts``: the
    prompt rows' texts by row index, which the records do not hold. The scorecard
    (``runs/<run_id>/scorecard.parquet``) counts this run's own records (not those an earlier
    run recorded).
    Reporting never changes the run's outcome: a failure is logged and the rest still
    published. Returns the contact sheet's URIs, or None if it could not be written.
    """
    logger = _logger()
    if records is None:
        records = await asyncio.to_thread(read_run_records, lake, run.run_id)
    counts = count_statuses(records)
    score: pl.DataFrame | None = None
    try:
        score = await asyncio.to_thread(run_scorecard, records)
    except Exception as exc:  # reporting must not fail a run whose results are safe
        logger.warning("scorecard not computed: %s: %s", type(exc).__name__, exc)

    async def contact_sheet() -> ContactSheetUris | None:
        try:
            return await write_contact_sheet(
                lake,
                run.run_id,
                records,
                bank=bank,
                manifest_rows=run.total_rows,
                prompts=prompts,
                score=score,
            )
        # Reporting must not fail a run whose results are already safe in the lake.
        except Exception as exc:
            logger.warning("contact sheet not written: %s: %s", type(exc).__name__, exc)
            return None

    async def table() -> None:
        try:
            await publish_summary_table(counts)
        except Exception as exc:
            logger.warning("summary table not published: %s: %s", type(exc).__name__, exc)

    async def score_outputs() -> str | None:
        if score is None:
            return None
        uri: str | None = None
        try:
            path = lake.run_path(run.run_id, SCORECARD_FILE)
            uri = await lake.awrite_bytes(path, await asyncio.to_thread(scorecard_bytes, score))
        except Exception as exc:
            logger.warning("scorecard not written: %s: %s", type(exc).__name__, exc)
        try:
            await publish_scorecard_table(score)
        except Exception as exc:
            logger.warning("scorecard table not published: %s: %s", type(exc).__name__, exc)
        return uri

    # The sheet is CPU in threads, the tables API calls: together, not one after the other.
    sheet, _, score_uri = await asyncio.gather(contact_sheet(), table(), score_outputs())
    report = RunReport(
        run_id=run.run_id,
        total_rows=run.total_rows,
        counts=counts,
        failures=group_failures(records),
        results_uri=run.results_uri,
        metadata_uri=run.metadata_uri,
        run_metadata_uri=lake.full_uri(lake.path("metadata", f"run_id={run.run_id}")),
        summary_uri=run.summary_uri,
        contact_sheet=sheet,
        scorecard_uri=score_uri,
        duration_s=run.duration_s,
        fatal_error=run.fatal_error,
        currency=run.currency,
        cost=run.cost,
        budget=run.budget,
    )
    try:
        await publish_report_markdown(report)
    except Exception as exc:
        logger.warning("run report not published: %s: %s", type(exc).__name__, exc)
    return sheet
