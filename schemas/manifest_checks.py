"""Validating a manifest frame: every reason each row fails, in Polars expressions.

Pure: no IO and no Prefect. Two passes, so that a million rows cost a small multiple of reading
them (``make bench-validate``):

1. **The screen** marks rows *plainly fine*: every value, as read, is already clean (no
   surrounding whitespace) and passes its column's checks on a conservative pattern (an
   ``http(s)://``, ``s3://``, ``file://`` or ``memory://`` URL or a path without ':' or
   control characters, a base64 image data URI, a safe id, a known category...), and the id
   is not repeated. These rows need nothing more: valid as they stand.
2. **The checks** run on every other row (a few percent): each check an expression giving the
   reason where it fails, references the screen cannot vouch for going through
   ``schemas.uris.classify_image_ref`` (the decision the fetch makes too).

The screen never decides a row is invalid, only that it needs no checking; ``validate_manifest``
with ``screen=False`` runs every row through the checks, and the tests hold both to the same
result.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import polars as pl

from schemas.manifest import (
    CATEGORIES,
    GENDER_ALIASES,
    IMAGE_COLUMNS,
    KNOWN_COLUMNS,
    ROW,
    SAFE_ID,
    SAFE_ID_RULE,
    ManifestError,
    check_columns,
    clean,
    is_relative,
    resolve_uri,
    show_expr,
)
from schemas.manifest_rows import FAILED, InvalidRows, ManifestRows, ValidationReport, failing_rows
from schemas.uris import PLAINLY_ALLOWED_PREFIX, SCHEME_PATTERN, image_ref_refusal

__all__ = ["validate_manifest"]

_DATA_IMAGE = r"(?i)^data:image/[a-z0-9.+\-]+;base64,[\s\S]"
_CONTROL_CHARACTER = r"[\x00-\x1f\x7f]"
# Free-text columns; ids and image references have stricter checks of their own.
_TEXT_COLUMNS: tuple[str, ...] = ("category", "garment_description", "prompt", "gender", "provider")
_DUP_ROWS = "__dup_rows"
_DUP_COUNT = "__dup_count"
_DUP_ROWS_SHOWN = 10


def validate_manifest(
    df: pl.DataFrame,
    *,
    base_uri: str | None = None,
    known_providers: Collection[str] | None = None,
    screen: bool = True,
) -> ValidationReport:
    """Split a manifest into valid and invalid rows, giving every reason for each bad row.

    ``base_uri`` is the manifest's directory, for resolving relative image paths. When
    ``known_providers`` is given, a row's ``provider`` must be one of them. ``screen=False``
    checks every row the slow way (the reference the screen is tested against).
    """
    names = check_columns(df.columns)
    present = set(names)
    df = df.rename(dict(zip(df.columns, names, strict=True)))
    nested = [c for c in KNOWN_COLUMNS if c in present and df.schema[c].is_nested()]
    if nested:
        listed = ", ".join(f"{c!r} ({df.schema[c]})" for c in nested)
        raise ManifestError(f"manifest column(s) hold nested values, not text: {listed}")

    source = df.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias(ROW),
        *(
            pl.col(c).cast(pl.String) if c in present else pl.lit(None, pl.String).alias(c)
            for c in KNOWN_COLUMNS
        ),
    )
    relative_refusal = image_ref_refusal(resolve_uri("image", base_uri)) if base_uri else None
    distinct: dict[str, pl.Series] = {}
    if screen and relative_refusal is None:
        fine, distinct = _screen(source, known_providers)
    else:  # relative paths are refused here: the screen's patterns would pass them
        fine = pl.repeat(False, source.height, dtype=pl.Boolean, eager=True)

    invalid, passed = _check(source.filter(~fine), present, known_providers, relative_refusal)
    if passed.len():
        fine.scatter(passed, True)
    return ValidationReport(
        valid=ManifestRows(source, fine.arg_true(), base_uri or None, distinct=distinct),
        invalid=invalid,
        n_rows=df.height,
        columns=names,
    )


# --- the screen ---------------------------------------------------------------------------

_NO_CONTROL = r"\x00-\x1f\x7f"


def _ascii_ci(word: str) -> str:
    """``word`` matched in any ASCII case. Not ``(?i)``: Unicode case folding would let
    'dreſſes' (long s) through, which lowercasing does not turn into 'dresses'."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


def _one_of(words: Collection[str]) -> str:
    return "^(?:" + "|".join(_ascii_ci(w) for w in sorted(words, key=len, reverse=True)) + ")$"


