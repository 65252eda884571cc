"""The manifest contract: which columns a batch manifest has and what a usable row looks like.

Pure: no IO and no Prefect. ``schemas.manifest_checks.validate_manifest`` splits an already-read
frame into valid rows and invalid rows (each with every reason it failed), reported as
``schemas.manifest_rows.ValidationReport``; this module holds the contract and the row models,
and the expressions that clean a value. Problems with the manifest as a whole (no header,
a required column missing) raise ``ManifestError``: nothing can run.

Row numbers: ``row_index`` is a row's 0-based position among the data rows (the lake's
metadata keeps it so); people are shown ``row N`` with N = row_index + 1, the Nth row under the
header, in validate's output, logs, messages and the contact sheet alike.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

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


def show_expr(expr: pl.Expr) -> pl.Expr:
    """``show`` without its quotes, over a column."""
    return (
        pl.when(expr.str.len_chars() > SHOW_MAX)
        .then(expr.str.slice(0, SHOW_MAX - 3) + "...")
        .otherwise(expr)
    )


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
