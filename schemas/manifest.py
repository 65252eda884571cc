"""The manifest contract: which columns a batch manifest has and what a usable row looks like.

Pure: no IO and no Prefect. ``schemas.manifest_checks.validate_manifest`` splits an already-read
frame into valid rows and invalid rows (each with every reason it failed); this module holds
the contract, the row models and the report. Problems with the manifest as a whole (no header,
a required column missing) raise ``ManifestError``: nothing can run.

Row numbers: ``row_index`` is a row's 0-based position among the data rows (the lake's
metadata keeps it so); people are shown ``row N`` with N = row_index + 1, the Nth row under the
header, in validate's output, logs, messages and the contact sheet alike.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args, overload

import polars as pl
from pydantic import BaseModel, ConfigDict, field_validator

from schemas.uris import SCHEME_PATTERN, uri_scheme

__all__ = [
    "CATEGORIES",
    "GENDER_ALIASES",
    "IMAGE_COLUMNS",
    "KNOWN_COLUMNS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "InvalidRow",
    "ManifestError",
    "ManifestRow",
    "ManifestRows",
    "ValidationReport",
    "check_columns",
    "is_safe_id",
    "plural",
    "resolve_uri",
    "uri_scheme",
]

Category = Literal["upper_body", "lower_body", "dresses"]
Gender = Literal["woman", "man"]

CATEGORIES: tuple[str, ...] = get_args(Category)
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "person_image")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "garment_image",
    "category",
    "lower_garment_image",
    "garment_description",
    "prompt",
    "gender",
    "provider",
)
# At least one of these columns must exist; each row then needs a value in one of them.
GARMENT_OR_PROMPT_COLUMNS: tuple[str, ...] = ("garment_image", "prompt")
KNOWN_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
IMAGE_COLUMNS: tuple[str, ...] = ("person_image", "garment_image", "lower_garment_image")

GENDER_ALIASES: dict[str, str] = {
    "woman": "woman",
    "man": "man",
    "female": "woman",
    "male": "man",
    "f": "woman",
    "m": "man",
}

# Ids become file names in the lake, so they must not be able to escape or hide a directory.
SAFE_ID = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"
_SAFE_ID_RE = re.compile(SAFE_ID)
SAFE_ID_RULE = "allowed: ASCII letters, digits, '.', '_', '-'; 1-128 chars; not starting with '.'"

# A relative path with any of these needs posixpath/os.path normalisation when joined.
_NEEDS_NORMALISING = r"(^|/)\.\.?(/|$)|//|/$"
_DUPLICATED_SUFFIX_RE = re.compile(r"^(.*)_duplicated_\d+$")  # how Polars renames repeats
# Values quoted in messages are cut short: a data URI can be megabytes long.
SHOW_MAX = 80
ROW = "__row_index"  # the row_index column of frames of rows
# ManifestRow objects are built this many at a time when a sequence of rows is iterated.
_BUILD_CHUNK = 2048


class ManifestError(Exception):
    """The manifest as a whole is unusable (unreadable, wrong format, missing columns)."""


class ManifestRow(BaseModel):
    """One valid manifest row, values stripped and image references resolved."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    row_index: int  # 0-based position among the data rows (shown as row row_index + 1)
    id: str
    person_image: str
    garment_image: str | None = None
    category: Category | None = None
    lower_garment_image: str | None = None
    garment_description: str | None = None
    prompt: str | None = None
    gender: Gender | None = None
    provider: str | None = None

    @field_validator("id")
    @classmethod
    def _id_is_safe(cls, value: str) -> str:
        if not is_safe_id(value):
            raise ValueError(f"id {show(value)} is unsafe for a path ({SAFE_ID_RULE})")
        return value

    @field_validator("gender", mode="before")
    @classmethod
    def _normalise_gender(cls, value: object) -> object:
        if isinstance(value, str):
            return GENDER_ALIASES.get(value.strip().lower(), value)
        return value

    @property
    def is_prompt_row(self) -> bool:
        """True when the row has no garment image and goes to a prompt endpoint."""
        return self.garment_image is None


