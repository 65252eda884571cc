"""What a batch run reports when it ends: counts, where things are, what stopped it."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from schemas.results import Status

EXAMPLE_CHARS = 500  # an example message is cut here in the summary; the metadata has it whole


class ErrorCount(BaseModel):
    """Records of one run that did not succeed for one reason: a stage and an error code.

    Only the records that keep the run from succeeding: failed, invalid, and skipped by a
    run-fatal error (not rows the refiner cannot take, which are done)."""

    stage: str
    code: str
    count: int
    source: str = ""  # "manifest", "input fetch", "input image", or the provider's name
    example: str = ""  # one record's message, cut at EXAMPLE_CHARS
    example_row: str | None = None  # that record's row id

    def describe(self) -> str:
        """``8 × FETCH_NOT_FOUND  (input fetch) sample/x.jpg: no such file``"""
        where = f"({self.source}) " if self.source else ""
        return f"{self.count} × {self.code}  {where}{self.example}".rstrip()


class RunSummary(BaseModel):
    run_id: str
    provider: str
    lake: str
    results_uri: str
    metadata_uri: str
    summary_uri: str
    contact_sheet_uri: str | None = None  # HTML; a JPEG grid beside it
    counts: dict[str, int]  # try-on stage (and invalid rows), by status: each row's outcome
    refine_counts: dict[str, int] | None = None  # refine stage, by status, when refining
    # Compared providers: try-on outcomes by status, per provider (rows it could not take are
    # skipped, PROVIDER_CANNOT_TAKE).
    compare_counts: dict[str, dict[str, int]] = Field(default_factory=dict)
    fell_back: int = 0  # rows whose outcome is a fallback provider's
    unfinished: int = 0  # records a retry would redo (failed, or stopped by a fatal error)
    already_done: int = 0  # of the succeeded rows: done and recorded by earlier runs, no call
    total_rows: int
    provider_calls: int
    duration_s: float
    fatal_error: str | None = None
    fatal_at: datetime | None = None  # when the run learned of it: no call started after
    chunk_processes: list[str] = Field(default_factory=list)  # host:pid that ran chunks
    # Why rows did not succeed: the most frequent (stage, error code) pairs, largest first.
    # Absent from summaries written before it (it defaults to empty).
    top_errors: list[ErrorCount] = Field(default_factory=list)
    # Money: the run's currency, what its calls cost (None when a price in play is unknown),
    # the budget it was given, and whether the budget stopped it.
    currency: str | None = None
    cost: float | None = None
    budget: float | None = None
    budget_exhausted: bool = False
    unpriced: list[str] = Field(default_factory=list)  # accounts in play with no known price
    # Input images decoded and fitted in the flow's process, and inputs whose prepared hash
    # the source index gave without fetching or decoding (None: chunks ran elsewhere, Dask).
    images_prepared: int | None = None
    images_recognised: int | None = None

    @property
    def exit_code(self) -> int:
        """0: every row succeeded, at every stage that applies to it; 1: anything else (a
        failed row, an invalid row, a row a run-fatal error skipped).

        A row the refiner cannot take (a prompt row, a ``lower_body`` row: refine ``skipped``
        with ``REFINE_NOT_APPLICABLE``) is not a failure of the run: its try-on succeeded and
        there was nothing more to do, so it does not make the exit status 1."""
        done = self.counts.get(Status.SUCCEEDED, 0) == self.total_rows
        return 0 if done and not self.unfinished else 1

    def one_line(self) -> str:
        parts = [f"{self.counts.get(s, 0)} {s}" for s in ("succeeded", "failed", "invalid")]
        skipped = self.counts.get("skipped", 0)
        line = " / ".join(parts) + (f" / {skipped} skipped" if skipped else "")
        line = f"{line} of {self.total_rows} rows"
        if self.already_done:
            line += f" ({self.already_done} already done by earlier runs)"
        if self.fell_back:
            line += f" ({self.fell_back} on a fallback provider)"
        if self.refine_counts is not None:
            refined = ", ".join(f"{n} {s}" for s, n in sorted(self.refine_counts.items()))
            line += f"; refine: {refined or 'nothing to refine'}"
        for provider, counts in self.compare_counts.items():
            tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            line += f"; vs {provider}: {tally}"
        return line


class RunNotStarted(Exception):
    """The run could not start: bad manifest, unknown provider, missing key, unwritable lake."""


class BatchIncomplete(Exception):
    """Some rows failed or were skipped; the flow run ends Failed so the UI can retry it."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__(f"batch incomplete: {summary.one_line()}")
        self.summary = summary
