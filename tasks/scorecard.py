"""The scorecard: per provider and stage (and run), what a run's rows cost and how they ended.

Prefect-free, Polars only (plus the lake's filesystem to read committed runs back). The same
``scorecard`` serves one run (its records, ``records_frame``) and many (``read_committed`` over
the lake's committed metadata, ``filter_records``, then ``scorecard``).

Columns (one row per provider and stage; per run too with ``by_run``):

- ``rows``: distinct manifest rows, by ``row_index`` within a run (summed over runs);
- ``records``: metadata records. More than ``rows`` when a provider met the same row twice
  (compared, and also its fallback);
- ``succeeded``, ``failed``, ``skipped``, ``invalid``: records by status. A record that went on
  to a fallback (``fallback_to`` set) is not the row's outcome but it is a failure of its
  provider: counted here as ``failed`` (``skipped`` if a run-fatal error kept it from its
  provider), under its code in ``failed_by_code``, and in ``fallbacks_out``. The row's success,
  if the fallback provider succeeded, is that provider's ``succeeded`` (and ``fallbacks_in``);
- ``failed_by_code``: the failed records' error codes with their counts, most frequent first
  (a null code is kept null and shown as "no code");
- ``attempts``: provider calls that really went out (the records' ``attempts`` summed);
- ``provider_ms_p50``, ``provider_ms_p95``: percentiles (linear interpolation between the
  closest ranks, numpy's default) of ``provider_ms`` over the records that made calls
  (``attempts > 0`` and ``provider_ms`` set); null when none did;
- ``fallbacks_out``: records with ``fallback_to`` set (the row went on to another provider);
- ``fallbacks_in``: records with ``fallback_from`` set (the row came from another provider);
- ``cost``: what the records' calls cost (``cost`` summed; null when a record's price was
  unknown). Runs in different currencies are not told apart here: keep ``--run`` to one.

A run's scorecard leaves out the records an earlier committed run's metadata holds
(``already_recorded``): this run made no call for them and its metadata does not hold them, so
the run's scorecard and ``tryon scorecard --run`` agree.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, Final

import polars as pl

from schemas.manifest import is_safe_id
from schemas.results import METADATA_SCHEMA, RowRecord, Stage, Status, records_to_frame
from tasks.lake import Lake

__all__ = [
    "CODE_SCHEMA",
    "SCORECARD_FILE",
    "SCORECARD_INPUTS",
    "SCORECARD_SCHEMA",
    "SCORE_HEADINGS",
    "CommittedRuns",
    "align_records",
    "filter_records",
    "format_codes",
    "parse_time",
    "read_committed",
    "records_frame",
    "run_scorecard",
    "score_line",
    "scorecard",
    "scorecard_bytes",
    "scorecard_flat",
    "scorecard_rows",
    "scorecard_text_rows",
]

SCORECARD_FILE: Final = "scorecard.parquet"
NO_CODE: Final = "no code"

# The metadata columns the scorecard and its filters read; a part written before one existed
# reads it as null (``align_records``).
SCORECARD_INPUTS: Final = (
    "run_id",
    "row_index",
    "stage",
    "provider",
    "track",
    "fallback_from",
    "fallback_to",
    "status",
    "error_code",
    "category",
    "attempts",
    "provider_ms",
    "started_at",
    "cost",
)

CODE_SCHEMA: Final = pl.Struct({"code": pl.String(), "count": pl.Int64()})
_COUNTS: Final = ("rows", "records", "succeeded", "failed", "skipped", "invalid")
SCORECARD_SCHEMA: Final[dict[str, pl.DataType]] = {
    "run_id": pl.String(),  # only with by_run
    "provider": pl.String(),
    "stage": pl.String(),
    **{name: pl.Int64() for name in _COUNTS},
    "failed_by_code": pl.List(CODE_SCHEMA),
    "attempts": pl.Int64(),
    "provider_ms_p50": pl.Float64(),
    "provider_ms_p95": pl.Float64(),
    "fallbacks_out": pl.Int64(),
    "fallbacks_in": pl.Int64(),
    "cost": pl.Float64(),  # what the calls cost in the run's currency; null when unknown
}
# Short headings for tables people read (the page, the terminal), in the order shown.
SCORE_HEADINGS: Final = {
    "run_id": "run",
    "provider": "provider",
    "stage": "stage",
    "rows": "rows",
    "records": "records",
    "succeeded": "succeeded",
    "failed": "failed",
    "failed_by_code": "failed by code",
    "skipped": "skipped",
    "invalid": "invalid",
    "attempts": "calls",
    "provider_ms_p50": "p50 ms",
    "provider_ms_p95": "p95 ms",
    "fallbacks_out": "fallbacks out",
    "fallbacks_in": "fallbacks in",
    "cost": "cost",
}
_STAGE_ORDER: Final = {str(Stage.TRYON): 0, str(Stage.REFINE): 1}


def records_frame(
    records: Iterable[RowRecord], *, include_already_recorded: bool = False
) -> pl.DataFrame:
    """A run's records as the scorecard's input; without those an earlier run's metadata
    holds (this run made no call for them), unless asked."""
    kept = [r for r in records if include_already_recorded or not r.already_recorded]
    return records_to_frame(kept)


def run_scorecard(records: Iterable[RowRecord]) -> pl.DataFrame:
    """One run's scorecard from its records (``records_frame``, then ``scorecard``), with its
    ``run_id`` column: the file beside the run names its run, so scorecards of many runs read
    together still tell them apart. CPU-bound for large runs: call it in a thread."""
    return scorecard(records_frame(records), by_run=True)


def align_records(
    records: pl.LazyFrame | pl.DataFrame, columns: Sequence[str] = SCORECARD_INPUTS
) -> pl.LazyFrame:
    """``records`` with exactly ``columns``, typed as the metadata schema: a column a part was
    written without (before it existed) is null."""
    lazy = records.lazy()
    present = set(lazy.collect_schema().names())
    return lazy.select(
        pl.col(name).cast(METADATA_SCHEMA[name])
        if name in present
        # A part from before the column existed: its rows had no such thing.
        else pl.lit(None, dtype=METADATA_SCHEMA[name]).alias(name)
        for name in columns
    )


def scorecard(records: pl.LazyFrame | pl.DataFrame, *, by_run: bool = False) -> pl.DataFrame:
    """One row per (provider, stage), or per (run_id, provider, stage) with ``by_run``, with
    the columns of ``SCORECARD_SCHEMA`` (see the module's docstring for what each counts).
    Sorted by run, stage (try-on first), provider. No records: an empty, typed frame."""
    keys = ["run_id", "provider", "stage"] if by_run else ["provider", "stage"]
    # Keys are never null in records this package writes; a hand-made part still groups.
    base = align_records(records).with_columns(pl.col(keys).fill_null("?"))
    status = pl.col("status")
    called = (pl.col("attempts").fill_null(0) > 0) & pl.col("provider_ms").is_not_null()
    ms = pl.col("provider_ms").filter(called)
    main = base.group_by(keys).agg(
        # Row indexes repeat across runs: a row is (run, index).
        rows=pl.struct("run_id", "row_index").n_unique(),
        records=pl.len(),
        succeeded=(status == str(Status.SUCCEEDED)).sum(),
        failed=(status == str(Status.FAILED)).sum(),
        skipped=(status == str(Status.SKIPPED)).sum(),
        invalid=(status == str(Status.INVALID)).sum(),
        attempts=pl.col("attempts").fill_null(0).sum(),
        provider_ms_p50=ms.quantile(0.5, "linear"),
        provider_ms_p95=ms.quantile(0.95, "linear"),
        fallbacks_out=pl.col("fallback_to").is_not_null().sum(),
        fallbacks_in=pl.col("fallback_from").is_not_null().sum(),
        # Unknown as soon as one record's price was: a partial sum would read as the whole.
        cost=pl.when(pl.col("cost").is_null().any()).then(None).otherwise(pl.col("cost").sum()),
    )
    codes = (
        base.filter(status == str(Status.FAILED))
        .group_by([*keys, "error_code"])
        .agg(count=pl.len().cast(pl.Int64()))
        .sort(
            [*keys, "count", "error_code"],
            descending=[*([False] * len(keys)), True, False],
            nulls_last=True,
        )
        .group_by(keys, maintain_order=True)
        .agg(failed_by_code=pl.struct(code=pl.col("error_code"), count=pl.col("count")))
    )
    columns = [name for name in SCORECARD_SCHEMA if by_run or name != "run_id"]
    frame = (
        main.join(codes, on=keys, how="left")
        .with_columns(
            pl.col("failed_by_code").fill_null(pl.lit([], dtype=SCORECARD_SCHEMA["failed_by_code"]))
        )
        .with_columns(
            _stage_rank=pl.col("stage").replace_strict(
                _STAGE_ORDER, default=9, return_dtype=pl.Int8
            )
        )
        .sort([*keys[:-2], "_stage_rank", "provider"])
        .select(pl.col(name).cast(SCORECARD_SCHEMA[name]) for name in columns)
    )
    return frame.collect()


def filter_records(
    records: pl.LazyFrame | pl.DataFrame,
    *,
    runs: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    categories: Sequence[str] | None = None,
    run_starts: Mapping[str, datetime] | None = None,
) -> pl.LazyFrame:
    """Records of the ``runs`` (all when None) in ``categories`` (all when None) whose time is
    in [``since``, ``until``).

    A record's time is its ``started_at``; a record that never started (an invalid row, one a
    run-fatal error skipped) takes its run's start: ``run_starts`` (``started.json``), else
    the run's earliest ``started_at``. Naive datetimes are UTC.
    """
    lazy = align_records(records)
    if runs is not None:
        lazy = lazy.filter(pl.col("run_id").is_in(list(runs)))
    if categories is not None:
        lazy = lazy.filter(pl.col("category").is_in(list(categories)))
    if since is None and until is None:
        return lazy
    dtype = METADATA_SCHEMA["started_at"]
    starts = pl.DataFrame(
        {
            "run_id": list((run_starts or {}).keys()),
            "_run_start": list((run_starts or {}).values()),
        },
        schema={"run_id": pl.String(), "_run_start": dtype},
    ).lazy()
    at = pl.coalesce("started_at", "_run_start", pl.col("started_at").min().over("run_id")).alias(
        "_at"
    )
    lazy = lazy.join(starts, on="run_id", how="left").with_columns(at)
    if since is not None:
        lazy = lazy.filter(pl.col("_at") >= _utc(since))
    if until is not None:
        lazy = lazy.filter(pl.col("_at") < _utc(until))
    return lazy.select(SCORECARD_INPUTS)


def parse_time(text: str | None, option: str = "time") -> datetime | None:
    """An ISO 8601 date or time from the command line ("2026-01-02", "2026-01-02T10:00Z"),
    in UTC (naive means UTC); None for None. ``option`` names it in the error."""
    if text is None:
        return None
    try:
        return _utc(datetime.fromisoformat(text))
    except ValueError:
        raise ValueError(f"{option} {text!r} is not an ISO 8601 date or time") from None


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# ---------------------------------------------------------------------------- reading runs


@dataclass(frozen=True, slots=True)
class CommittedRuns:
    """Committed runs' records read back from a lake (``SCORECARD_INPUTS`` columns)."""

    records: pl.DataFrame
    runs: tuple[str, ...]  # the committed runs read
    run_starts: dict[str, datetime] = field(default_factory=dict)  # from started.json
    not_committed: tuple[str, ...] = ()  # runs asked for that the lake has not committed
    # Published metadata without a commit marker (a run that stopped between the two): left
    # out, as every reader of the dataset should.
    skipped: tuple[str, ...] = ()


