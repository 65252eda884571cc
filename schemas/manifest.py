"""The manifest contract: which columns a batch manifest has and what a usable row looks like.

Pure: no IO and no Prefect. ``validate_manifest`` takes an already-read ``pl.DataFrame`` (all
columns as text) and splits it into valid rows and invalid rows, each invalid row with every
reason it failed, so one bad row never stops the others. Problems with the manifest as a whole
(no header, a required column missing) raise ``ManifestError`` instead: nothing can run.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Collection, Iterable
from typing import Literal, get_args

import polars as pl
from pydantic import BaseModel, ConfigDict, field_validator

from schemas.uris import PLAINLY_ALLOWED_PREFIX, SCHEME_PATTERN, image_ref_refusal, uri_scheme

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
_SAFE_ID = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"
_SAFE_ID_RE = re.compile(_SAFE_ID)
SAFE_ID_RULE = "allowed: ASCII letters, digits, '.', '_', '-'; 1-128 chars; not starting with '.'"

_SCHEME = SCHEME_PATTERN
_DATA_IMAGE = r"(?i)^data:image/[a-z0-9.+\-]+;base64,[\s\S]"
# A relative path with any of these needs posixpath/os.path normalisation when joined.
_NEEDS_NORMALISING = r"(^|/)\.\.?(/|$)|//|/$"

_CONTROL_CHARACTER = r"[\x00-\x1f\x7f]"
# Free-text columns; ids and image references have stricter checks of their own.
_TEXT_COLUMNS: tuple[str, ...] = (
    "category",
    "garment_description",
    "prompt",
    "gender",
    "provider",
)

# Values quoted in messages are cut short: a data URI can be megabytes long.
_SHOW_MAX = 80
_DUPLICATED_SUFFIX_RE = re.compile(r"^(.*)_duplicated_\d+$")  # how Polars renames repeats
_ROW = "__row_index"
_DUP_ROWS = "__dup_rows"
_REASONS = "__reasons"


class ManifestError(Exception):
    """The manifest as a whole is unusable (unreadable, wrong format, missing columns)."""


class ManifestRow(BaseModel):
    """One valid manifest row, values stripped and image references resolved."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    row_index: int  # 0-based position among the data rows
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
            raise ValueError(f"id {_show(value)} is unsafe for a path ({SAFE_ID_RULE})")
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


class InvalidRow(BaseModel):
    """A manifest row that failed validation, with every reason it failed."""

    model_config = ConfigDict(frozen=True)

    row_index: int
    row_id: str | None
    reasons: list[str]

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)


class ValidationReport(BaseModel):
    """The outcome of validating a manifest: usable rows and rejected rows."""

    valid: list[ManifestRow]
    invalid: list[InvalidRow]
    n_rows: int
    columns: list[str]  # as found in the manifest (stripped), known or not

    @property
    def ignored_columns(self) -> list[str]:
        """Columns the contract does not know; often a typo of a known one."""
        return [c for c in self.columns if c not in KNOWN_COLUMNS]

    def summary(self, max_invalid: int = 5) -> str:
        """A short human-readable account, listing the first few invalid rows."""
        lines = [f"{self.n_rows} rows: {len(self.valid)} valid, {len(self.invalid)} invalid"]
        if self.ignored_columns:
            lines.append("ignored columns: " + ", ".join(map(repr, self.ignored_columns)))
        for bad in self.invalid[:max_invalid]:
            label = f"id {_show(bad.row_id)}" if bad.row_id is not None else "no id"
            lines.append(f"  row {bad.row_index} ({label}): {bad.message}")
        if len(self.invalid) > max_invalid:
            lines.append(f"  ... and {len(self.invalid) - max_invalid} more invalid rows")
        return "\n".join(lines)


def is_safe_id(row_id: str) -> bool:
    """Whether ``row_id`` can be used as a file name: no separators, no leading dot."""
    return _SAFE_ID_RE.fullmatch(row_id) is not None


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


