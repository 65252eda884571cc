"""The ``tryon_batch`` flow: wiring only. The work is in ``tasks`` and ``providers``."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.runners import dask_worker_threads, task_runner_from_env
from providers.base import ProviderError, TryOnClient
from providers.registry import PROVIDERS, REFINER, ProviderSpec, provider_spec
from schemas.manifest import InvalidRow, ManifestError, ManifestRow
from schemas.results import Stage, Status
from tasks.artifacts import ProgressTee, RunProgressArtifact, publish_run_outputs
from tasks.context import (
    ChunkSettings,
    credential_env_names,
    error_fields,
    error_from_fields,
    open_lane,
    open_stager,
    split_slots,
)
from tasks.credentials import load_secret_blocks
from tasks.fetch_guard import inputs_client_for, parse_allow_entry
from tasks.images import PreparedImageCache
from tasks.lake import Lake
from tasks.ledger import WorkLedger
from tasks.limits import global_limit_name, leased_slots
from tasks.process import (
    Lane,
    ProgressSink,
    RetryPolicy,
    RunContext,
    refine_not_applicable,
)
from tasks.report import ThumbnailBank
from tasks.tryon import (
    ChunkOutcome,
    invalid_records,
    load_manifest_task,
    process_chunk,
    record_invalid_rows,
    register_context,
    unregister_context,
)


class ProviderLimits(BaseModel):
    """Per-provider limits for one run. ``None`` takes the provider's documented default."""

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int | None = Field(
        default=None, ge=1, le=1024, description="Calls in flight for this run."
    )
    requests_per_second: float | None = Field(
        default=None, gt=0, description="Calls per second for this run."
    )
    global_max_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Set the account-wide limit shared by all runs and workers "
        "(a Prefect global concurrency limit 'tryon-<provider>'); unset: keep it as it is.",
    )


class BatchParams(BaseModel):
    """Parameters of a batch run (the Prefect UI renders them as a form)."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(
        description="Manifest URI: CSV or Parquet, a local path or any fsspec URL."
    )
    lake: str = Field(default="./lake", description="Lake root: a local folder or an fsspec URL.")
    provider: str = Field(default="changeclothes", description="Provider for rows that name none.")
    chunk_size: int = Field(default=100, ge=1, le=10_000, description="Rows per Prefect task.")
    limits: ProviderLimits = Field(default_factory=ProviderLimits)
    max_attempts: int = Field(
        default=4, ge=1, le=20, description="Provider calls per row, at most."
    )
    refine: bool = Field(
        default=False, description="Chain the AILabTools refiner onto every coarse result."
    )
    refine_gender: Literal["woman", "man"] | None = Field(
        default=None, description="Gender for rows without one (the refiner requires it)."
    )
    refine_limits: ProviderLimits = Field(default_factory=ProviderLimits)
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the lake, manifest and inputs."
    )
    fetch_allow: list[str] = Field(
        default_factory=list,
        description="Non-public destinations input image URLs may reach: CIDR networks "
        "(10.0.0.0/8, fd00::/8), single addresses or exact host names. Empty (default): "
        "loopback, private, CGNAT, link-local (cloud metadata), multicast and reserved "
        "addresses are refused, after DNS and on every redirect (FETCH_BLOCKED_ADDRESS).",
    )
    fetch_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Read timeout of an input image fetch in seconds (connect: at most 10).",
    )

    @field_validator("fetch_allow")
    @classmethod
    def _valid_fetch_allow(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(parse_allow_entry(entry) for entry in value))

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        return provider_spec(value).name

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Flow parameters are stored by Prefect and shown in its UI: never credentials."""
        found = sorted(_credential_keys(value))
        if found:
            raise ValueError(
                f"storage_options holds credentials ({', '.join(found)}): flow parameters are "
                "kept in Prefect's database and shown in its UI. Give them to the worker's "
                "environment instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                "AWS_SESSION_TOKEN; AWS_PROFILE or an instance role), and keep only "
                "non-secret options (endpoint_url, client_kwargs) here"
            )
        return value


_SECRET_KEY_WORDS = ("secret", "token", "password", "passwd", "credential", "sas")


def _credential_keys(options: object, prefix: str = "") -> list[str]:
    """Keys of ``options`` (nested dicts too) that name credentials (s3fs, gcsfs, adlfs...)."""
    found: list[str] = []
    if isinstance(options, dict):
        for key, item in options.items():
            name = str(key).lower()
            if name in ("key", "access_key", "access_key_id", "account_key") or any(
                word in name for word in _SECRET_KEY_WORDS
            ):
                found.append(f"{prefix}{key}")
            found += _credential_keys(item, f"{prefix}{key}.")
    return found