@dataclass(frozen=True, slots=True)
class InvalidRow:
    """A manifest row that failed validation, with every reason it failed."""

    row_index: int
    row_id: str | None
    reasons: list[str]

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)

    @property
    def row_number(self) -> int:
        """The row as people count it: 1 for the first row under the header."""
        return self.row_index + 1

    def line(self) -> str:
        """``row N (id 'x'): reason; reason``: the one way an invalid row is shown."""
        label = f"id {show(self.row_id)}" if self.row_id is not None else "no id"
        return f"row {self.row_number} ({label}): {self.message}"


class ManifestRows(Sequence[ManifestRow]):
    """Valid manifest rows, held as a frame; ``ManifestRow`` objects are built on access, a
    chunk at a time, so a million-row manifest never holds a million pydantic objects.

    ``source`` has a ``ROW`` column and every ``KNOWN_COLUMNS`` column as text, as read (a row's
    values are cleaned, normalised and resolved against ``base_uri`` when it is built);
    ``positions`` picks this sequence's rows from it, in manifest order.
    """

    __slots__ = ("_base_uri", "_positions", "_source")

    def __init__(self, source: pl.DataFrame, positions: pl.Series, base_uri: str | None) -> None:
        self._source = source
        self._positions = positions
        self._base_uri = base_uri

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
    def positions(self) -> pl.Series:
        return self._positions

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
        return self._source[column].drop_nulls().unique()

    def raw_where(self, predicate: pl.Expr, columns: Sequence[str]) -> pl.DataFrame:
        """``ROW`` and ``columns`` as read (neither cleaned nor resolved) of the rows where
        ``predicate``, on values as read, holds: for bulk checks that need a few rows only."""
        member = pl.repeat(False, self._source.height, dtype=pl.Boolean, eager=True)
        member.scatter(self._positions, True)
        picked = self._source.lazy().filter(pl.lit(member) & predicate).select(ROW, *columns)
        return picked.collect()

    def take(self, positions: pl.Series) -> ManifestRows:
        """The rows at ``positions`` of this sequence (0-based, ascending), still unbuilt."""
        return ManifestRows(self._source, self._positions.gather(positions), self._base_uri)

    def frame(
        self, columns: Sequence[str] = KNOWN_COLUMNS, *, resolve: bool = True
    ) -> pl.DataFrame:
        """``ROW`` and ``columns`` of every row, cleaned, normalised and (unless ``resolve`` is
        False) resolved, as the ``ManifestRow`` objects would hold them."""
        picked = self._source.select(ROW, *columns)[self._positions]
        return picked.select(normalised_columns(self._base_uri if resolve else None, columns))

    def chunks(self, size: int) -> list[ManifestRows]:
        """Consecutive slices of at most ``size`` rows, none built yet."""
        return [self[i : i + size] for i in range(0, len(self), size)]

    def __len__(self) -> int:
        return self._positions.len()

    @overload
    def __getitem__(self, index: int) -> ManifestRow: ...

    @overload
    def __getitem__(self, index: slice) -> ManifestRows: ...

    def __getitem__(self, index: int | slice) -> ManifestRow | ManifestRows:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                picked = pl.int_range(start, stop, step, dtype=pl.UInt32, eager=True)
                return self.take(picked)
            positions = self._positions.slice(start, max(0, stop - start))
            return ManifestRows(self._source, positions, self._base_uri)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range ({n} rows)")
        return self._build(self._positions.slice(index % n, 1))[0]

    def __iter__(self) -> Iterator[ManifestRow]:
        for start in range(0, len(self), _BUILD_CHUNK):
            yield from self._build(self._positions.slice(start, _BUILD_CHUNK))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

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


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """The outcome of validating a manifest: usable rows and rejected rows (by row index)."""

    valid: ManifestRows
    invalid: list[InvalidRow]
    n_rows: int
    columns: list[str] = field(default_factory=list)  # as found (stripped), known or not

    def __post_init__(self) -> None:
        if not isinstance(self.valid, ManifestRows):  # rows built elsewhere (tests, tools)
            object.__setattr__(self, "valid", ManifestRows.of(self.valid))

    @property
    def ignored_columns(self) -> list[str]:
        """Columns the contract does not know; often a typo of a known one."""
        return [c for c in self.columns if c not in KNOWN_COLUMNS]

    def with_problems(self, problems: Mapping[int, Sequence[str]]) -> ValidationReport:
        """This report with more reasons for some rows (by row index): appended to an invalid
        row's reasons; a valid row with any becomes invalid."""
        if not problems:
            return self
        invalid = [
            InvalidRow(bad.row_index, bad.row_id, [*bad.reasons, *problems[bad.row_index]])
            if bad.row_index in problems
            else bad
            for bad in self.invalid
        ]
        known = {bad.row_index for bad in self.invalid}
        fresh = sorted(set(problems) - known)
        valid = self.valid
        if fresh:
            hit = valid.row_indices().is_in(fresh)
            ids = valid.take(hit.arg_true()).frame(["id"])
            invalid += [
                InvalidRow(row_index, row_id, list(problems[row_index]))
                for row_index, row_id in zip(ids[ROW].to_list(), ids["id"].to_list(), strict=True)
            ]
            invalid.sort(key=lambda bad: bad.row_index)
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


