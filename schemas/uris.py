"""Which image references a manifest may hold, and how each one is read. Pure: no IO, no Prefect.

An image reference is data from users, and the worker fetches it. So the schemes are a closed
list, each with exactly one way to read it:

- a local path (no scheme) or ``file://``: the local filesystem;
- ``http://`` / ``https://``: only the guarded HTTP client (``tasks.fetch_guard``), which vets
  every hop's address after DNS;
- ``data:``: decoded in process;
- ``s3://`` (``s3a://``): bucket and key only; the endpoint and credentials come from the run's
  ``storage_options``, never from the URL;
- ``memory://``: fsspec's in-process store (tests, embedding), no network.

Everything else is refused: other fsspec protocols (``ftp``, ``gs``, ``webhdfs``, ``zip``,
``reference``...) would open network connections the guard never sees, and chained fsspec URLs
(``simplecache::http://...``) would smuggle an unguarded http fetch behind an allowed name.

``classify_image_ref`` is the one decision; manifest validation and the fetch both call it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "ALLOWED_SCHEMES_TEXT",
    "PLAINLY_ALLOWED_PREFIX",
    "SCHEME_PATTERN",
    "ImageRoute",
    "Refusal",
    "Route",
    "classify_image_ref",
    "image_ref_refusal",
    "uri_scheme",
]

Route = Literal["local", "http", "data", "s3", "memory"]

# RFC 3986 scheme syntax. A local file name containing ':' (rare) reads as a scheme and is
# then refused, which is a clear error rather than a silently wrong path.
SCHEME_PATTERN: Final = r"^([A-Za-z][A-Za-z0-9+.\-]*):"
_SCHEME_RE: Final = re.compile(SCHEME_PATTERN)
ALLOWED_SCHEMES_TEXT: Final = "local path, file://, http(s)://, data:, s3://"
# A reference with this prefix and no '::' anywhere, or with no ':' at all, is allowed (and
# ``classify_image_ref`` agrees): validation can pass such rows in bulk and ask
# ``classify_image_ref`` about the rest only.
PLAINLY_ALLOWED_PREFIX: Final = r"(?i)^(?:(?:https?|s3a?|file|memory)://|data:)"

# Filesystem schemes, always written "scheme://path"; the route reads "path".
_FS_ROUTES: Final[dict[str, Route]] = {
    "file": "local",
    "s3": "s3",
    "s3a": "s3",
    "memory": "memory",
}
_CHAIN: Final = "::"
# What a refusal may quote of a chain's first link: a protocol name, nothing user-specific.
_PROTOCOL_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,31}")
_SHOW_MAX: Final = 32  # a "scheme" can be any run of letters before a ':'


@dataclass(frozen=True, slots=True)
class ImageRoute:
    """An allowed reference: the one reader for it and what that reader is given.

    ``target`` is the whole URL for ``http`` and ``data``, else the path inside the route's
    filesystem (the scheme stripped: ``s3://b/k`` -> ``b/k``, ``file:///p`` -> ``/p``).
    """

    route: Route
    scheme: str  # lowercased; "" for a local path
    target: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A reference no route may read, with a reason naming its scheme (never its contents)."""

    scheme: str
    reason: str


def uri_scheme(uri: str) -> str:
    """The lowercased scheme of ``uri``: "" for a local path, "data" for a data URI."""
    match = _SCHEME_RE.match(uri)
    return match.group(1).lower() if match else ""


def classify_image_ref(ref: str, column: str | None = None) -> ImageRoute | Refusal:
    """Route ``ref`` to its one reader, or refuse it. ``column`` only names it in the reason.

    Case-insensitive in the scheme. ``http:host/x`` and ``http:/x`` (no ``//``) are refused
    rather than read as a local path or handed to a parser that might guess a host.
    """
    where = f" in column '{column}'" if column else ""
    if not ref or not ref.strip():
        return Refusal("", f"empty image reference{where}")
    scheme = uri_scheme(ref)
    rest = ref[len(scheme) + 1 :] if scheme else ref
    if scheme == "data":
        return ImageRoute("data", scheme, ref)
    if scheme in ("http", "https"):
        if not rest.startswith("//"):
            return Refusal(scheme, f"malformed {scheme} URL{where} (expected {scheme}://host/...)")
        # Whatever follows ('::' in an IPv6 host too) is the guarded client's to parse.
        return ImageRoute("http", scheme, ref)
    if _CHAIN in ref:
        # Checked before the scheme: fsspec reads "a::b" as a chain of filesystems whatever
        # the first link is called, so the chain is the problem, not the name.
        head = ref.split(_CHAIN, 1)[0].split("://", 1)[0].strip()
        shown = head.lower() if _PROTOCOL_RE.fullmatch(head) else "..."
        return Refusal(
            scheme,
            f"chained fsspec URLs ('{shown}::...') are not allowed{where} (allowed: "
            f"{ALLOWED_SCHEMES_TEXT}; one filesystem per image)",
        )
    if not scheme:
        return ImageRoute("local", "", ref)
    route = _FS_ROUTES.get(scheme)
    if route is None:
        shown = scheme if len(scheme) <= _SHOW_MAX else scheme[: _SHOW_MAX - 3] + "..."
        return Refusal(
            scheme,
            f"URI scheme '{shown}' is not allowed{where} (allowed: {ALLOWED_SCHEMES_TEXT})",
        )
    if not rest.startswith("//"):
        return Refusal(scheme, f"malformed {scheme} URL{where} (expected {scheme}://...)")
    return ImageRoute(route, scheme, rest[2:])


def image_ref_refusal(ref: str, column: str | None = None) -> str | None:
    """The reason ``ref`` is refused, or ``None`` when some route may read it."""
    verdict = classify_image_ref(ref, column)
    return verdict.reason if isinstance(verdict, Refusal) else None