class RunSummary(BaseModel):
    run_id: str
    provider: str
    lake: str
    results_uri: str
    metadata_uri: str
    summary_uri: str
    contact_sheet_uri: str | None = None  # HTML; a JPEG grid beside it
    counts: dict[str, int]  # try-on stage (and invalid rows), by status
    refine_counts: dict[str, int] | None = None  # refine stage, by status, when refining
    unfinished: int = 0  # records a retry would redo (failed, or stopped by a fatal error)
    already_done: int = 0  # of the succeeded rows: done and recorded by earlier runs, no call
    total_rows: int
    provider_calls: int
    duration_s: float
    fatal_error: str | None = None
    fatal_at: datetime | None = None  # when the run learned of it: no call started after
    chunk_processes: list[str] = Field(default_factory=list)  # host:pid that ran chunks

    @property
    def exit_code(self) -> int:
        """0: every row succeeded (every stage that applies); 1: anything else."""
        done = self.counts.get(Status.SUCCEEDED, 0) == self.total_rows
        return 0 if done and not self.unfinished else 1

    def one_line(self) -> str:
        parts = [f"{self.counts.get(s, 0)} {s}" for s in ("succeeded", "failed", "invalid")]
        skipped = self.counts.get("skipped", 0)
        line = " / ".join(parts) + (f" / {skipped} skipped" if skipped else "")
        line = f"{line} of {self.total_rows} rows"
        if self.already_done:
            line += f" ({self.already_done} already done by earlier runs)"
        if self.refine_counts is not None:
            refined = ", ".join(f"{n} {s}" for s, n in sorted(self.refine_counts.items()))
            line += f"; refine: {refined or 'nothing to refine'}"
        return line


class RunNotStarted(Exception):
    """The run could not start: bad manifest, unknown provider, missing key, unwritable lake."""


