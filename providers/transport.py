"""An httpx transport over aiohttp's connection pool, for the provider clients' hot path.

Clients keep talking to ``httpx.AsyncClient`` (the interface stays httpx: auth, redirects,
timeouts per request, mock transports in tests); only the wire underneath changes. Why: in the
fast benchmark (2,000 rows, 32 in flight) httpcore's pool bookkeeping was most of the flow's
CPU: on every request start and end it walks all connections and, for each idle one, asks
anyio for socket attributes (a ``getpeername`` and a ``poll`` each) under anyio cancel scopes.
aiohttp's pool and C HTTP parser did the same HTTP work for a quarter of the CPU per row
(see bench/README.md).

What this transport does not do, on purpose: HTTP/2, proxies from the environment, and
aiohttp's own redirects, cookies and decompression (httpx does those above the transport).
Errors are mapped onto httpx's exception types, so callers catch ``httpx.TimeoutException``
and ``httpx.TransportError`` as they would with httpx's own transport.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import aiohttp
import aiohttp.abc
import httpx

_CHUNK = 64 * 1024

# Most specific first: the first isinstance match wins.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # DNS, refused, TLS handshake
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),  # truncated or malformed body
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # unparsable response
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientOSError, httpx.NetworkError),
    (aiohttp.ClientError, httpx.TransportError),
    (TimeoutError, httpx.PoolTimeout),  # aiohttp's own wait for a free connection
)


class CallNotSent(Exception):
    """A call's first request, stopped by its send gate before any byte of it left."""


# The gate of the provider call in progress in this task (``gated_call``): asked right before
# the call's first request goes out, after every await of the caller's own checks, so a
# run-fatal error learnt meanwhile still stops it. Later requests of the call (polls,
# downloads) are not gated: the job they follow was accepted.
_CALL_GATE: ContextVar[Callable[[], bool] | None] = ContextVar("provider_call_gate", default=None)


@contextmanager
def gated_call(may_send: Callable[[], bool]) -> Iterator[None]:
    """Within the block, the first request sent on this task goes out only if ``may_send()``;
    else it raises ``CallNotSent`` and the provider never sees it."""
    token = _CALL_GATE.set(may_send)
    try:
        yield
    finally:
        _CALL_GATE.reset(token)


def _pass_gate(request: httpx.Request) -> None:
    gate = _CALL_GATE.get()
    if gate is None:
        return
    _CALL_GATE.set(None)  # the call's first request only
    if not gate():
        raise CallNotSent(f"{request.method} {request.url.host}: not sent (stopped by its gate)")


def _mapped(exc: BaseException) -> httpx.TransportError | None:
    for source, target in _ERRORS:
        if isinstance(exc, source):
            return target(f"{type(exc).__name__}: {exc}")
    return None


@contextmanager
def _map_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientError, TimeoutError) as exc:
        mapped = _mapped(exc)
        if mapped is None:  # pragma: no cover - the table ends with catch-alls
            raise
        mapped.request = request
        raise mapped from None  # aiohttp's exception holds the request line, not needed


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _map_errors(self._request):
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                yield chunk

    async def aclose(self) -> None:
        # Fully read: the connection goes back to the pool; otherwise it is closed.
        self._response.release()


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """httpx's default context (certifi, ``SSL_CERT_FILE``), made once per process: loading
    the CA bundle costs ~40 ms of CPU, and a run opens a pool per provider account."""
    return httpx.create_ssl_context()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncBaseTransport`` on one ``aiohttp.ClientSession``, opened lazily on the
    event loop of the first request (aiohttp sessions are bound to their loop)."""

    def __init__(
        self,
        *,
        limits: httpx.Limits | None = None,
        verify: ssl.SSLContext | bool = True,
        resolver: aiohttp.abc.AbstractResolver | None = None,
    ) -> None:
        """``resolver``: aiohttp's DNS resolver for this pool (default: aiohttp's own); the
        connector connects to exactly the addresses it returns (see ``tasks.fetch_guard``)."""
        limits = limits or httpx.Limits()
        self._max_connections = limits.max_connections or 0  # 0: no limit, as in aiohttp
        self._keepalive_s = limits.keepalive_expiry if limits.keepalive_expiry is not None else 5.0
        if isinstance(verify, ssl.SSLContext):
            self._ssl: ssl.SSLContext | bool = verify
        else:  # httpx's default context (certifi, SSL_CERT_FILE) so both transports agree
            self._ssl = default_ssl_context() if verify else False
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_s,
                ssl=self._ssl,
                resolver=self._resolver,  # None: aiohttp's default
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # httpx keeps the cookies
                auto_decompress=False,  # httpx decodes Content-Encoding
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._open()
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()  # multipart bodies are built in memory by httpx anyway
        _pass_gate(request)  # no await between this check and aiohttp writing the request
        with _map_errors(request):
            response = await session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=body or None,
                allow_redirects=False,
                compress=None,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeouts.get("pool"),
                    sock_connect=timeouts.get("connect"),
                    sock_read=timeouts.get("read"),
                ),
            )
        extensions: dict[str, object] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_ResponseStream(response, request),
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def provider_http_client(*, max_connections: int, timeout: httpx.Timeout) -> httpx.AsyncClient:
    """The ``httpx.AsyncClient`` a run gives its provider clients: ``max_connections``
    keep-alive connections on the aiohttp transport."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return httpx.AsyncClient(timeout=timeout, transport=AiohttpTransport(limits=limits))
