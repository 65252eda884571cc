"""A validated manifest held as frames: the valid rows, the invalid rows with their reasons.

Pure: no IO and no Prefect. ``ManifestRow`` and ``InvalidRow`` objects are built only when
asked for, a chunk at a time: a million-row manifest holds no million pydantic objects, and a
run builds each chunk's rows when the chunk starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

import polars as pl

from schemas.manifest import (
    KNOWN_COLUMNS,
    ROW,
    InvalidRow,
    ManifestRow,
    normalised_columns,
    plural,
    show_expr,
)

__all__ = [
    "FAILED",
    "REASONS",
    "InvalidRows",
    "ManifestRows",
    "ValidationReport",
    "failing_rows",
    "invalid_lines",
]

REASONS = "__reasons"  # a list of reasons, in check order
FAILED = "__failed"
# Row objects are built this many at a time when a sequence of rows is iterated.
_BUILD_CHUNK = 2048


class ManifestRows(Sequence[ManifestRow]):
    """Valid manifest rows, as a frame; ``ManifestRow`` objects are built on access.

    ``source`` has a ``ROW`` column and every ``KNOWN_COLUMNS`` column as text, as read (a row's
    values are cleaned, normalised and resolved against ``base_uri`` when it is built);
    ``positions`` picks this sequence's rows from it, in manifest order.
    """

    __slots__ = ("_base_uri", "_distinct", "_positions", "_source")

    def __init__(
        self,
        source: pl.DataFrame,
        positions: pl.Series,
        base_uri: str | None,
        *,
        distinct: Mapping[str, pl.Series] | None = None,
    ) -> None:
        self._source = source
        self._positions = positions
        self._base_uri = base_uri
        self._distinct = dict(distinct or {})  # distinct values of some columns, found already

    @classmethod
    def of(cls, rows: Iterable[ManifestRow]) -> ManifestRows:
        """A sequence over rows built already (tests, tools): their values as they are."""
        built = list(rows)
        data: dict[str, list[object]] = {ROW: [r.row_index for r in built]}
        data.update({c: [getattr(r, c) for r in built] for c in KNOWN_COLUMNS})
        schema = {ROW: pl.Int64, **dict.fromkeys(KNOWN_COLUMNS, pl.String)}
        source = pl.DataFrame(data, schema=schema)
        return cls(source, pl.int_range(0, len(built), dtype=pl.UInt32, eager=True), None)

    @property
    def base_uri(self) -> str | None:
        """The directory relative image paths resolve against."""
        return self._base_uri

    def row_indices(self) -> pl.Series:
        """Each row's ``row_index``, in order."""
        return self._source[ROW].gather(self._positions)

    def distinct_values(self, column: str) -> pl.Series:
        """The distinct values of ``column`` as read, non-null, over the whole manifest (these
        rows' among them): a bulk check looks at each once, cheaply."""
        found = self._distinct.get(column)
        return found if found is not None else self._source[column].drop_nulls().unique()

    def raw_where(self, predicate: pl.Expr, columns: Sequence[str]) -> pl.DataFrame:
        """``ROW`` and ``columns`` as read (neither cleaned nor resolved) of the rows where
        ``predicate``, on values as read, holds: for bulk checks that need a few rows only."""
        member = pl.repeat(False, self._source.height, dtype=pl.Boolean, eager=True)
        member.scatter(self._positions, True)
        picked = self._source.lazy().filter(pl.lit(member) & predicate).select(ROW, *columns)
        return picked.collect()

    def take(self, positions: pl.Series) -> ManifestRows:
        """The rows at ``positions`` of this sequence (0-based, ascending), still unbuilt."""
        picked = self._positions.gather(positions)
        return ManifestRows(self._source, picked, self._base_uri, distinct=self._distinct)

    def frame(
        self, columns: Sequence[str] = KNOWN_COLUMNS, *, resolve: bool = True
    ) -> pl.DataFrame:
        """``ROW`` and ``columns`` of every row, cleaned, normalised and (unless ``resolve`` is
        False) resolved, as the ``ManifestRow`` objects would hold them."""
        picked = self._source.select(ROW, *columns)[self._positions]
        return picked.select(normalised_columns(self._base_uri if resolve else None, columns))

    def present(self, columns: Sequence[str]) -> pl.DataFrame:
        """Per row, whether each of ``columns`` has a value (not empty once stripped)."""
        # A value has a character that is not whitespace exactly when it is one once stripped.
        there = [pl.col(c).str.contains(r"\S").fill_null(False).alias(c) for c in columns]
        return self._source.select(there)[self._positions]

    def __len__(self) -> int:
        return self._positions.len()

    @overload
    def __getitem__(self, index: int) -> ManifestRow: ...

    @overload
    def __getitem__(self, index: slice) -> ManifestRows: ...

    def __getitem__(self, index: int | slice) -> ManifestRow | ManifestRows:
        if isinstance(index, slice):
            return self.take(_slice_positions(index, len(self)))
        return self._build(self._positions.slice(_position(index, len(self)), 1))[0]

    def __iter__(self) -> Iterator[ManifestRow]:
        for start in range(0, len(self), _BUILD_CHUNK):
            yield from self._build(self._positions.slice(start, _BUILD_CHUNK))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return _same_items(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ManifestRows({len(self)} rows)"

    def _build(self, positions: pl.Series) -> list[ManifestRow]:
        chunk = self._source.select(ROW, *KNOWN_COLUMNS)[positions]
        frame = chunk.select(normalised_columns(self._base_uri, KNOWN_COLUMNS))
        return [
            ManifestRow(row_index=r.pop(ROW), **r)  # validated again: a net under the checks
            for r in frame.iter_rows(named=True)
        ]


class InvalidRows(Sequence[InvalidRow]):
    """Invalid rows, as a frame (``ROW``, ``id``, ``REASONS``) in row order; ``InvalidRow``
    objects are built on access."""

    __slots__ = ("_frame",)

    def __init__(self, frame: pl.DataFrame) -> None:
        self._frame = frame.select(ROW, "id", REASONS)

    @classmethod
    def of(cls, rows: Iterable[InvalidRow]) -> InvalidRows:
        built = sorted(rows, key=lambda bad: bad.row_index)
        data = {
            ROW: [bad.row_index for bad in built],
            "id": [bad.row_id for bad in built],
            REASONS: [bad.reasons for bad in built],
        }
        schema = {ROW: pl.Int64, "id": pl.String, REASONS: pl.List(pl.String)}
        return cls(pl.DataFrame(data, schema=schema))

    @classmethod
    def merged(cls, *parts: InvalidRows) -> InvalidRows:
        """Rows of several sets (no row in two), in row order."""
        return cls(pl.concat([p.frame for p in parts]).sort(ROW))

    @property
    def frame(self) -> pl.DataFrame:
        return self._frame

    def row_indices(self) -> pl.Series:
        return self._frame[ROW]

    def lines(self) -> list[str]:
        """``InvalidRow.line()`` of every row, built in bulk."""
        rid = pl.col("id")
        label = (
            pl.when(rid.is_null())
            .then(pl.lit("no id"))
            .otherwise(pl.format("id '{}'", show_expr(rid)))
        )
        line = pl.format("row {} ({}): {}", pl.col(ROW) + 1, label, pl.col(REASONS).list.join("; "))
        return self._frame.select(line).to_series().to_list()

    def with_reasons(self, more: Mapping[int, Sequence[str]]) -> InvalidRows:
        """These rows, each with ``more`` reasons (by row index) appended where it has any."""
        known = set(self._frame[ROW].to_list()) & set(more)
        if not known:
            return self
        extra = pl.DataFrame(
            {ROW: list(known), "__more": [list(more[i]) for i in known]},
            schema={ROW: pl.Int64, "__more": pl.List(pl.String)},
        )
        joined = self._frame.join(extra, on=ROW, how="left", maintain_order="left")
        reasons = (
            pl.when(pl.col("__more").is_null())
            .then(pl.col(REASONS))
            .otherwise(pl.concat_list(REASONS, "__more"))
        )
        return InvalidRows(joined.with_columns(reasons.alias(REASONS)))

    def __len__(self) -> int:
        return self._frame.height

    @overload
    def __getitem__(self, index: int) -> InvalidRow: ...

    @overload
    def __getitem__(self, index: slice) -> InvalidRows: ...

    def __getitem__(self, index: int | slice) -> InvalidRow | InvalidRows:
        if isinstance(index, slice):
            return InvalidRows(self._frame[_slice_positions(index, len(self))])
        row, row_id, reasons = self._frame.row(_position(index, len(self)))
        return InvalidRow(row, row_id, reasons)

    def __iter__(self) -> Iterator[InvalidRow]:
        columns = (self._frame[c].to_list() for c in (ROW, "id", REASONS))
        for row, row_id, reasons in zip(*columns, strict=True):
            yield InvalidRow(row, row_id, reasons)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return _same_items(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"InvalidRows({list(self)!r})" if len(self) <= 5 else f"InvalidRows({len(self)})"


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """The outcome of validating a manifest: usable rows and rejected rows (by row index)."""

    valid: ManifestRows
    invalid: InvalidRows
    n_rows: int
    columns: list[str] = field(default_factory=list)  # as found (stripped), known or not

    def __post_init__(self) -> None:
        # Rows built elsewhere (tests, tools) are taken as lists too.
        if not isinstance(self.valid, ManifestRows):
            object.__setattr__(self, "valid", ManifestRows.of(self.valid))
        if not isinstance(self.invalid, InvalidRows):
            object.__setattr__(self, "invalid", InvalidRows.of(self.invalid))

    @property
    def ignored_columns(self) -> list[str]:
        """Columns the contract does not know; often a typo of a known one."""
        return [c for c in self.columns if c not in KNOWN_COLUMNS]

    def with_problems(self, problems: Mapping[int, Sequence[str]]) -> ValidationReport:
        """This report with more reasons for some rows (by row index): appended to an invalid
        row's reasons; a valid row with any becomes invalid."""
        if not problems:
            return self
        invalid = self.invalid.with_reasons(problems)
        hit = self.valid.row_indices().is_in(list(problems))
        valid = self.valid
        if hit.any():
            ids = valid.take(hit.arg_true()).frame(["id"])
            reasons = pl.Series(REASONS, [list(problems[i]) for i in ids[ROW].to_list()])
            fresh = InvalidRows(ids.with_columns(reasons.cast(pl.List(pl.String))))
            invalid = InvalidRows.merged(invalid, fresh)
            valid = valid.take((~hit).arg_true())
        return ValidationReport(valid, invalid, self.n_rows, self.columns)

    def summary(self, max_invalid: int = 5) -> str:
        """A short human-readable account, listing the first few invalid rows."""
        lines = [
            f"{plural(self.n_rows, 'row')}: {len(self.valid)} valid, {len(self.invalid)} invalid"
        ]
        if self.ignored_columns:
            lines.append("ignored columns: " + ", ".join(map(repr, self.ignored_columns)))
        lines += invalid_lines(self.invalid, max_invalid)
        return "\n".join(lines)


def failing_rows(frame: pl.LazyFrame, checks: Sequence[pl.Expr]) -> pl.DataFrame:
    """``frame`` with ``FAILED`` (whether the row fails any of ``checks``: expressions giving a
    reason where their check fails, else null) and ``REASONS`` (the reasons, in check order;
    null where none)."""
    names = [f"__check{i}" for i in range(len(checks))]
    found = frame.with_columns(c.alias(n) for c, n in zip(checks, names, strict=True))
    found = found.with_columns(
        pl.any_horizontal(pl.col(names).is_not_null()).fill_null(False).alias(FAILED)
    ).collect()
    # Stacked one check after another, so each row's reasons come in check order. Not
    # concat_list: over dozens of mostly null columns it costs far more.
    reasons = (
        found.filter(FAILED)
        .select(ROW, *names)
        .unpivot(index=ROW, value_name="__why")
        .drop_nulls("__why")
        .group_by(ROW, maintain_order=True)
        .agg(pl.col("__why").alias(REASONS))
    )
    return found.drop(names).join(reasons, on=ROW, how="left", maintain_order="left")


def invalid_lines(invalid: InvalidRows, limit: int | None) -> list[str]:
    """One indented line per invalid row, the first ``limit`` (all for None) and a count."""
    shown = invalid if limit is None else invalid[:limit]
    lines = [f"  {line}" for line in shown.lines()]
    if len(invalid) > len(shown):
        lines.append(f"  ... and {plural(len(invalid) - len(shown), 'more invalid row')}")
    return lines


def _position(index: int, length: int) -> int:
    if not -length <= index < length:
        raise IndexError(f"row {index} out of range ({length} rows)")
    return index % length


def _slice_positions(index: slice, length: int) -> pl.Series:
    start, stop, step = index.indices(length)
    return pl.int_range(start, stop, step, dtype=pl.UInt32, eager=True)


def _same_items(these: Sequence[object], other: Sequence[object]) -> bool:
    return len(these) == len(other) and all(a == b for a, b in zip(these, other, strict=True))
