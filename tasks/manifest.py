"""Reading a manifest (CSV or Parquet) from a local path or any fsspec URL. Pure IO, no Prefect.

Every failure becomes a ``ManifestError`` whose message names the manifest and the problem but
never the storage options, a URL's user info or its query string (presigned signatures).
"""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Collection, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import fsspec.implementations.local
import polars as pl
from fsspec.utils import infer_compression

from schemas.manifest import (
    IMAGE_COLUMNS,
    KNOWN_COLUMNS,
    ROW,
    ManifestError,
    resolve_uri,
    uri_scheme,
)
from schemas.manifest_checks import validate_manifest
from schemas.manifest_rows import ManifestRows, ValidationReport
from schemas.uris import ImageRoute, classify_image_ref

PARQUET_MAGIC = b"PAR1"
CSV_EXTENSIONS = (".csv", ".txt")
TSV_EXTENSIONS = (".tsv", ".tab")
PARQUET_EXTENSIONS = (".parquet", ".pq")
_REDACTED = "***"
# References that are never a local file (http(s), s3, memory, data), as read: not looked at.
_NEVER_LOCAL = r"^(?:[hH][tT][tT][pP][sS]?|[sS]3[aA]?|[mM][eE][mM][oO][rR][yY]|[dD][aA][tT][aA]):"
_SNIFF_BYTES = 64 * 1024


def read_manifest(uri: str, *, storage_options: dict[str, Any] | None = None) -> pl.DataFrame:
    """Read a manifest with every column as text (String); raises ``ManifestError``.

    The format comes from the extension (.csv/.txt, .tsv/.tab, .parquet/.pq, optionally
    compressed, e.g. ``.csv.gz``); a file starting with the Parquet magic bytes is Parquet
    whatever its name; anything else must be UTF-8 CSV text.
    """
    options = storage_options or {}
    shown = redact_uri(uri)
    extension = _extension(uri)
    fast = _read_local_csv(uri, extension)
    if fast is not None:
        return fast
    data = _read_bytes(uri, options, shown)

    if data.startswith(PARQUET_MAGIC):
        return _parse_parquet(data, shown)
    if extension in PARQUET_EXTENSIONS:
        raise ManifestError(f"manifest {shown} is not a valid Parquet file (no PAR1 header)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"manifest {shown} is neither Parquet nor UTF-8 CSV text "
            f"(undecodable byte at offset {exc.start})"
        ) from None
    separator = "\t" if extension in TSV_EXTENSIONS else ","
    return _parse_csv(data, separator, shown)


def manifest_base_uri(uri: str) -> str:
    """The directory holding the manifest, against which relative image paths resolve.

    Local paths come back absolute, so resolved references do not depend on the working
    directory at fetch time. A URL's query and fragment are dropped.
    """
    if not uri_scheme(uri):
        return os.path.dirname(os.path.abspath(os.path.expanduser(uri)))
    head, sep, rest = uri.rpartition("::")  # chained URLs: the last link holds the path
    parts = urlsplit(rest)
    if parts.scheme in ("http", "https"):
        rest = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    scheme, _, path = rest.partition("://")
    # "memory://m.csv" has no directory part: its directory is the filesystem root.
    directory = rest.rsplit("/", 1)[0] if "/" in path else f"{scheme}://"
    return f"{head}{sep}{directory}"


def load_manifest(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    known_providers: Collection[str] | None = None,
    check_files: bool = False,
) -> ValidationReport:
    """Read and validate a manifest, resolving relative image paths against its directory.

    With ``check_files``, a valid row naming a local image that does not exist (or is a
    directory) becomes invalid too: ``tryon validate`` and ``tryon run`` both check.
    """
    frame = read_manifest(uri, storage_options=storage_options)
    report = validate_manifest(
        frame, base_uri=manifest_base_uri(uri), known_providers=known_providers
    )
    return report.with_problems(local_file_problems(report.valid)) if check_files else report