def validate_manifest(
    df: pl.DataFrame,
    *,
    base_uri: str | None = None,
    known_providers: Collection[str] | None = None,
) -> ValidationReport:
    """Split a manifest into valid and invalid rows, giving every reason for each bad row.

    ``base_uri`` is the manifest's directory, for resolving relative image paths. When
    ``known_providers`` is given, a row's ``provider`` must be one of them.
    """
    names = check_columns(df.columns)
    present = set(names)
    df = df.rename(dict(zip(df.columns, names, strict=True)))
    nested = [c for c in KNOWN_COLUMNS if c in present and df.schema[c].is_nested()]
    if nested:
        listed = ", ".join(f"{c!r} ({df.schema[c]})" for c in nested)
        raise ManifestError(f"manifest column(s) hold nested values, not text: {listed}")

    frame = df.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias(_ROW),
        *(_clean(c) if c in present else pl.lit(None, pl.String).alias(c) for c in KNOWN_COLUMNS),
    ).with_columns(
        pl.col("category").str.to_lowercase().alias("__category"),
        pl.col("gender")
        .str.to_lowercase()
        .replace_strict(GENDER_ALIASES, default=None, return_dtype=pl.String)
        .alias("__gender"),
    )
    # Every row sharing an id is rejected, and each names the others.
    dups = (
        frame.filter(pl.col("id").is_not_null())
        .group_by("id")
        .agg(pl.col(_ROW).sort().alias(_DUP_ROWS))
        .filter(pl.col(_DUP_ROWS).list.len() > 1)
    )
    frame = frame.join(dups, on="id", how="left").sort(_ROW)

    checks = [*_reason_exprs(present, known_providers), *_relative_ref_exprs(base_uri)]
    reasons = pl.concat_list(checks).list.drop_nulls()
    frame = frame.with_columns(reasons.alias(_REASONS))

    good = frame.filter(pl.col(_REASONS).list.len() == 0)
    bad = frame.filter(pl.col(_REASONS).list.len() > 0)

    if base_uri:
        good = good.with_columns(_resolve_expr(c, base_uri) for c in IMAGE_COLUMNS)
    valid = [
        ManifestRow(
            row_index=r[_ROW],
            id=r["id"],
            person_image=r["person_image"],
            garment_image=r["garment_image"],
            category=r["__category"],
            lower_garment_image=r["lower_garment_image"],
            garment_description=r["garment_description"],
            prompt=r["prompt"],
            gender=r["__gender"],
            provider=r["provider"],
        )
        for r in good.select(_ROW, *KNOWN_COLUMNS, "__category", "__gender").iter_rows(named=True)
    ]
    invalid = [
        InvalidRow(row_index=i, row_id=row_id, reasons=rs)
        for i, row_id, rs in bad.select(_ROW, "id", _REASONS).iter_rows()
    ]
    return ValidationReport(valid=valid, invalid=invalid, n_rows=df.height, columns=names)


def _clean(column: str) -> pl.Expr:
    """Text, stripped; empty or whitespace-only counts as missing."""
    value = pl.col(column).cast(pl.String).str.strip_chars()
    return pl.when(value.str.len_bytes() > 0).then(value).otherwise(None).alias(column)


def _show(value: str | None) -> str:
    if value is None:
        return "None"
    if len(value) > _SHOW_MAX:
        value = value[: _SHOW_MAX - 3] + "..."
    return f"'{value}'"


def _show_expr(expr: pl.Expr) -> pl.Expr:
    return (
        pl.when(expr.str.len_chars() > _SHOW_MAX)
        .then(expr.str.slice(0, _SHOW_MAX - 3) + "...")
        .otherwise(expr)
    )


def _is_relative(ref: pl.Expr) -> pl.Expr:
    """A path read from beside the manifest: no scheme, not absolute, not ``~``."""
    return (
        ref.is_not_null()
        & ref.str.extract(_SCHEME, 1).is_null()
        & ~ref.str.starts_with("/")
        & ~ref.str.starts_with("~")
    )


def _resolve_expr(column: str, base_uri: str) -> pl.Expr:
    """``resolve_uri`` over a column, vectorised for the common case.

    A plain relative path (no '.', '..' or empty segments) is just appended to the resolved
    directory prefix; only the rest goes through Python, where normalisation is needed.
    """
    ref = pl.col(column)
    relative = _is_relative(ref)
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
        .alias(column)
    )