# Plainly allowed references, as read: no control character, nothing to strip at either end.
# http(s) URLs may hold ':' and '::' (ports, IPv6 hosts): only the guarded client reads them.
# Filesystem URLs and paths hold no ':' at all, so no chain and no second scheme. Data URIs:
# an image type and a base64 payload, nothing else.
_FINE_REF = (
    "^(?:"
    f"{_ascii_ci('http')}[sS]?://[^{_NO_CONTROL}]*[^\\s{_NO_CONTROL}]"
    f"|(?:{_ascii_ci('s3')}[aA]?|{_ascii_ci('file')}|{_ascii_ci('memory')})://"
    f"[^:{_NO_CONTROL}]*[^:\\s{_NO_CONTROL}]"
    f"|[^:\\s{_NO_CONTROL}](?:[^:{_NO_CONTROL}]*[^:\\s{_NO_CONTROL}])?"
    f"|{_ascii_ci('data:image/')}[a-zA-Z0-9.+\\-]+;{_ascii_ci('base64,')}[A-Za-z0-9+/=]+"
    ")$"
)
_FINE_TEXT = r"^[^\s\x00](?:[^\x00]*[^\s\x00])?$"  # no NUL, nothing to strip
_FINE_CATEGORY = _one_of(CATEGORIES)
_FINE_GENDER = _one_of(GENDER_ALIASES)
_FINE_ID = f"^{SAFE_ID}$"


# An image column whose first rows repeat values (images reused across rows, as they mostly
# are) is matched a distinct value at a time: hashing a long value costs less than matching it,
# and the file check needs the distinct values anyway. Short values are matched as they come.
_SAMPLE_ROWS = 4096
_DISTINCT_SHARE_MAX = 0.5


def _screen(
    source: pl.DataFrame, known_providers: Collection[str] | None
) -> tuple[pl.Series, dict[str, pl.Series]]:
    """Rows valid as they stand, with nothing to clean: True, all others False; and the
    distinct values of the columns matched a distinct value at a time."""
    patterns = {
        "person_image": _FINE_REF,
        "garment_image": _FINE_REF,
        "lower_garment_image": _FINE_REF,
        "category": _FINE_CATEGORY,
        "gender": _FINE_GENDER,
        "garment_description": _FINE_TEXT,
        "prompt": _FINE_TEXT,
    }
    if known_providers is None:
        patterns["provider"] = _FINE_TEXT
    matched, distinct = _matchers(source, patterns)
    col = pl.col

    def absent_or(column: str) -> pl.Expr:
        return col(column).is_null() | matched[column]

    provider = (
        absent_or("provider")
        if known_providers is None
        else col("provider").is_null() | col("provider").is_in(sorted(known_providers))
    )
    garment = col("garment_image")
    # Separate expressions, so Polars spreads them over the cores.
    flags = source.select(
        col("id").str.contains(_FINE_ID).fill_null(False).alias("id"),
        matched["person_image"].alias("person"),
        absent_or("garment_image").alias("garment"),
        (
            col("lower_garment_image").is_null()
            | (matched["lower_garment_image"] & garment.is_not_null())
        ).alias("lower"),
        pl.when(col("category").is_null())
        .then(garment.is_null())
        .otherwise(matched["category"])
        .alias("category"),
        absent_or("gender").alias("gender"),
        absent_or("garment_description").alias("description"),
        absent_or("prompt").alias("prompt"),
        (garment.is_not_null() | col("prompt").is_not_null()).alias("garment_or_prompt"),
        provider.alias("provider"),
    )
    fine = flags.select(pl.all_horizontal(pl.all()).alias("fine")).to_series()
    # Ids the screen passes need no cleaning; the others are hashed as cleaned, so that " a "
    # still repeats "a".
    hashes = source["id"].hash()
    unclean = (~flags["id"]).arg_true()
    if unclean.len():
        ids = source.select(pl.col("id").gather(unclean)).select(clean("id").hash())
        hashes.scatter(unclean, ids.to_series())
    return fine & ~_repeated(hashes), distinct


def _matchers(
    source: pl.DataFrame, patterns: dict[str, str]
) -> tuple[dict[str, pl.Expr], dict[str, pl.Series]]:
    """Per column, an expression: the value is there and matches its pattern; and the distinct
    values of the image columns matched a distinct value at a time."""
    images = [c for c in patterns if c in IMAGE_COLUMNS]
    sample = source.head(_SAMPLE_ROWS).select(pl.col(c).n_unique() for c in images).row(0)
    share = max(1, min(source.height, _SAMPLE_ROWS)) * _DISTINCT_SHARE_MAX
    repeated = [c for c, n in zip(images, sample, strict=True) if n <= share]
    found = pl.collect_all(source.lazy().select(pl.col(c).drop_nulls().unique()) for c in repeated)
    distinct = {c: frame.to_series() for c, frame in zip(repeated, found, strict=True)}
    matched: dict[str, pl.Expr] = {}
    for column, pattern in patterns.items():
        value = pl.col(column)
        if column in distinct:
            values = distinct[column]
            failing = values.filter(~values.str.contains(pattern))
            matched[column] = value.is_not_null() & ~value.is_in(failing.implode())
        else:
            matched[column] = value.str.contains(pattern).fill_null(False)
    return matched, distinct