FAILED = "__failed"


def failing_rows(
    frame: pl.LazyFrame, checks: Sequence[pl.Expr]
) -> tuple[pl.DataFrame, dict[int, list[str]]]:
    """``frame`` with a Boolean ``FAILED`` column (the row fails any of ``checks``:
    expressions giving a reason where their check fails, else null), and each failing row's
    reasons by its ``ROW``, in check order."""
    names = [f"__check{i}" for i in range(len(checks))]
    found = frame.with_columns(c.alias(n) for c, n in zip(checks, names, strict=True))
    found = found.with_columns(
        pl.any_horizontal(pl.col(names).is_not_null()).fill_null(False).alias(FAILED)
    ).collect()
    # One column after another, so each row's reasons come in check order. Not concat_list:
    # over dozens of mostly null columns it costs far more.
    stacked = (
        found.filter(FAILED)
        .select(ROW, *names)
        .unpivot(index=ROW, value_name="__why")
        .drop_nulls("__why")
    )
    reasons: dict[int, list[str]] = {}
    for row, why in zip(stacked[ROW].to_list(), stacked["__why"].to_list(), strict=True):
        reasons.setdefault(row, []).append(why)
    return found.drop(names), reasons


def invalid_lines(invalid: Sequence[InvalidRow], limit: int | None) -> list[str]:
    """One indented line per invalid row, the first ``limit`` (all for None) and a count."""
    shown = invalid if limit is None else invalid[:limit]
    lines = [f"  {bad.line()}" for bad in shown]
    if len(invalid) > len(shown):
        lines.append(f"  ... and {plural(len(invalid) - len(shown), 'more invalid row')}")
    return lines