def local_file_problems(rows: ManifestRows) -> dict[int, list[str]]:
    """Why rows cannot run because a local image they name is missing, by row index.

    The fetch would fail such a row (FETCH_NOT_FOUND) after the run started; found up front it
    is invalid before anything is paid for, and ``tryon validate`` says so. Each distinct
    reference is looked at once, routed as the fetch routes it.
    """
    problems: dict[int, list[str]] = {}
    for column in IMAGE_COLUMNS:
        distinct = rows.distinct_values(column)
        maybe_local = distinct.filter(~distinct.str.contains(_NEVER_LOCAL)).to_list()
        cleaned = pl.Series(maybe_local, dtype=pl.String).str.strip_chars().to_list()
        missing: dict[str, str] = {}
        for raw, value in zip(maybe_local, cleaned, strict=True):
            resolved = resolve_uri(value, rows.base_uri) if value else ""
            problem = _local_file_problem(resolved) if resolved else None
            if problem:
                # The whole path, never shortened: it is there to be copied.
                missing[raw] = f"{problem} in column '{column}': {resolved}"
        if not missing:
            continue
        hits = rows.raw_where(pl.col(column).is_in(list(missing)), [column])
        for row_index, raw in zip(hits[ROW].to_list(), hits[column].to_list(), strict=True):
            problems.setdefault(row_index, []).append(missing[raw])
    return problems


def _local_file_problem(ref: str) -> str | None:
    """What is wrong when ``ref`` is a local path the fetch would not find, else None.
    Other failures (permissions...) are left to the fetch, which says which."""
    route = classify_image_ref(ref)
    if not isinstance(route, ImageRoute) or route.route != "local":
        return None
    path = route.target
    if not path.startswith("/") or path.endswith("/"):
        # The fetch's filesystem makes it absolute (~, the working directory) first.
        path = fsspec.implementations.local.LocalFileSystem._strip_protocol(path)
    try:
        mode = os.stat(path).st_mode  # follows links, as the fetch's open does
    except (FileNotFoundError, NotADirectoryError):
        return "no such file"
    except (OSError, ValueError):  # permissions, a NUL in the path...: the fetch says which
        return None
    return "a directory, not a file" if stat.S_ISDIR(mode) else None


def redact_uri(uri: str) -> str:
    """``uri`` without user info or query string, safe to put in logs and messages."""
    if not uri_scheme(uri):
        return uri
    head, sep, rest = uri.rpartition("::")
    parts = urlsplit(rest)
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    if netloc != parts.netloc:
        netloc = f"{_REDACTED}@{netloc}"
    query = _REDACTED if parts.query else ""
    return f"{head}{sep}{urlunsplit((parts.scheme, netloc, parts.path, query, ''))}"


def _read_local_csv(uri: str, extension: str) -> pl.DataFrame | None:
    """A plain local CSV read by Polars straight from the file (a fifth of a million-row
    manifest's load time goes to reading it into Python and decoding it first), or None: then
    the general path reads it, and says what is wrong if anything is."""
    if uri_scheme(uri) or infer_compression(uri) is not None or extension in PARQUET_EXTENSIONS:
        return None
    path = os.path.expanduser(uri)
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError:
        return None
    if head.startswith(PARQUET_MAGIC) or not head.strip(b"\xef\xbb\xbf \t\r\n"):
        return None
    try:
        frame = pl.read_csv(
            path,
            separator="\t" if extension in TSV_EXTENSIONS else ",",
            infer_schema=False,
            encoding="utf8",
            raise_if_empty=True,
        )
    except pl.exceptions.PolarsError:
        return None
    # Polars checks every value is UTF-8 but decodes header names leniently.
    if any("\ufffd" in name for name in frame.columns):
        return None
    return frame


def _read_bytes(uri: str, options: dict[str, Any], shown: str) -> bytes:
    try:
        with fsspec.open(uri, "rb", compression="infer", **options) as handle:
            return handle.read()
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {shown}") from None
    except IsADirectoryError:
        raise ManifestError(f"manifest {shown} is a directory, not a file") from None
    except PermissionError:
        raise ManifestError(f"permission denied reading manifest {shown}") from None
    except Exception as exc:
        # Any backend (s3fs, http, ...) raises its own types. Not chained (`from None`): the
        # original may carry request details; its type and a scrubbed message are enough.
        detail = _scrub(str(exc), options, uri, shown)
        raise ManifestError(
            f"could not read manifest {shown}: {type(exc).__name__}: {detail}"
        ) from None


def _parse_csv(data: bytes, separator: str, shown: str) -> pl.DataFrame:
    if not data.strip(b"\xef\xbb\xbf \t\r\n"):
        raise ManifestError(f"manifest {shown} is empty (no header)")
    try:
        # All text: ids like "007" keep their zeros, nothing is guessed from the first rows.
        return pl.read_csv(
            io.BytesIO(data),
            separator=separator,
            infer_schema=False,
            encoding="utf8",
            raise_if_empty=True,
        )
    except pl.exceptions.NoDataError:
        raise ManifestError(f"manifest {shown} is empty (no header)") from None
    except pl.exceptions.PolarsError as exc:
        where = _first_ragged_row(data, separator)
        raise ManifestError(
            f"manifest {shown} is not valid CSV: {where}{_first_line(exc)}"
        ) from exc