def read_committed(
    lake: Lake, runs: Sequence[str] | None = None, columns: Sequence[str] = SCORECARD_INPUTS
) -> CommittedRuns:
    """The records of the lake's committed runs (``runs`` only, when given), blocking.

    Reads ``metadata/run_id=<id>/*.parquet`` of each run whose ``_COMMITTED`` marker exists,
    through the lake's filesystem (local or any fsspec store), only ``columns`` (``run_id``
    among them); parts written before a column existed read it as null.
    """
    metadata = lake.metadata_dir()
    if runs is None:
        found = lake.fs.glob(metadata + "/run_id=*") if lake.fs.exists(metadata) else []
        names = sorted({posixpath.basename(p.rstrip("/"))[len("run_id=") :] for p in found})
    else:
        names = list(dict.fromkeys(runs))
    read: list[str] = []
    missing: list[str] = []
    skipped: list[str] = []
    frames: list[pl.LazyFrame] = []
    starts: dict[str, datetime] = {}
    for run_id in names:
        if not is_safe_id(run_id) or not lake.is_committed(run_id):
            (missing if runs is not None else skipped).append(run_id)
            continue
        read.append(run_id)
        folder = lake.path("metadata", f"run_id={run_id}")
        for part in sorted(lake.fs.glob(folder + "/*.parquet")):
            # The partition names the run, whatever an old part's own column says.
            frame = align_records(_read_part(lake, part, columns), columns)
            frames.append(frame.with_columns(run_id=pl.lit(run_id)))
        if (start := _run_start(lake, run_id)) is not None:
            starts[run_id] = start
    records = (
        pl.concat(frames, how="vertical").collect()
        if frames
        else align_records(records_to_frame([]), columns).collect()
    )
    return CommittedRuns(records, tuple(read), starts, tuple(missing), tuple(skipped))


