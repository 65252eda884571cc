"""Input images on a real loopback HTTP server that counts requests: held, hanging, failing
and endless inputs for tests of what a run (and its report) fetches."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "images"
ENDLESS_CAP = 256 << 20  # "endless": far beyond any fetch cap, bounded should a client read on


class InputServer(ThreadingHTTPServer):
    """Input images on 127.0.0.1, counting every request by path. ``/img/<name>`` serves a
    file; ``/hang`` answers nothing until released; ``/status/<code>`` answers that status;
    ``/endless`` streams a body that never ends."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _InputHandler)
        self.files = files
        self.released = threading.Event()
        self._requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, path: str) -> None:
        with self._lock:
            self._requests[path] += 1

    def requests(self) -> Counter[str]:
        with self._lock:
            return Counter(self._requests)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-body is what these endpoints are for


class _InputHandler(BaseHTTPRequestHandler):
    server: InputServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.count(path)
        if path == "/hang":
            self.server.released.wait(60)
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"error")
        elif path == "/endless":
            self._endless()
        elif (body := self.server.files.get(path.removeprefix("/img/"))) is not None:
            self._send(200, body)
        else:
            self._send(404, b"")

    def _endless(self) -> None:
        # No Content-Length: the body ends when the server closes, i.e. never.
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        self.close_connection = True
        chunk, sent = b"\xff" * 65536, 0
        try:
            while sent < ENDLESS_CAP and not self.server.released.is_set():
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the client stopped reading at its cap


@contextmanager
def serving_inputs() -> Iterator[InputServer]:
    """A started server holding the sample's person_ana.jpg as /img/person.jpg."""
    server = InputServer({"person.jpg": (SAMPLE / "person_ana.jpg").read_bytes()})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()
