"""Input image bytes from a reference, along exactly one route. Prefect-free.

``fetch_bytes`` reads ``data:`` URIs, http(s) through an injected ``httpx.AsyncClient``, local
paths, ``file://``, ``s3://`` and ``memory://`` (the closed list of ``schemas.uris``; anything
else, chained fsspec URLs included, is refused), always with a byte cap.

Every failure is an ``ImageInputError`` with a stable ``code`` and a ``transient`` flag;
``display_uri`` is how a reference appears in its message (and anywhere else people read).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import urllib.parse
from typing import Any, Final

import fsspec
import httpx
from fsspec.spec import AbstractFileSystem

from schemas.results import ErrorKind
from schemas.uris import ImageRoute, Refusal, classify_image_ref
from tasks.fetch_guard import BLOCKED_CODE, FetchBlockedError

__all__ = [
    "DEFAULT_MAX_FETCH_BYTES",
    "ImageInputError",
    "display_uri",
    "fetch_bytes",
    "route_filesystem",
]

DEFAULT_MAX_FETCH_BYTES: Final = 50 * 1024 * 1024

_SCHEME_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_STREAM_CHUNK: Final = 64 * 1024
_URLSAFE_B64: Final = str.maketrans("-_", "+/")
_INLINE_DECODE_LIMIT: Final = 256 * 1024


class ImageInputError(Exception):
    """An input image that could not be fetched or prepared.

    ``code`` is stable and machine-readable; ``message`` names the (redacted) URI and the limit;
    ``transient`` says whether retrying the same input could succeed.
    """

    def __init__(self, code: str, message: str, *, transient: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.transient = transient

    @property
    def kind(self) -> ErrorKind:
        return ErrorKind.TRANSIENT if self.transient else ErrorKind.PERMANENT

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only ``transient`` breaks Exception's default pickling (Prefect pickles errors).
        return (_rebuild_error, (self.code, self.message, self.transient))


def _rebuild_error(code: str, message: str, transient: bool) -> ImageInputError:
    return ImageInputError(code, message, transient=transient)


def display_uri(uri: str, *, limit: int = 200) -> str:
    """``uri`` safe for messages and logs: no credentials, no query string, no inline data."""
    if uri[:5].lower() == "data:":
        header = uri[5:].split(",", 1)[0][:64]
        return f"data:{header},...({len(uri)} chars)"
    match = _SCHEME_RE.match(uri)
    if match:
        try:
            parts = urllib.parse.urlsplit(uri)
        except ValueError:
            return f"{match.group(1)}://...({len(uri)} chars)"
        netloc = parts.netloc
        if "@" in netloc:  # user:password@host
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        # Query strings carry presigned-URL signatures and tokens.
        shown = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        if parts.query:
            shown += "?..."
    else:
        shown = uri
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


async def fetch_bytes(
    uri: str,
    *,
    http: httpx.AsyncClient,
    max_bytes: int = DEFAULT_MAX_FETCH_BYTES,
    storage_options: dict[str, Any] | None = None,
) -> bytes:
    """Read the raw bytes behind ``uri``, never more than ``max_bytes``.

    ``uri`` goes to the one reader ``classify_image_ref`` routes it to: http(s) only through
    ``http`` (the guarded client), files through one explicitly chosen filesystem, never through
    fsspec's URL parsing (which would follow ``proto::url`` chains). A refused reference fails
    with UNSUPPORTED_SCHEME before any IO. ``storage_options`` configure ``s3://`` only.
    """
    if not uri or not uri.strip():
        raise ImageInputError("BAD_URI", "empty image URI")
    verdict = classify_image_ref(uri)
    if isinstance(verdict, Refusal):
        # The reason names the scheme only: the URL itself may carry credentials.
        raise ImageInputError("UNSUPPORTED_SCHEME", verdict.reason)
    if verdict.route == "data":
        if len(uri) > _INLINE_DECODE_LIMIT:  # decoding megabytes of base64 would stall the loop
            return await asyncio.to_thread(_decode_data_uri, uri, max_bytes)
        return _decode_data_uri(uri, max_bytes)
    if verdict.route == "http":
        return await _fetch_http(uri, http=http, max_bytes=max_bytes)
    return await asyncio.to_thread(
        _read_filesystem, verdict, display_uri(uri), max_bytes, dict(storage_options or {})
    )


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    shown = display_uri(uri)
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ImageInputError("BAD_DATA_URI", f"{shown}: no ',' separating header and data")
    # Cheap bound before decoding: no encoding inflates by more than 3x (percent-encoding).
    if len(payload) > 3 * max_bytes + 16:
        raise ImageInputError("FETCH_TOO_LARGE", f"{shown}: exceeds max_bytes {max_bytes}")
    if "base64" in (p.strip().lower() for p in header.split(";")[1:]):
        text = re.sub(r"\s+", "", urllib.parse.unquote(payload))
        text = text.translate(_URLSAFE_B64) + "=" * (-len(text) % 4)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError("BAD_DATA_URI", f"{shown}: invalid base64 payload") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise ImageInputError("BAD_DATA_URI", f"{shown}: empty payload")
    if len(data) > max_bytes:
        raise ImageInputError(
            "FETCH_TOO_LARGE", f"{shown}: {len(data)} bytes exceeds max_bytes {max_bytes}"
        )
    return data


async def _fetch_http(uri: str, *, http: httpx.AsyncClient, max_bytes: int) -> bytes:
    shown = display_uri(uri)
    try:
        # Image hosts and presigned storage URLs redirect routinely.
        async with http.stream("GET", uri, follow_redirects=True) as response:
            status = response.status_code
            if status in (404, 410):
                raise ImageInputError("FETCH_NOT_FOUND", f"{shown}: HTTP {status}")
            if status in (408, 429) or status >= 500:
                raise ImageInputError(
                    f"FETCH_HTTP_{status}", f"{shown}: HTTP {status}", transient=True
                )
            if not 200 <= status < 300:
                raise ImageInputError(f"FETCH_HTTP_{status}", f"{shown}: HTTP {status}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ImageInputError(
                    "FETCH_TOO_LARGE",
                    f"{shown}: Content-Length {declared} exceeds max_bytes {max_bytes}",
                )
            buffer = bytearray()
            async for chunk in response.aiter_bytes(_STREAM_CHUNK):
                buffer += chunk
                if len(buffer) > max_bytes:
                    # Leaving the ``async with`` closes the connection: the rest is never read.
                    raise ImageInputError(
                        "FETCH_TOO_LARGE",
                        f"{shown}: body exceeds max_bytes {max_bytes} (aborted after "
                        f"{len(buffer)} bytes)",
                    )
            return bytes(buffer)
    except FetchBlockedError as exc:
        # The host only: the path and query of an internal URL are nobody's business.
        raise ImageInputError(BLOCKED_CODE, f"{exc}: refused (see fetch_allow)") from None
    except httpx.TimeoutException as exc:
        raise ImageInputError(
            "FETCH_TIMEOUT", f"{shown}: timed out ({type(exc).__name__})", transient=True
        ) from None
    except httpx.UnsupportedProtocol as exc:
        # The first URL is http(s): a redirect led elsewhere (file://, ftp://...).
        raise ImageInputError("FETCH_BAD_REDIRECT", f"{shown}: {exc}") from None
    except httpx.TransportError as exc:
        raise ImageInputError(
            "FETCH_CONNECTION", f"{shown}: connection failed ({type(exc).__name__})", transient=True
        ) from None
    except httpx.TooManyRedirects:
        raise ImageInputError("FETCH_REDIRECTS", f"{shown}: too many redirects") from None
    except httpx.DecodingError as exc:
        raise ImageInputError(
            "FETCH_DECODING", f"{shown}: undecodable response body ({type(exc).__name__})"
        ) from None
    except httpx.InvalidURL:
        raise ImageInputError("BAD_URI", f"{shown}: invalid URL") from None


def route_filesystem(route: ImageRoute, storage_options: dict[str, Any]) -> AbstractFileSystem:
    """The one filesystem for an allowed non-HTTP route, chosen here, never from the URL."""
    if route.route == "s3":
        # The endpoint and credentials come from the run's configuration, not the manifest.
        return fsspec.filesystem("s3", **storage_options)
    if route.route == "memory":
        return fsspec.filesystem("memory")
    return fsspec.filesystem("file")


def _read_filesystem(
    route: ImageRoute, shown: str, max_bytes: int, storage_options: dict[str, Any]
) -> bytes:
    """Blocking filesystem read, run in a worker thread."""
    try:
        fs = route_filesystem(route, storage_options)
        path = route.target
        try:
            info = fs.info(path)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception:  # some filesystems cannot stat; the capped read still protects us
            info = {}
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        size = info.get("size")
        if isinstance(size, int) and size > max_bytes:
            raise ImageInputError(
                "FETCH_TOO_LARGE", f"{shown}: {size} bytes exceeds max_bytes {max_bytes}"
            )
        with fs.open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except ImageInputError:
        raise
    except FileNotFoundError:
        raise ImageInputError("FETCH_NOT_FOUND", f"{shown}: no such file") from None
    except IsADirectoryError:
        raise ImageInputError("FETCH_NOT_A_FILE", f"{shown}: is a directory") from None
    except PermissionError:
        raise ImageInputError("FETCH_FORBIDDEN", f"{shown}: permission denied") from None
    except ImportError as exc:
        # s3:// without s3fs installed; fsspec's message names the missing package.
        raise ImageInputError("UNSUPPORTED_SCHEME", f"{shown}: {exc}") from None
    except (TimeoutError, ConnectionError) as exc:
        raise ImageInputError(
            "FETCH_CONNECTION", f"{shown}: {type(exc).__name__}", transient=True
        ) from None
    except OSError as exc:
        # Remote filesystems surface throttling and 5xx as bare OSError: worth a retry.
        raise ImageInputError(
            "FETCH_IO", f"{shown}: {type(exc).__name__}: {exc.strerror or ''}", transient=True
        ) from None
    except Exception as exc:
        raise ImageInputError("FETCH_FAILED", f"{shown}: {type(exc).__name__}") from None
    if len(data) > max_bytes:
        raise ImageInputError("FETCH_TOO_LARGE", f"{shown}: exceeds max_bytes {max_bytes}")
    return data