def _reason_exprs(present: set[str], known_providers: Collection[str] | None) -> list[pl.Expr]:
    """One expression per check, each a reason string where the check fails, else null."""
    rid = pl.col("id")
    garment = pl.col("garment_image")
    category = pl.col("category")
    lowered = pl.col("__category")
    exprs: list[pl.Expr] = [
        pl.when(rid.is_null()).then(pl.lit("missing value in column 'id'")),
        pl.when(rid.is_not_null() & ~rid.str.contains(f"^{_SAFE_ID}$")).then(
            pl.format(f"id '{{}}' is unsafe for a path ({SAFE_ID_RULE})", _show_expr(rid))
        ),
        pl.when(pl.col(_DUP_ROWS).is_not_null()).then(
            pl.format(
                "duplicate id '{}' (also on rows {})",
                _show_expr(rid),
                pl.col(_DUP_ROWS)
                .list.set_difference(pl.concat_list(pl.col(_ROW)))
                .list.sort()
                .list.eval(pl.element().cast(pl.String))
                .list.join(", "),
            )
        ),
        pl.when(pl.col("person_image").is_null()).then(
            pl.lit("missing value in column 'person_image'")
        ),
    ]
    for column in IMAGE_COLUMNS:
        exprs.extend(_uri_exprs(column))
    for column in _TEXT_COLUMNS:
        # A NUL byte is never text a provider should see (and C code stops at it).
        exprs.append(
            pl.when(pl.col(column).str.contains("\x00", literal=True)).then(
                pl.lit(f"NUL byte in column '{column}'")
            )
        )
    exprs.append(
        pl.when(garment.is_null() & pl.col("prompt").is_null()).then(
            pl.lit("garment_image or prompt is required")
        )
    )
    missing_category = (
        "missing value in column 'category' (required for rows with a garment_image)"
        if "category" in present
        else "no 'category' column (required for rows with a garment_image)"
    )
    exprs += [
        pl.when(garment.is_not_null() & category.is_null()).then(pl.lit(missing_category)),
        pl.when(category.is_not_null() & ~lowered.is_in(CATEGORIES)).then(
            pl.format(
                f"unknown category '{{}}' (expected one of: {', '.join(CATEGORIES)})",
                _show_expr(category),
            )
        ),
        pl.when(pl.col("lower_garment_image").is_not_null() & garment.is_null()).then(
            pl.lit("lower_garment_image is set but garment_image is missing")
        ),
        pl.when(pl.col("gender").is_not_null() & pl.col("__gender").is_null()).then(
            pl.format(
                f"invalid gender '{{}}' (expected one of: {', '.join(GENDER_ALIASES)})",
                _show_expr(pl.col("gender")),
            )
        ),
    ]
    if known_providers is not None:
        allowed = sorted(known_providers)
        provider = pl.col("provider")
        exprs.append(
            pl.when(provider.is_not_null() & ~provider.is_in(allowed)).then(
                pl.format(
                    f"unknown provider '{{}}' (expected one of: {', '.join(allowed)})",
                    _show_expr(provider),
                )
            )
        )
    return exprs


def _relative_ref_exprs(base_uri: str | None) -> list[pl.Expr]:
    """Relative paths are read from the manifest's own location: refused where that is."""
    refusal = image_ref_refusal(resolve_uri("image", base_uri)) if base_uri else None
    if refusal is None:
        return []
    exprs: list[pl.Expr] = []
    for column in IMAGE_COLUMNS:
        ref = pl.col(column)
        exprs.append(
            pl.when(_is_relative(ref)).then(
                pl.lit(
                    f"relative path in column '{column}' would be read from the manifest's "
                    f"location: {refusal}"
                )
            )
        )
    return exprs


def _uri_exprs(column: str) -> list[pl.Expr]:
    """Checks on one image-reference column: an allowed scheme, a well-formed data URI."""
    ref = pl.col(column)
    scheme = ref.str.extract(_SCHEME, 1).str.to_lowercase()
    # The bulk of rows (plain paths, http(s)://, s3://... without '::') are allowed as they
    # stand; only the others go through ``image_ref_refusal``, the check the fetch makes too.
    plain = ~ref.str.contains("::", literal=True) & (
        ~ref.str.contains(":", literal=True) | ref.str.contains(PLAINLY_ALLOWED_PREFIX)
    )
    refusal = (
        pl.when(ref.is_not_null() & ~plain)
        .then(ref)
        .map_elements(lambda r: image_ref_refusal(r, column), return_dtype=pl.String)
    )
    return [
        refusal,
        # A path or URL never holds one: most likely a mangled CSV (a quote out of place).
        pl.when((scheme.fill_null("") != "data") & ref.str.contains(_CONTROL_CHARACTER)).then(
            pl.lit(f"control character (newline, NUL, ...) in column '{column}'")
        ),
        pl.when((scheme == "data") & ~ref.str.contains(_DATA_IMAGE)).then(
            pl.lit(
                f"data URI in column '{column}' is not a base64 image "
                "(expected data:image/<type>;base64,...)"
            )
        ),
    ]