def _first_ragged_row(data: bytes, separator: str) -> str:
    """Where a CSV Polars refused goes wrong: the first data row (numbered from 1, as
    everywhere people read row numbers) with more fields than the header, quoted newlines
    counted right; "" if none does."""
    text = data.decode("utf-8", "replace").lstrip("\ufeff")
    try:
        rows = csv.reader(io.StringIO(text, newline=""), delimiter=separator, strict=True)
        width = len(next(rows))
        for number, row in enumerate(rows, start=1):
            if len(row) > width:
                return f"row {number} has {len(row)} fields, the header {width}: "
    except (csv.Error, StopIteration):
        return ""
    return ""


def _parse_parquet(data: bytes, shown: str) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except Exception as exc:  # polars and pyarrow both raise their own types
        raise ManifestError(
            f"manifest {shown} is not a readable Parquet file: {_first_line(exc)}"
        ) from exc
    casts: list[pl.Expr] = []
    for name, dtype in frame.schema.items():
        known = name.lstrip("\ufeff").strip() in KNOWN_COLUMNS
        if dtype == pl.String or (dtype.is_nested() and not known):
            continue  # already text, or a nested column we never read
        if dtype.is_nested():
            raise ManifestError(
                f"manifest {shown} column {name!r} has type {dtype}, which is not text"
            )
        if dtype.is_float():
            casts.append(_float_as_text(name))
            continue
        # Unknown columns are never read: a value that will not cast becomes null, not an error.
        casts.append(pl.col(name).cast(pl.String, strict=known))
    try:
        return frame.with_columns(casts)
    except pl.exceptions.PolarsError as exc:
        bad = next((c.meta.output_name() for c in casts if _fails(frame, c)), None)
        column = f" {bad!r} ({frame.schema[bad]})" if bad is not None else ""
        raise ManifestError(
            f"manifest {shown} column{column} cannot be read as text: {_first_line(exc)}"
        ) from exc


def _float_as_text(name: str) -> pl.Expr:
    """A float column as text the way its writer meant it: pandas stores an integer column
    with gaps as float64, so 7.0 is the id "7" and NaN is a missing value, not the id "NaN"."""
    value = pl.col(name)
    integral = value.is_finite() & (value == value.round()) & (value.abs() < 2.0**53)
    return (
        pl.when(value.is_nan())
        .then(None)
        .when(integral)
        .then(value.cast(pl.Int64, strict=False).cast(pl.String))
        .otherwise(value.cast(pl.String))
        .alias(name)
    )


def _fails(frame: pl.DataFrame, cast: pl.Expr) -> bool:
    try:
        frame.select(cast)
    except pl.exceptions.PolarsError:
        return True
    return False


def _extension(uri: str) -> str:
    """The format extension, lowercased, ignoring a query string and a compression suffix."""
    path = urlsplit(uri.rpartition("::")[2]).path if uri_scheme(uri) else uri
    name = path.rsplit("/", 1)[-1].lower()
    if infer_compression(name) is not None:
        name = name.rsplit(".", 1)[0]
    root, dot, ext = name.rpartition(".")
    return f".{ext}" if dot and root else ""


def _secrets(value: object) -> Iterator[str]:
    """Every string nested in the storage options (keys, tokens, passwords, ...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _secrets(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _secrets(item)


def _scrub(message: str, options: Mapping[str, Any], uri: str, shown: str) -> str:
    """Remove storage-option values and the raw URI (it may be presigned) from a message."""
    if uri != shown:
        message = message.replace(uri, shown)
    secrets = set(_secrets(options))
    if uri_scheme(uri):
        # A backend may echo the URL in pieces: its query and user info are secret on their own.
        parts = urlsplit(uri.rpartition("::")[2])
        secrets.update({parts.query, parts.netloc.rpartition("@")[0]})
    # Long values first, so a secret containing a shorter one is removed whole.
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:  # shorter values (region "eu", flags) would shred the text
            message = message.replace(secret, _REDACTED)
    return _first_line(message)


def _first_line(value: object, limit: int = 300) -> str:
    text = str(value).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
