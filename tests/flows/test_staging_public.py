"""A Tencent run whose inputs are fetched from ``TRYON_STAGING_BASE_URL``, served as the README
says: a web server of the folder ``<lake>/inputs`` alone, here under a path prefix on loopback."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import polars as pl
import pytest

from emulator.server import EmulatorServer
from flows.batch import BatchParams, RunNotStarted, tryon_batch
from tasks.staging import STAGING_BASE_URL_ENV
from tests.flows.conftest import SAMPLE_MANIFEST

pytestmark = pytest.mark.e2e

PREFIX = "/tryon/inputs/"  # a CDN-like path prefix in front of the served folder


@dataclass
class InputsFolderServer:
    """Serves the files directly in ``folder`` at ``base_url``; records every request."""

    folder: Path
    server: ThreadingHTTPServer
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # method, path, status
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{PREFIX}"


def _handler(state: list[InputsFolderServer]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, *, body: bool) -> None:
            served = state[0]
            path = unquote(urlsplit(self.path).path)
            name = path.removeprefix(PREFIX)
            target = served.folder / name
            ok = (
                name != path
                and bool(name)
                and "/" not in name
                and not name.startswith(".")
                and target.is_file()
            )
            with served.lock:
                served.requests.append((self.command, self.path, 200 if ok else 404))
            if not ok:
                self.send_error(404)
                return
            data = target.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_POST(self) -> None:  # recorded and refused: a static folder takes no writes
            self._answer(body=False)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    return tmp_path / "lake"


@pytest.fixture
def inputs_server(lake: Path) -> Iterator[InputsFolderServer]:
    folder = lake / "inputs"
    folder.mkdir(parents=True)
    state: list[InputsFolderServer] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.append(InputsFolderServer(folder=folder, server=server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state[0]
    server.shutdown()
    server.server_close()
    thread.join()


async def test_tencent_fetches_inputs_from_a_server_of_just_the_inputs_folder(
    use_emulator: EmulatorServer,
    inputs_server: InputsFolderServer,
    lake: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(STAGING_BASE_URL_ENV, inputs_server.base_url)
    summary = await tryon_batch(
        BatchParams(manifest=str(SAMPLE_MANIFEST), lake=str(lake), provider="tencent")
    )
    meta = pl.scan_parquet(f"{lake}/metadata/**/*.parquet").collect()
    story = meta.select("row_id", "status", "error_code", "error_message")

    # Every row Tencent can take succeeded; the two it cannot (a prompt row, shoes) never ran.
    assert summary.counts == {"succeeded": 7, "invalid": 2}, story
    assert meta.filter(pl.col("status") == "failed").height == 0, story
    assert set(meta.filter(pl.col("status") == "invalid")["row_id"]) == {"dev-prompt", "ana-shoes"}

    # The staged inputs: content-addressed files directly in <lake>/inputs.
    staged = {p.name: p for p in (lake / "inputs").iterdir()}
    assert staged
    for name, path in staged.items():
        digest, _, extension = name.partition(".")
        assert extension in {"jpg", "png", "webp"} and path.is_file()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest

    # The provider asked only for <prefix><sha256>.<ext> of files in <lake>/inputs, got each
    # one, and asked for every staged file (so none came from any other server).
    requests = list(inputs_server.requests)
    assert requests
    for method, path, status in requests:
        assert method == "GET" and status == 200, requests
        assert path.startswith(PREFIX), requests
        assert path.removeprefix(PREFIX) in staged, requests
        for private in ("metadata/", "runs/", "outputs/", "work/", "jobs/", "..", "?"):
            assert private not in path, requests
    assert {path.removeprefix(PREFIX) for _, path, _ in requests} == set(staged)

    # The lake's private parts exist, yet none of them was ever requested.
    for private in ("metadata", "runs", "outputs", "work"):
        assert (lake / private).is_dir()


async def test_a_staging_base_with_a_query_string_does_not_start(
    use_emulator: EmulatorServer,
    inputs_server: InputsFolderServer,
    lake: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(STAGING_BASE_URL_ENV, f"{inputs_server.base_url}?token=s3cr3t")
    with pytest.raises(RunNotStarted, match=STAGING_BASE_URL_ENV) as refused:
        await tryon_batch(
            BatchParams(manifest=str(SAMPLE_MANIFEST), lake=str(lake), provider="tencent")
        )
    assert "query string" in str(refused.value) and "s3cr3t" not in str(refused.value)
    assert use_emulator.control.posts() == 0
    assert inputs_server.requests == []