def _read_part(lake: Lake, path: str, columns: Sequence[str]) -> pl.DataFrame:
    with lake.fs.open(path, "rb") as handle:
        data = BytesIO(handle.read())
    present = set(pl.read_parquet_schema(data))
    data.seek(0)
    return pl.read_parquet(data, columns=[c for c in columns if c in present])


def _run_start(lake: Lake, run_id: str) -> datetime | None:
    """The run's start from ``runs/<id>/started.json``; None when absent or unreadable (the
    time filter then falls back on the run's records)."""
    try:
        payload = json.loads(lake.fs.cat_file(lake.run_path(run_id, "started.json")))
        return _utc(datetime.fromisoformat(str(payload["started_at"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------- showing


def format_codes(codes: Sequence[Mapping[str, Any]] | None) -> str:
    """``failed_by_code`` as text: "CODE 3, CODE2 1" ("" when none)."""
    return ", ".join(f"{c['code'] or NO_CODE} {c['count']}" for c in codes or ())


def scorecard_rows(frame: pl.DataFrame) -> list[dict[str, str | int | float | None]]:
    """The scorecard as plain rows for tables (the artifact, the sheet): ``failed_by_code``
    as text, times rounded to 0.1 ms."""
    rows: list[dict[str, str | int | float | None]] = []
    for row in frame.iter_rows(named=True):
        row["failed_by_code"] = format_codes(row["failed_by_code"])
        for name in ("provider_ms_p50", "provider_ms_p95"):
            if row[name] is not None:
                row[name] = round(row[name], 1)
        if row.get("cost") is not None:
            row["cost"] = round(row["cost"], 6)
        rows.append(row)
    return rows


def scorecard_flat(frame: pl.DataFrame) -> pl.DataFrame:
    """The scorecard with ``failed_by_code`` as text (for CSV), typed even when empty."""
    code = pl.element().struct.field("code").fill_null(NO_CODE)
    count = pl.element().struct.field("count").cast(pl.String())
    return frame.with_columns(
        pl.col("failed_by_code").list.eval(pl.concat_str(code, pl.lit(" "), count)).list.join(", ")
    )


def scorecard_text_rows(frame: pl.DataFrame) -> list[dict[str, str]]:
    """Every cell as text (an HTML or terminal table): times in whole ms, "-" when none."""
    return [
        {name: _money(value) if name == "cost" else _text(value) for name, value in row.items()}
        for row in scorecard_rows(frame)
    ]


def _money(value: object) -> str:
    """An amount as people write it: 0.3, 12.0575; "-" when unknown."""
    if not isinstance(value, float):
        return "-"
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}"
    return str(value)


def score_line(row: Mapping[str, Any]) -> str:
    """One scorecard row (``scorecard_rows`` form) in a line: for the contact sheet's image."""
    text = f"{row['provider']} {row['stage']}: {row['rows']} rows, {row['succeeded']} ok"
    if row["failed"]:
        text += f", {row['failed']} failed"
        if row["failed_by_code"]:
            text += f" ({row['failed_by_code']})"
    for name in ("skipped", "invalid"):
        if row[name]:
            text += f", {row[name]} {name}"
    text += f"; {row['attempts']} calls"
    if row["provider_ms_p50"] is not None:
        text += f", p50 {row['provider_ms_p50']:.0f} ms, p95 {row['provider_ms_p95']:.0f} ms"
    if row["fallbacks_out"] or row["fallbacks_in"]:
        text += f"; fallbacks out {row['fallbacks_out']}, in {row['fallbacks_in']}"
    return text


def scorecard_bytes(frame: pl.DataFrame) -> bytes:
    """The scorecard as a Parquet file's bytes (``runs/<run_id>/scorecard.parquet``)."""
    buffer = BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()