class BatchIncomplete(Exception):
    """Some rows failed or were skipped; the flow run ends Failed so the UI can retry it."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__(f"batch incomplete: {summary.one_line()}")
        self.summary = summary


_progress_sink: ProgressSink | None = None


def set_progress_sink(sink: ProgressSink | None) -> None:
    """Let an interactive caller (the CLI) watch rows finish in this process."""
    global _progress_sink
    _progress_sink = sink


# Chunks in progress beyond those the provider slots need (see run_provider).
CHUNK_SPARES = 4


@dataclass(frozen=True, slots=True)
class _FinishedRow:
    """What progress sinks read of a row a remote chunk finished."""

    status: str


def _chunks(rows: list[ManifestRow], size: int) -> list[list[ManifestRow]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _capability_problems(
    row: ManifestRow, client: type[TryOnClient], params: BatchParams
) -> list[str]:
    """Why ``client`` cannot take ``row`` as the run is configured (checked before any call)."""
    caps, name = client.capabilities, client.name
    problems = []
    if (
        params.refine
        and refine_not_applicable(row) is None
        and not (row.gender or params.refine_gender)
    ):
        problems.append(
            "refine needs gender (woman|man): fill the gender column or set refine_gender"
        )
    if row.garment_image is None and not caps.prompt:
        problems.append(f"provider {name!r} needs garment_image (it has no prompt endpoint)")
    if row.lower_garment_image is not None and not caps.lower_garment:
        problems.append(f"provider {name!r} does not take lower_garment_image")
    if row.garment_image is not None and row.category not in caps.categories:
        problems.append(f"provider {name!r} does not take category {row.category!r}")
    return problems


def _run_id() -> str:
    current = flow_run.get_id()
    return str(current) if current else str(uuid.uuid4())


# The task runner is configuration (flows/runners.py): chunks on the flow's own event loop by
# default, or on a Dask cluster with TRYON_TASK_RUNNER=dask.
@flow(name="tryon-batch", log_prints=True, task_runner=task_runner_from_env())
async def tryon_batch(params: BatchParams) -> RunSummary:
    """Manifest -> validated rows -> chunked try-on at the provider's limits -> lake."""
    logger = get_run_logger()
    started = time.perf_counter()
    run_id = _run_id()
    try:
        lake = Lake.open(params.lake, storage_options=params.storage_options)
        lake.write_json(
            lake.path("runs", run_id, "started.json"),
            {"run_id": run_id, "started_at": datetime.now(UTC), "params": _public(params)},
        )
        default_spec = provider_spec(params.provider)
        report = await asyncio.to_thread(
            load_manifest_task, params.manifest, params.storage_options, sorted(PROVIDERS)
        )
    except (ManifestError, ValueError, OSError) as exc:
        raise RunNotStarted(str(exc)) from None

    # Group valid rows by provider; rows a provider cannot take become invalid, with the reason.
    invalid: list[InvalidRow] = list(report.invalid)
    by_provider: dict[str, list[ManifestRow]] = {}
    for row in report.valid:
        name = row.provider or default_spec.name
        problems = _capability_problems(row, PROVIDERS[name].client_class(), params)
        if problems:
            invalid.append(InvalidRow(row_index=row.row_index, row_id=row.id, reasons=problems))
        else:
            by_provider.setdefault(name, []).append(row)
    invalid.sort(key=lambda r: r.row_index)
    bad = invalid_records(run_id, default_spec.name, invalid, manifest=params.manifest)
    if bad:  # a task run costs a few API round trips: none when there is nothing to record
        await record_invalid_rows(lake, run_id, bad)
    # The CLI's progress bar (when there is one) and a Prefect progress artifact.
    progress = RunProgressArtifact()
    sink = ProgressTee(_progress_sink, progress)
    sink.started(report.n_rows)
    for record in bad:
        sink.row_done(record)

    outcomes: list[ChunkOutcome] = []
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(progress)  # 0 % now, 100 % (or where it stopped) at exit
        # Guarded: no loopback, private or link-local address unless fetch_allow names it.
        inputs_http = await stack.enter_async_context(
            inputs_client_for(params.fetch_allow, timeout_s=params.fetch_timeout_s)
        )
        # Credentials the environment lacks may come from Prefect Secret blocks.
        await load_secret_blocks(credential_env_names(list(by_provider), refine=params.refine))

        async def lane_for(spec: ProviderSpec, limits: ProviderLimits) -> Lane:
            wanted = limits.max_in_flight or spec.max_in_flight
            # The account's limit is shared with every other run: lease our share once.
            in_flight = await stack.enter_async_context(
                leased_slots(
                    spec.name,
                    wanted=wanted,
                    default_limit=spec.max_in_flight,
                    override=limits.global_max_in_flight,
                )
            )
            if in_flight < wanted:
                logger.warning(
                    "%s: %d in flight asked, %d allowed by the global limit %s",
                    spec.name,
                    wanted,
                    in_flight,
                    global_limit_name(spec.name),
                )
            rps = limits.requests_per_second or spec.requests_per_second
            try:
                return await open_lane(stack, spec, in_flight=in_flight, requests_per_second=rps)
            except (ProviderError, ValueError) as exc:  # missing or malformed configuration
                raise RunNotStarted(str(exc)) from None

        refine_lane = await lane_for(REFINER, params.refine_limits) if params.refine else None
        # On Dask, chunks run in other processes: each rebuilds its context from settings.
        dask_threads = dask_worker_threads(FlowRunContext.get().task_runner)
        images = PreparedImageCache()
        # Contact-sheet thumbnails made as rows go, while the CPU waits on providers.
        thumbnails = ThumbnailBank()
        contexts: list[RunContext] = []
        for name, rows in by_provider.items():
            lane = await lane_for(PROVIDERS[name], params.limits)
            try:
                stager = open_stager(stack, lake, lane)
            except ValueError as exc:
                raise RunNotStarted(str(exc)) from None
            ctx = RunContext(
                run_id=run_id,
                lane=lane,
                refine=refine_lane,
                default_gender=params.refine_gender,
                stager=stager,
                http=inputs_http,
                lake=lake,
                images=images,
                retry=RetryPolicy(max_attempts=params.max_attempts),
                storage_options=params.storage_options,
                progress=sink,
                ledger=WorkLedger(lake, run_id),
                thumbnails=thumbnails,
            )
            if dask_threads is None:  # chunks run here, on this loop, with these objects
                register_context(ctx)
                stack.callback(unregister_context, ctx)
            contexts.append(ctx)
            logger.info("%s: %d rows, %d in flight", name, len(rows), lane.max_in_flight)

        # Chunks in progress: enough to keep every provider slot busy, plus spares so that a
        # chunk waiting on one slow row (a hung call runs to the client's timeout) does not
        # idle the others. Rows in progress stay bounded by the run's row slots either way.
        async def run_provider(ctx: RunContext, rows: list[ManifestRow]) -> None:
            chunks = _chunks(rows, params.chunk_size)
            parallel = math.ceil(2 * ctx.lane.max_in_flight / params.chunk_size) + CHUNK_SPARES
            gate = asyncio.Semaphore(parallel)

            async def one(index: int, chunk: list[ManifestRow]) -> None:
                async with gate:
                    outcomes.append(await process_chunk(run_id, ctx.lane.name, index, chunk))

            if dask_threads is None:
                await asyncio.gather(*(one(i, c) for i, c in enumerate(chunks)))
            else:
                await run_on_dask(ctx, chunks, dask_threads)

        async def run_on_dask(
            ctx: RunContext, chunks: list[list[ManifestRow]], threads: int
        ) -> None:
            """Chunks as Dask tasks, as many at once as the cluster has threads. Each running
            chunk holds a share of the run's leased slots (and rate), so together they never
            exceed what the run holds. Chunks started after one reports a run-fatal error are
            told of it: they record their rows as not attempted, without calling."""
            lane, refine = ctx.lane, ctx.refine
            parallel = min(len(chunks), threads, lane.max_in_flight)
            tryon_shares = split_slots(lane.max_in_flight, parallel)
            refine_shares = split_slots(refine.max_in_flight, parallel) if refine else []
            shares: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
            for i, share in enumerate(tryon_shares):
                shares.put_nowait((share, refine_shares[i % len(refine_shares)] if refine else 1))

            def rate(one: Lane | None, share: int) -> float | None:
                rps = one.requests_per_second if one else None
                return rps * share / one.max_in_flight if one and rps else None

            async def one_remote(index: int, chunk: list[ManifestRow]) -> None:
                share, refine_share = await shares.get()
                try:
                    settings = ChunkSettings(
                        lake=params.lake,
                        storage_options=params.storage_options,
                        max_in_flight=share,
                        requests_per_second=rate(lane, share),
                        refine=refine is not None,
                        refine_max_in_flight=refine_share,
                        refine_requests_per_second=rate(refine, refine_share),
                        refine_gender=params.refine_gender,
                        max_attempts=params.max_attempts,
                        fetch_allow=params.fetch_allow,
                        fetch_timeout_s=params.fetch_timeout_s,
                        fatal=error_fields(lane.state.fatal),
                        refine_fatal=error_fields(refine.state.fatal) if refine else None,
                    )
                    future = process_chunk.submit(run_id, lane.name, index, chunk, settings)
                    outcome: ChunkOutcome = await asyncio.to_thread(future.result)
                finally:
                    shares.put_nowait((share, refine_share))
                outcomes.append(outcome)
                # The first fatal error wins, as in-process.
                if outcome.fatal and lane.state.fatal is None:
                    lane.state.fatal = error_from_fields(outcome.fatal)
                    lane.state.fatal_at = time.time()
                if refine and outcome.refine_fatal and refine.state.fatal is None:
                    refine.state.fatal = error_from_fields(outcome.refine_fatal)
                for status, n in outcome.counts.get(Stage.TRYON, {}).items():
                    for _ in range(n):
                        sink.row_done(_FinishedRow(status=status))

            await asyncio.gather(*(one_remote(i, c) for i, c in enumerate(chunks)))

        await asyncio.gather(*(run_provider(ctx, by_provider[ctx.lane.name]) for ctx in contexts))
        lanes = [ctx.lane for ctx in contexts] + ([refine_lane] if refine_lane else [])
        stopped = next((lane.state for lane in lanes if lane.state.fatal), None)
        fatal = stopped.fatal if stopped else None

    counts: Counter[str] = Counter({str(Status.INVALID): len(invalid)} if invalid else {})
    refine_counts: Counter[str] = Counter()
    for outcome in outcomes:
        counts.update(outcome.counts.get(Stage.TRYON, {}))
        refine_counts.update(outcome.counts.get(Stage.REFINE, {}))
    summary = RunSummary(
        run_id=run_id,
        provider=default_spec.name,
        lake=lake.uri,
        results_uri=lake.full_uri(lake.path("outputs")),
        metadata_uri=lake.metadata_glob(),
        summary_uri=lake.full_uri(lake.path("runs", run_id, "summary.json")),
        contact_sheet_uri=lake.full_uri(lake.run_path(run_id, "contact_sheet.html")),
        counts=dict(counts),
        refine_counts=dict(refine_counts) if params.refine else None,
        unfinished=sum(o.unfinished for o in outcomes),
        already_done=sum(o.already_done for o in outcomes),
        total_rows=report.n_rows,
        provider_calls=sum(o.provider_calls for o in outcomes),
        duration_s=round(time.perf_counter() - started, 3),
        fatal_error=str(fatal) if fatal else None,
        fatal_at=(
            datetime.fromtimestamp(stopped.fatal_at, UTC) if stopped and stopped.fatal_at else None
        ),
        chunk_processes=sorted({o.process for o in outcomes}),
    )
    lake.write_json(lake.path("runs", run_id, "summary.json"), summary.model_dump(mode="json"))
    # Last: readers and reruns trust this run's metadata from here on.
    await asyncio.to_thread(
        lake.commit_run, run_id, {"run_id": run_id, "committed_at": datetime.now(UTC)}
    )
    logger.info("run %s: %s", run_id, summary.one_line())
    # For people: the contact sheet in the lake, a summary table and a report in Prefect.
    await publish_run_outputs(lake, summary, bank=thumbnails)
    if fatal is not None:
        logger.error("stopped submitting after a run-fatal error: %s", fatal)
    if summary.unfinished:
        raise BatchIncomplete(summary)
    return summary


def _public(params: BatchParams) -> dict[str, Any]:
    """Parameters safe to store: storage option values may hold credentials."""
    data = params.model_dump(mode="json")
    data["storage_options"] = sorted(params.storage_options)
    return data