def plural(count: int, noun: str) -> str:
    """``1 row``, ``2 rows``, ``0 rows``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def is_safe_id(row_id: str) -> bool:
    """Whether ``row_id`` can be used as a file name: no separators, no leading dot."""
    return _SAFE_ID_RE.fullmatch(row_id) is not None


def show(value: str | None) -> str:
    """``value`` quoted for a message, cut short."""
    if value is None:
        return "None"
    if len(value) > SHOW_MAX:
        value = value[: SHOW_MAX - 3] + "..."
    return f"'{value}'"


def resolve_uri(ref: str, base_uri: str | None) -> str:
    """Join a relative local ``ref`` onto the manifest directory ``base_uri``.

    URLs, data URIs and absolute (or ``~``) paths come back unchanged. ``base_uri`` may be a
    local directory or a URL directory such as ``s3://bucket/dir`` or ``https://host/dir/``.
    """
    if not base_uri or uri_scheme(ref) or ref.startswith(("/", "~")):
        return ref
    if not uri_scheme(base_uri):
        return os.path.normpath(os.path.join(base_uri, ref))
    # Keep the scheme and host/bucket fixed; normalise only the path, so ".." cannot climb
    # out of the bucket into the scheme.
    head, sep, rest = base_uri.partition("://")
    if not sep:  # "scheme:path" without "//": nothing to anchor a host on
        return base_uri.rstrip("/") + "/" + ref
    if head.rsplit("::", 1)[-1].lower() in ("http", "https"):
        rest = rest.split("?", 1)[0].split("#", 1)[0]  # a directory has no query
    netloc, _, path = rest.partition("/")
    joined = posixpath.normpath(posixpath.join("/" + path, ref))
    return f"{head}://{netloc}{joined}"


def check_columns(columns: Iterable[str]) -> list[str]:
    """Normalise header names and check the required ones exist; raises ``ManifestError``.

    Returns the names stripped of whitespace (and of a UTF-8 BOM on the first one).
    """
    names = [c.lstrip("\ufeff").strip() if i == 0 else c.strip() for i, c in enumerate(columns)]
    if not names or all(not n for n in names):
        raise ManifestError("manifest has no header (no columns found)")
    found = ", ".join(repr(n) for n in names)
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        listed = ", ".join(repr(c) for c in missing)
        problems.append(f"missing required column(s) {listed}")
    if not any(c in names for c in GARMENT_OR_PROMPT_COLUMNS):
        problems.append("needs a 'garment_image' or a 'prompt' column")
    repeated = sorted(
        {c for c in names if names.count(c) > 1 and c in KNOWN_COLUMNS}
        | {
            m.group(1)
            for c in names
            if (m := _DUPLICATED_SUFFIX_RE.match(c)) and m.group(1) in KNOWN_COLUMNS
        }
    )
    if repeated:
        # Two columns of the same name: picking one would be a silent guess.
        problems.append("column(s) appear more than once: " + ", ".join(map(repr, repeated)))
    if problems:
        raise ManifestError(f"manifest {'; '.join(problems)} (found columns: {found})")
    return names


# --- a row's values as a ManifestRow holds them -------------------------------------------


def clean(column: str) -> pl.Expr:
    """Text, stripped; empty or whitespace-only counts as missing."""
    value = pl.col(column).cast(pl.String).str.strip_chars()
    return pl.when(value.str.len_bytes() > 0).then(value).otherwise(None).alias(column)


def normalised_columns(base_uri: str | None, columns: Sequence[str]) -> list[pl.Expr]:
    """``ROW`` and ``columns`` of valid rows as ``ManifestRow`` holds them: stripped, category
    lowercased, gender by its alias, image references resolved against ``base_uri``."""
    exprs: list[pl.Expr] = [pl.col(ROW)]
    for column in columns:
        value = clean(column)
        if column == "category":
            value = value.str.to_lowercase()
        elif column == "gender":
            value = value.str.to_lowercase().replace_strict(
                GENDER_ALIASES, default=None, return_dtype=pl.String
            )
        elif column in IMAGE_COLUMNS and base_uri:
            value = _resolve_expr(value, base_uri)
        exprs.append(value.alias(column))
    return exprs


def is_relative(ref: pl.Expr) -> pl.Expr:
    """A path read from beside the manifest: no scheme, not absolute, not ``~``."""
    return (
        ref.is_not_null()
        & ref.str.extract(SCHEME_PATTERN, 1).is_null()
        & ~ref.str.starts_with("/")
        & ~ref.str.starts_with("~")
    )


def _resolve_expr(ref: pl.Expr, base_uri: str) -> pl.Expr:
    """``resolve_uri`` over a column, vectorised for the common case.

    A plain relative path (no '.', '..' or empty segments) is just appended to the resolved
    directory prefix; only the rest goes through Python, where normalisation is needed.
    """
    relative = is_relative(ref)
    plain = ~ref.str.contains(_NEEDS_NORMALISING)
    prefix = resolve_uri("x", base_uri)[:-1]  # the directory as resolve_uri renders it
    # Branches are all evaluated, so the Python path only sees the rows it is for (nulls skip).
    slow = (
        pl.when(relative & ~plain)
        .then(ref)
        .map_elements(lambda r: resolve_uri(r, base_uri), return_dtype=pl.String)
    )
    return (
        pl.when(relative & plain)
        .then(pl.lit(prefix) + ref)
        .when(relative)
        .then(slow)
        .otherwise(ref)
    )