def _repeated(hashes: pl.Series) -> pl.Series:
    """Whether each value occurs more than once (a sort: cheaper than hashing the ids again).
    A hash collision only sends both rows to the checks, which compare the ids themselves."""
    ordered = hashes.sort()
    if ordered.len() < 2:
        return pl.repeat(False, ordered.len(), dtype=pl.Boolean, eager=True)
    head, tail = ordered.slice(0, ordered.len() - 1), ordered.slice(1)
    repeated = tail.filter(head == tail).unique()
    return hashes.is_in(repeated.implode())


# --- the checks ---------------------------------------------------------------------------


def _check(
    rows: pl.DataFrame,
    present: set[str],
    known_providers: Collection[str] | None,
    relative_refusal: str | None,
) -> tuple[InvalidRows, pl.Series]:
    """``rows``' invalid rows with their reasons, and the ``ROW`` of the others."""
    frame = (
        rows.lazy()
        .select(pl.col(ROW), *(clean(c) for c in KNOWN_COLUMNS))
        .with_columns(
            pl.col("category").str.to_lowercase().alias("__category"),
            pl.col("gender")
            .str.to_lowercase()
            .replace_strict(GENDER_ALIASES, default=None, return_dtype=pl.String)
            .alias("__gender"),
        )
    )
    # Every row sharing an id is rejected, and each names the others. Rows sharing an id all
    # come here: the screen passes no repeated id.
    dups = (
        frame.filter(pl.col("id").is_not_null())
        .group_by("id")
        .agg(
            pl.col(ROW).sort().head(_DUP_ROWS_SHOWN + 1).alias(_DUP_ROWS),
            pl.len().alias(_DUP_COUNT),
        )
        .filter(pl.col(_DUP_COUNT) > 1)
    )
    frame = frame.join(dups, on="id", how="left", maintain_order="left")
    checks = [*_reason_exprs(present, known_providers), *_relative_ref_exprs(relative_refusal)]
    found = failing_rows(frame, checks)
    return InvalidRows(found.filter(FAILED)), found.filter(~pl.col(FAILED))[ROW]


def _other_rows() -> pl.Expr:
    """The other rows sharing a row's id, as people count rows (from 1): the first few, then
    how many more (an id on every row would otherwise make each message name every row)."""
    others = (
        pl.col(_DUP_ROWS)
        .list.set_difference(pl.concat_list(pl.col(ROW)))
        .list.sort()
        .list.head(_DUP_ROWS_SHOWN)
    )
    listed = others.list.eval((pl.element() + 1).cast(pl.String)).list.join(", ")
    more = pl.col(_DUP_COUNT) - 1 - others.list.len()
    return pl.when(more > 0).then(pl.format("{} and {} more", listed, more)).otherwise(listed)


def _reason_exprs(present: set[str], known_providers: Collection[str] | None) -> list[pl.Expr]:
    """One expression per check, each a reason string where the check fails, else null."""
    rid = pl.col("id")
    garment = pl.col("garment_image")
    category = pl.col("category")
    lowered = pl.col("__category")
    exprs: list[pl.Expr] = [
        pl.when(rid.is_null()).then(pl.lit("missing value in column 'id'")),
        pl.when(rid.is_not_null() & ~rid.str.contains(f"^{SAFE_ID}$")).then(
            pl.format(f"id '{{}}' is unsafe for a path ({SAFE_ID_RULE})", show_expr(rid))
        ),
        pl.when(pl.col(_DUP_ROWS).is_not_null()).then(
            pl.format(
                "duplicate id '{}' (also on rows {})",
                show_expr(rid),
                _other_rows(),
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
                show_expr(category),
            )
        ),
        pl.when(pl.col("lower_garment_image").is_not_null() & garment.is_null()).then(
            pl.lit("lower_garment_image is set but garment_image is missing")
        ),
        pl.when(pl.col("gender").is_not_null() & pl.col("__gender").is_null()).then(
            pl.format(
                f"invalid gender '{{}}' (expected one of: {', '.join(GENDER_ALIASES)})",
                show_expr(pl.col("gender")),
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
                    show_expr(provider),
                )
            )
        )
    return exprs


def _relative_ref_exprs(refusal: str | None) -> list[pl.Expr]:
    """Relative paths are read from the manifest's own location: refused where that is."""
    if refusal is None:
        return []
    exprs: list[pl.Expr] = []
    for column in IMAGE_COLUMNS:
        exprs.append(
            pl.when(is_relative(pl.col(column))).then(
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
    scheme = ref.str.extract(SCHEME_PATTERN, 1).str.to_lowercase()
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
