"""tasks.fetch_guard: input fetches never reach non-public addresses unless allowed.

Real HTTP servers on 127.0.0.1; DNS is either the system's ``localhost`` or a lookup injected
into the policy, so nothing leaves the machine. Every refusal test would fail (a fetch that
succeeds, or a connection error instead of FETCH_BLOCKED_ADDRESS) without the guard.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.batch import BatchParams
from tasks.fetch_guard import (
    BLOCKED_CODE,
    FetchBlockedError,
    FetchPolicy,
    blocked_reason,
    inputs_http_client,
    parse_allow_entry,
)
from tasks.images import ImageInputError, fetch_bytes

BODY = b"\x89PNG\r\n\x1a\n pretend image"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        with self.server.lock:
            self.server.hits[path] += 1
        if path == "/img":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif path == "/trickle":  # a byte every 0.1 s, within any read timeout, for 10 s
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif path == "/to":  # /to?http://somewhere/else
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(query))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fake_dns(table: dict[str, Sequence[str]]) -> Any:
    """A lookup answering from ``table`` (unknown names: no address), recording questions."""
    asked: list[str] = []

    async def lookup(host: str, port: int) -> Sequence[str]:
        asked.append(host)
        return table.get(host.rstrip(".").lower(), [])

    lookup.asked = asked  # type: ignore[attr-defined]
    return lookup


@pytest.fixture
async def guarded() -> AsyncIterator[httpx.AsyncClient]:
    """The default policy: nothing non-public."""
    async with inputs_http_client(FetchPolicy(), timeout=httpx.Timeout(2.0)) as client:
        yield client


async def blocked(uri: str, client: httpx.AsyncClient) -> ImageInputError:
    started = time.perf_counter()
    with pytest.raises(ImageInputError) as info:
        await fetch_bytes(uri, http=client)
    assert info.value.code == BLOCKED_CODE, info.value
    assert not info.value.transient
    assert time.perf_counter() - started < 1.5  # refused up front, not a connect timeout
    return info.value


# ------------------------------------------------------------------------ default: refused


async def test_hostname_resolving_to_loopback_is_refused_after_dns(
    server: _Server, guarded: httpx.AsyncClient
) -> None:
    before = server.hits["/img"]
    exc = await blocked(f"http://localhost:{server.port}/img?token=s3cret", guarded)
    assert "localhost" in exc.message and "loopback" in exc.message
    assert "s3cret" not in str(exc) and "/img" not in str(exc)  # the host, not the URL
    assert server.hits["/img"] == before  # never connected


async def test_injected_dns_answer_is_checked_too(server: _Server) -> None:
    dns = fake_dns({"images.example.com": ["127.0.0.1"]})
    async with inputs_http_client(FetchPolicy(lookup=dns)) as client:
        exc = await blocked(f"http://images.example.com:{server.port}/img", client)
    assert dns.asked == ["images.example.com"]
    assert "resolves to 127.0.0.1" in exc.message


async def test_one_blocked_address_among_public_ones_refuses_the_host(server: _Server) -> None:
    dns = fake_dns({"rebind.example.com": ["93.184.216.34", "127.0.0.1"]})
    async with inputs_http_client(FetchPolicy(lookup=dns)) as client:
        await blocked(f"http://rebind.example.com:{server.port}/img", client)


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",  # cloud metadata
        "127.0.0.1",
        "127.0.0.2",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",  # CGNAT
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "[::1]",
        "[::]",
        "[::ffff:127.0.0.1]",
        "[::ffff:169.254.169.254]",
        "[fe80::1]",
        "[fc00::1]",
        "[fd12:3456::1]",
        "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
        "[2002:7f00:1::1]",  # 6to4 of 127.0.0.1
        "2130706433",  # 127.0.0.1 as one number: aiohttp skips DNS for it
        "0x7f.1",  # inet_aton spelling of 127.0.0.1, resolved by the OS
        "127.1",
    ],
)
async def test_ip_literals_and_numeric_spellings_are_refused(
    host: str, server: _Server, guarded: httpx.AsyncClient
) -> None:
    before = server.hits["/img"]
    await blocked(f"http://{host}:{server.port}/img", guarded)
    assert server.hits["/img"] == before


async def test_metadata_address_message_names_the_host_only(guarded: httpx.AsyncClient) -> None:
    exc = await blocked(
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/role", guarded
    )
    assert exc.message.startswith("host 169.254.169.254 is a link-local address")
    assert "meta-data" not in str(exc)


async def test_redirect_to_loopback_is_refused_on_the_hop(server: _Server) -> None:
    # A public-looking host (its name is allowed) whose answer redirects to loopback.
    dns = fake_dns({"images.example.com": ["127.0.0.1"], "localhost": ["127.0.0.1", "::1"]})
    policy = FetchPolicy(allow=("images.example.com",), lookup=dns)
    base = f"http://images.example.com:{server.port}"
    async with inputs_http_client(policy) as client:
        assert await fetch_bytes(f"{base}/img", http=client) == BODY
        # Same host, relative redirect: followed.
        assert await fetch_bytes(f"{base}/to?/img", http=client) == BODY
        before = server.hits["/img"]
        for target in (
            f"http://127.0.0.1:{server.port}/img",
            f"http://localhost:{server.port}/img",
            f"http://[::ffff:127.0.0.1]:{server.port}/img",
            "http://169.254.169.254/latest/meta-data/",
        ):
            await blocked(f"{base}/to?{target}", client)
        assert server.hits["/img"] == before  # no hop reached the target


async def test_redirect_to_another_scheme_is_refused(server: _Server) -> None:
    async with inputs_http_client(FetchPolicy(allow=("127.0.0.1",))) as client:
        with pytest.raises(ImageInputError) as info:
            await fetch_bytes(f"http://127.0.0.1:{server.port}/to?file:///etc/passwd", http=client)
    assert (info.value.code, info.value.transient) == ("FETCH_BAD_REDIRECT", False)


# --------------------------------------------------------------------------- the allow-list


async def test_allow_list_opens_exactly_what_it_names(server: _Server) -> None:
    port = server.port
    async with inputs_http_client(FetchPolicy(allow=("127.0.0.1/32",))) as client:
        assert await fetch_bytes(f"http://127.0.0.1:{port}/img", http=client) == BODY
        await blocked(f"http://127.0.0.2:{port}/img", client)
        await blocked(f"http://[::1]:{port}/img", client)
        await blocked(f"http://169.254.169.254:{port}/img", client)

    async with inputs_http_client(FetchPolicy(allow=("localhost",))) as client:
        assert await fetch_bytes(f"http://localhost:{port}/img", http=client) == BODY
        await blocked(f"http://127.0.0.1:{port}/img", client)  # the name, not its address

    dns = fake_dns({f"{n}.internal": ["127.0.0.1"] for n in ("a", "b", "sub.a")})
    async with inputs_http_client(FetchPolicy(allow=("a.internal",), lookup=dns)) as client:
        assert await fetch_bytes(f"http://a.internal:{port}/img", http=client) == BODY
        assert await fetch_bytes(f"http://A.Internal.:{port}/img", http=client) == BODY
        await blocked(f"http://b.internal:{port}/img", client)
        await blocked(f"http://sub.a.internal:{port}/img", client)


async def test_allowed_network_connects_to_the_vetted_address(server: _Server) -> None:
    # "anything.test" does not exist in real DNS: reaching the server proves the connection
    # went to the address the guarded lookup vetted, not to a second, unchecked lookup.
    dns = fake_dns({"anything.test": ["127.0.0.1"]})
    async with inputs_http_client(FetchPolicy(allow=("127.0.0.0/8",), lookup=dns)) as client:
        assert await fetch_bytes(f"http://anything.test:{server.port}/img", http=client) == BODY
        assert await fetch_bytes(f"http://[::ffff:127.0.0.1]:{server.port}/img", http=client)


def test_loopback_policy_for_the_emulator() -> None:
    policy = FetchPolicy().with_loopback()
    assert policy.address_allowed(ip_address("127.0.0.1"))
    assert policy.address_allowed(ip_address("::1"))
    assert not policy.address_allowed(ip_address("10.0.0.1"))
    assert not policy.address_allowed(ip_address("169.254.169.254"))


@pytest.mark.parametrize(
    ("entry", "normal"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        (" 192.168.1.20 ", "192.168.1.20/32"),
        ("fd00::/8", "fd00::/8"),
        ("[::1]", "::1/128"),
        ("Images.Internal.Example.", "images.internal.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_allow_entries_are_normalised(entry: str, normal: str) -> None:
    assert parse_allow_entry(entry) == normal


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "http://10.0.0.1/",
        "10.0.0.1/8",  # host bits set: say 10.0.0.0/8
        "10.0.0.0/33",
        "0.0.0.0/0",  # everything: that is no guard
        "::/0",
        "bad_host.example",
        "-x.example",
        "a..b",
        "2130706433",
        "images.example.com/path",
    ],
)
def test_bad_allow_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="fetch_allow"):
        parse_allow_entry(entry)
    with pytest.raises(ValueError, match="fetch_allow"):
        BatchParams(manifest="m.csv", fetch_allow=[entry])


def test_batch_params_default_allows_nothing() -> None:
    params = BatchParams(manifest="m.csv")
    assert params.fetch_allow == []
    assert BatchParams(manifest="m.csv", fetch_allow=["10.0.0.0/8", "10.0.0.0/8"]).fetch_allow == [
        "10.0.0.0/8"
    ]


@pytest.mark.parametrize(
    ("address", "verdict"),
    [
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.1.1", "CGNAT"),
        ("::ffff:10.0.0.1", "private"),
        ("198.18.0.1", "private"),  # benchmarking range: Python calls it private
        ("ff02::1", "multicast"),
    ],
)
def test_blocked_reason(address: str, verdict: str | None) -> None:
    reason = blocked_reason(ip_address(address))
    assert reason is None if verdict is None else verdict in (reason or "")


def test_blocked_error_is_a_transport_error() -> None:
    exc = FetchBlockedError("h.example", "resolves to 10.0.0.1: a private address")
    assert isinstance(exc, httpx.TransportError) and exc.host == "h.example"


async def test_client_verifies_tls_and_ignores_proxy_environment(
    monkeypatch: pytest.MonkeyPatch, server: _Server
) -> None:
    # A proxy from the environment would connect for us, past the guard.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{server.port}")
    async with inputs_http_client(FetchPolicy()) as client:
        await blocked(f"http://localhost:{server.port}/img", client)
        ctx = client._transport._inner._ssl  # type: ignore[attr-defined]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


# ------------------------------------------------------------------------------------ the CLI


def test_cli_fetch_options_reach_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """``--fetch-allow`` entries are validated; ``--emulator`` adds loopback, nothing more."""
    from typer.testing import CliRunner

    import flows.batch
    import flows.cli
    import flows.local_server
    from flows.batch import RunNotStarted
    from flows.local_server import PrefectApi

    seen: list[BatchParams] = []

    async def capture(params: BatchParams) -> None:
        seen.append(params)
        raise RunNotStarted("captured")

    monkeypatch.setattr(flows.batch, "tryon_batch", capture)
    monkeypatch.setattr(flows.cli, "_start_emulator", lambda stack: "http://127.0.0.1:9")
    # A run that can start (the preflight reads the manifest, probes the lake, wants a key).
    monkeypatch.setenv("CHANGECLOTHES_API_KEY", "k")
    # No Prefect server: none would be reached, and none may be started in the user's home.
    no_server = PrefectApi(api_url="http://127.0.0.1:9/api", ui_url=None, server=None)
    monkeypatch.setattr(flows.local_server, "prefect_api", lambda say: nullcontext(no_server))
    runner = CliRunner()
    manifest = str(Path(__file__).resolve().parents[2] / "sample" / "manifest.csv")
    lake = ["--lake", str(tmp_path / "lake")]

    result = runner.invoke(flows.cli.app, ["run", manifest, *lake, "--no-progress"])
    assert result.exit_code == 2 and seen[-1].fetch_allow == []
    assert seen[-1].fetch_timeout_s == 30.0

    args = ["run", manifest, *lake, "--no-progress", "--emulator", "--fetch-allow", "10.20.0.0/16"]
    result = runner.invoke(flows.cli.app, [*args, "--fetch-timeout", "5"])
    assert result.exit_code == 2
    assert seen[-1].fetch_allow == ["10.20.0.0/16", "127.0.0.0/8", "::1/128"]
    assert seen[-1].fetch_timeout_s == 5.0

    calls = len(seen)
    result = runner.invoke(flows.cli.app, ["run", manifest, "--fetch-allow", "http://x/"])
    assert result.exit_code == 2 and "fetch_allow" in result.output + (result.stderr or "")
    assert len(seen) == calls  # refused before any run


async def test_a_trickling_response_ends_at_the_total_timeout(server: _Server) -> None:
    policy = FetchPolicy(allow=("127.0.0.1",))
    client = inputs_http_client(policy, timeout=httpx.Timeout(2.0), total_timeout_s=0.5)
    async with client:
        started = time.perf_counter()
        with pytest.raises(ImageInputError) as info:
            await fetch_bytes(f"http://127.0.0.1:{server.port}/trickle", http=client)
    assert (info.value.code, info.value.transient) == ("FETCH_TIMEOUT", True)
    assert time.perf_counter() - started < 2.0  # not the 10 s the body would take


async def test_unknown_name_is_a_dns_failure_not_a_refusal() -> None:
    async with inputs_http_client(FetchPolicy(lookup=fake_dns({}))) as client:
        with pytest.raises(ImageInputError) as info:
            await fetch_bytes("http://nowhere.example.com/x.jpg", http=client)
    assert (info.value.code, info.value.transient) == ("FETCH_CONNECTION", True)
