"""What a row costs in S3 requests, first run and rerun, counted on the wire (moto on loopback).

Every HTTP request an S3 client of this process sends (aiobotocore's session: s3fs's and
Polars' own readers aside) is counted by kind (GET, HEAD, PUT, LIST, DELETE) and by the lake
folder it touches. The ledger must cost no request per row: no lookup of a key the run's
listing did not hold (first run), none for work committed runs' metadata holds (rerun), no
delete of a job never recorded. What stays per row on a first run is the row's own output,
its mask and its ledger entry (3 PUTs).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiobotocore.httpsession import AIOHTTPSession

from emulator.server import EmulatorServer
from flows.batch import BatchParams, tryon_batch
from tests.flows.conftest import REPO
from tests.s3server import S3Server

pytestmark = pytest.mark.e2e

ROWS = 48


class Requests:
    """S3 requests sent to one endpoint, by (kind, lake folder)."""

    def __init__(self, endpoint: str, lake_prefix: str) -> None:
        self.endpoint, self.prefix = endpoint, lake_prefix.strip("/")
        self.seen: Counter[tuple[str, str]] = Counter()

    def add(self, method: str, url: str) -> None:
        if not url.startswith(self.endpoint):
            return
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        path = parts.path.lstrip("/").partition("/")[2]  # the key, without the bucket
        if method == "GET" and ("list-type" in query or "prefix" in query):
            kind, path = "LIST", query.get("prefix", [""])[0]
        elif method == "POST" and "delete" in query:
            kind = "DELETE"
        else:
            kind = method
        rest = path.removeprefix(self.prefix).lstrip("/")
        self.seen[(kind, rest.partition("/")[0] or "/")] += 1

    def kinds(self, *folders: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for (kind, folder), n in self.seen.items():
            if not folders or folder in folders:
                out[kind] += n
        return out

    def total(self, *folders: str) -> int:
        return sum(self.kinds(*folders).values())


@pytest.fixture
def s3_requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Requests]]:
    """Counters to append; every request aiobotocore sends is offered to each."""
    counters: list[Requests] = []
    original = AIOHTTPSession.send

    async def send(self, request):  # type: ignore[no-untyped-def]
        for counter in counters:
            counter.add(request.method, request.url)
        return await original(self, request)

    monkeypatch.setattr(AIOHTTPSession, "send", send)
    yield counters


def manifest(path: Path, rows: int) -> Path:
    """``rows`` rows of distinct work over the sample's images (its own description each)."""
    images = REPO / "sample" / "images"
    people = [images / f"person_{n}.jpg" for n in ("ana", "ben", "dev")]
    garments = [images / f"garment_{n}.jpg" for n in ("red_tee", "striped_tee", "chinos")]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "person_image", "garment_image", "category", "garment_description"])
        for i in range(rows):
            writer.writerow(
                [f"row-{i:04d}", people[i % 3], garments[(i // 3) % 3], "upper_body", f"look {i}"]
            )
    return path


async def test_a_row_costs_three_puts_and_a_rerun_no_request_per_row(
    use_emulator: EmulatorServer,
    s3_server: S3Server,
    s3_requests: list[Requests],
    tmp_path: Path,
) -> None:
    lake = s3_server.uri(f"requests-{tmp_path.name}")
    params = BatchParams(
        manifest=str(manifest(tmp_path / "manifest.csv", ROWS)),
        lake=lake,
        provider="changeclothes",
        chunk_size=16,
        storage_options=s3_server.flow_storage_options,
    )
    prefix = lake.removeprefix(f"s3://{s3_server.bucket}")

    first = Requests(s3_server.endpoint_url, prefix)
    s3_requests.append(first)
    summary = await tryon_batch(params)
    s3_requests.remove(first)
    assert summary.counts == {"succeeded": ROWS} and summary.provider_calls == ROWS

    # The ledger: listed once (work/, jobs/), one entry written per row, nothing read or
    # deleted per row (before: a HEAD and a LIST per row for the missing entry, a DELETE
    # per row for a job a synchronous provider never had).
    ledger = first.kinds("work", "jobs")
    assert ledger["PUT"] == ROWS, first.seen
    # (s3fs asks whether an empty prefix is a file: a HEAD each for work/ and jobs/ listed.)
    assert ledger["GET"] + ledger["HEAD"] + ledger["DELETE"] <= 2, first.seen
    assert ledger["LIST"] <= 4, first.seen
    # Outputs: each result and its mask written once, never checked first.
    outputs = first.kinds("outputs")
    assert outputs["PUT"] == 2 * ROWS and outputs["HEAD"] + outputs["GET"] == 0, first.seen
    # Everything else is per run or per chunk (started, parts, commit, the contact sheet).
    assert first.total() <= 3 * ROWS + 60, first.seen

    use_emulator.control.reset()
    again = Requests(s3_server.endpoint_url, prefix)
    s3_requests.append(again)
    rerun = await tryon_batch(params)
    s3_requests.remove(again)
    assert rerun.provider_calls == 0 and rerun.already_done == ROWS
    assert use_emulator.control.posts() == 0

    # The rerun answers every row from the listing and the committed metadata: nothing read,
    # written or deleted per row in the ledger (before: a HEAD and a GET per row).
    ledger = again.kinds("work", "jobs")
    assert ledger["GET"] + ledger["PUT"] + ledger["DELETE"] == 0, again.seen
    assert ledger["HEAD"] <= 1, again.seen  # jobs/ is empty: s3fs asks if it is a file
    assert ledger["LIST"] <= 4, again.seen
    # The committed metadata is read once: a GET per part (a part per chunk).
    assert again.kinds("metadata")["GET"] == ROWS // 16, again.seen
    # Nor is any result read back or written again (earlier runs' sheets show them).
    assert again.total("outputs") == 0, again.seen
    assert again.total() <= 60, again.seen
