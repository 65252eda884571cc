"""The aiohttp transport under httpx: same behaviour as httpx's own, errors as httpx types.

A raw asyncio HTTP/1.1 server on loopback plays the misbehaving peers (truncated bodies, hangs,
hang-ups) that a polite framework would not.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from providers.common import guard_transport
from providers.transport import (
    AiohttpTransport,
    CallNotSent,
    gated_call,
    provider_http_client,
)

Handler = Callable[[str, dict[str, str], bytes, asyncio.StreamWriter], Awaitable[bool]]


async def _respond(
    writer: asyncio.StreamWriter, status: str, body: bytes, headers: dict[str, str] | None = None
) -> None:
    head = {"Content-Length": str(len(body)), **(headers or {})}
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    writer.write("\r\n".join(lines).encode() + body)
    await writer.drain()


async def _handle(path: str, headers: dict[str, str], body: bytes, w: asyncio.StreamWriter) -> bool:
    """Answer one request; False closes the connection."""
    if path == "/echo":
        payload = {
            "headers": headers,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        await _respond(w, "200 OK", json.dumps(payload).encode(), {"X-Tag": "a", "x-tag": "b"})
        return True
    if path == "/truncated":
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await w.drain()
        return False
    if path == "/hang":
        await asyncio.sleep(30)
        return False
    if path == "/hang-up":
        return False
    if path == "/redirect":
        await _respond(w, "302 Found", b"", {"Location": "/echo"})
        return True
    if path == "/gzip":
        await _respond(w, "200 OK", gzip.compress(b"hello " * 100), {"Content-Encoding": "gzip"})
        return True
    if path == "/big":
        await _respond(w, "200 OK", b"b" * 1_000_000)
        return True
    await _respond(w, "404 Not Found", b"no")
    return True


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in header_lines:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if not await _handle(request_line.split(" ")[1], headers, body, writer):
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()


def client() -> httpx.AsyncClient:
    return provider_http_client(max_connections=4, timeout=httpx.Timeout(5.0))


async def test_request_and_response_pass_through_unchanged(base_url: str) -> None:
    body = bytes(range(256)) * 1000
    async with client() as http:
        response = await http.post(
            f"{base_url}/echo",
            files={"img": ("a.bin", body, "application/octet-stream")},
            data={"category": "upper_body"},
            headers={"Authorization": "Bearer k"},
        )
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["headers"]["authorization"] == "Bearer k"
    assert echoed["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert int(echoed["headers"]["content-length"]) == echoed["length"] > len(body)
    assert response.headers.get_list("x-tag") == ["a", "b"]  # repeated headers kept


async def test_content_encoding_and_redirects_are_left_to_httpx(base_url: str) -> None:
    async with client() as http:
        assert (await http.get(f"{base_url}/gzip")).text == "hello " * 100
        redirect = await http.get(f"{base_url}/redirect")
        assert redirect.status_code == 302  # not followed below httpx
        followed = await http.get(f"{base_url}/redirect", follow_redirects=True)
        assert followed.status_code == 200 and followed.url.path == "/echo"


async def test_a_stream_closed_early_leaves_the_client_usable(base_url: str) -> None:
    async with client() as http:
        for _ in range(3):
            async with http.stream("GET", f"{base_url}/big") as response:
                async for chunk in response.aiter_bytes():
                    assert chunk
                    break
        assert (await http.get(f"{base_url}/echo")).status_code == 200


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/truncated", httpx.ReadError),
        ("/hang-up", httpx.RemoteProtocolError),
    ],
)
async def test_broken_peers_raise_httpx_transport_errors(
    base_url: str, path: str, error: type[Exception]
) -> None:
    async with client() as http:
        with pytest.raises(error):
            await http.get(f"{base_url}{path}")


async def test_a_hanging_server_is_a_read_timeout(base_url: str) -> None:
    async with provider_http_client(max_connections=2, timeout=httpx.Timeout(0.3)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{base_url}/hang")


async def test_nothing_listening_is_a_connect_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_provider_errors_keep_secrets_out(base_url: str) -> None:
    """The mapped error carries no aiohttp context that could hold the request's headers."""
    async with client() as http:
        with pytest.raises(Exception) as caught:
            await guard_transport(
                http.get(f"{base_url}/hang-up", headers={"Authorization": "Bearer sk-secret"}),
                provider="p",
                url=f"{base_url}/hang-up",
                timeout=5.0,
                secrets=["sk-secret"],
            )
    error = caught.value
    text = f"{error} {error!r} {error.__cause__!r} {error.__context__!r}"
    assert "sk-secret" not in text and getattr(error, "code", None) == "CONNECTION_ERROR"


async def test_pool_limit_is_honoured(base_url: str) -> None:
    transport = AiohttpTransport(limits=httpx.Limits(max_connections=2))
    async with httpx.AsyncClient(transport=transport, timeout=5.0) as http:
        responses = await asyncio.gather(*(http.get(f"{base_url}/echo") for _ in range(10)))
        assert all(r.status_code == 200 for r in responses)
        session = transport._session
        assert session is not None and session.connector is not None
        assert session.connector.limit == 2


async def test_a_gated_call_sends_nothing_when_its_gate_closes_at_the_last_moment() -> None:
    """The gate is asked as the first request leaves, after the caller's own awaits."""
    requests: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        requests.append(head.decode("latin-1").split(" ")[1])
        await _respond(writer, "200 OK", b"ok")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    stopped = False
    try:
        async with client() as http:
            with gated_call(lambda: not stopped):
                stopped = True  # a fatal error learnt while the request was being built
                with pytest.raises(CallNotSent):
                    await http.post(f"{url}/submit", content=b"x")
            assert requests == []
            with gated_call(lambda: True):
                await http.post(f"{url}/submit", content=b"x")
                # The call's later requests (polls, downloads) are not gated.
                stopped = True
                assert (await http.get(f"{url}/poll")).status_code == 200
            assert (await http.get(f"{url}/outside")).status_code == 200  # no call, no gate
    finally:
        server.close()
    assert requests == ["/submit", "/poll", "/outside"]
