"""End-to-end: the tryon_batch flow writing its lake to a real S3 server on loopback.

The S3 server is moto's (tests/s3server.py), the providers are the emulator; the lake is
``s3://<bucket>/e2e-<uuid>``. What a user with a real bucket would run, changing nothing but
the lake URI and its storage options.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import polars as pl
import pytest
import s3fs
from PIL import Image

from emulator.server import EmulatorServer
from flows.batch import BatchParams, RunNotStarted, RunSummary, tryon_batch
from tests.flows.conftest import SAMPLE_MANIFEST
from tests.s3server import S3Server

pytestmark = pytest.mark.e2e

# The sample's prompt row needs a prompt endpoint: only ChangeClothesAI has one.
NOT_TAKEN = {"changeclothes": {"ana-shoes"}, "tencent": {"ana-shoes", "dev-prompt"}}


def lake_uri(s3: S3Server) -> str:
    return s3.uri(f"e2e-{uuid.uuid4().hex[:12]}")


def scan_run(s3: S3Server, summary: RunSummary) -> pl.DataFrame:
    """The run's metadata as a user reads it: polars on the summary's glob."""
    return (
        pl.scan_parquet(summary.metadata_uri, storage_options=s3.polars_storage_options)
        .filter(pl.col("run_id") == summary.run_id)
        .collect()
    )


def check_run_in_s3(
    s3: S3Server, lake: str, summary: RunSummary, provider: str
) -> tuple[s3fs.S3FileSystem, pl.DataFrame]:
    """Everything a finished run leaves in the lake: results, metadata, summary."""
    fs = s3.filesystem()
    manifest = pl.read_csv(SAMPLE_MANIFEST)
    expected = {
        row_id: "invalid" if row_id in NOT_TAKEN[provider] else "succeeded"
        for row_id in manifest["id"]
    }

    assert summary.lake == lake
    assert summary.results_uri == f"{lake}/outputs"
    assert summary.metadata_uri == f"{lake}/metadata/**/*.parquet"
    assert summary.summary_uri == f"{lake}/runs/{summary.run_id}/summary.json"
    # Committed: the marker is there, so the run's metadata is published.
    assert fs.exists(f"{lake}/runs/{summary.run_id}/_COMMITTED")

    # Metadata: one record per manifest row (one stage), read back with polars from S3.
    meta = scan_run(s3, summary)
    assert meta.height == manifest.height
    assert dict(zip(meta["row_id"], meta["status"], strict=True)) == expected
    assert set(meta["stage"]) == {"tryon"}
    assert set(meta.filter(pl.col("status") == "succeeded")["provider"]) == {provider}

    # Results: one image per succeeded row, in S3 under outputs/, named by its content.
    succeeded = meta.filter(pl.col("status") == "succeeded")
    for row in succeeded.iter_rows(named=True):
        uri = row["output_uri"]
        assert posixpath.dirname(uri) == summary.results_uri, uri
        data = fs.cat_file(uri)
        assert hashlib.sha256(data).hexdigest() == row["output_sha256"]
        assert posixpath.basename(uri).startswith(row["output_sha256"] + ".")
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.width > 0 and image.height > 0
        assert row["attempts"] >= 1 and row["request_id"]
    stored = {posixpath.basename(p).split(".")[0] for p in fs.find(summary.results_uri)}
    assert set(succeeded["output_sha256"]) <= stored

    # The run summary, written last, agrees with what the flow returned.
    saved = json.loads(fs.cat_file(summary.summary_uri))
    assert saved["run_id"] == summary.run_id
    invalid = manifest.height - succeeded.height
    assert saved["counts"] == summary.counts == {"succeeded": succeeded.height, "invalid": invalid}
    return fs, meta


def presigned_input_gets(caplog: pytest.LogCaptureFixture) -> set[str]:
    """Digests of staged inputs someone GET from the S3 server by a presigned URL."""
    digests = set()
    for record in caplog.records:
        # werkzeug's access log: '127.0.0.1 - - [date] "GET /bucket/key?query HTTP/1.1" 200 -'
        request = record.getMessage().split('"')
        if len(request) < 3 or not request[1].startswith("GET "):
            continue
        url = urlsplit(request[1].split()[1])
        if "/inputs/" in url.path and "Signature=" in url.query and " 200 " in request[2]:
            digests.add(posixpath.basename(url.path).partition(".")[0])
    return digests


async def test_changeclothes_run_writes_its_lake_to_s3_and_a_rerun_pays_nothing(
    use_emulator: EmulatorServer, s3_server: S3Server
) -> None:
    lake = lake_uri(s3_server)
    params = BatchParams(
        manifest=str(SAMPLE_MANIFEST),
        lake=lake,
        provider="changeclothes",
        storage_options=s3_server.flow_storage_options,
    )
    summary = await tryon_batch(params)
    fs, _ = check_run_in_s3(s3_server, lake, summary, "changeclothes")
    assert use_emulator.control.posts() == summary.provider_calls == 8

    # started.json keeps the parameters but only the names of the storage options.
    started_text = fs.cat_file(f"{lake}/runs/{summary.run_id}/started.json").decode()
    assert s3_server.secret not in started_text
    started = json.loads(started_text)
    assert started["params"]["storage_options"] == sorted(s3_server.flow_storage_options)
    assert started["params"]["lake"] == lake
    # A provider that takes images inline stages nothing.
    assert not fs.exists(f"{lake}/inputs")

    # The same manifest again: the work ledger in S3 says every row is done.
    use_emulator.control.reset()
    again = await tryon_batch(params)
    assert use_emulator.control.posts() == again.provider_calls == 0
    assert again.counts == summary.counts and again.already_done == 8
    assert fs.exists(f"{lake}/runs/{again.run_id}/_COMMITTED")
    every_run = pl.scan_parquet(
        summary.metadata_uri, storage_options=s3_server.polars_storage_options
    ).collect()
    done = every_run.filter(pl.col("status") == "succeeded")
    assert done.height == 8 and done["row_id"].n_unique() == 8  # no row recorded twice


async def test_tencent_inputs_are_staged_to_s3_and_fetched_by_presigned_url(
    use_emulator: EmulatorServer,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("TRYON_STAGING_BASE_URL", raising=False)
    caplog.set_level(logging.INFO, logger="werkzeug")  # the S3 server's request log
    lake = lake_uri(s3_server)
    summary = await tryon_batch(
        BatchParams(
            manifest=str(SAMPLE_MANIFEST),
            lake=lake,
            provider="tencent",
            storage_options=s3_server.flow_storage_options,
        )
    )
    fs, meta = check_run_in_s3(s3_server, lake, summary, "tencent")

    # The emulator could only answer by fetching every input from its presigned S3 URL:
    # they are staged content-addressed, and each one sent is there.
    staged = {}
    for path in fs.find(f"{lake}/inputs"):
        name = posixpath.basename(path)
        digest, _, extension = name.partition(".")
        assert extension in {"jpg", "png", "webp"}
        assert hashlib.sha256(fs.cat_file(path)).hexdigest() == digest
        staged[digest] = path
    succeeded = meta.filter(pl.col("status") == "succeeded")
    sent = set(succeeded["person_sha256"]) | set(succeeded["garment_sha256"])
    assert None not in sent
    assert sent <= set(staged)
    # Each distinct prepared image staged once, no more.
    people = set(succeeded["person_image"])
    garments = set(succeeded["garment_image"])
    assert len(staged) == len(sent) == len(people) + len(garments)

    # And the emulator fetched each of them from S3 itself, by a signed query-string URL.
    assert presigned_input_gets(caplog) == set(staged)


def two_row_manifest(path: Path) -> Path:
    images = SAMPLE_MANIFEST.parent / "images"
    pl.DataFrame(
        [
            {
                "id": "env-1",
                "person_image": str(images / "person_ana.jpg"),
                "garment_image": str(images / "garment_red_tee.jpg"),
                "category": "upper_body",
            },
            {
                "id": "env-2",
                "person_image": str(images / "person_ben.jpg"),
                "garment_image": str(images / "garment_striped_tee.jpg"),
                "category": "upper_body",
            },
        ]
    ).write_csv(path)
    return path


async def test_storage_options_can_come_from_the_aws_environment(
    use_emulator: EmulatorServer,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """No ``storage_options`` parameter: s3fs (botocore) and polars (object_store) both take
    the endpoint and credentials from the standard AWS variables, as on a worker with a role."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    # fsspec caches clients by their options: none made under another environment may serve.
    s3fs.S3FileSystem.clear_instance_cache()
    lake = lake_uri(s3_server)
    try:
        summary = await tryon_batch(
            BatchParams(manifest=str(two_row_manifest(tmp_path / "m.csv")), lake=lake)
        )
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert summary.counts == {"succeeded": 2}

    meta = pl.scan_parquet(summary.metadata_uri).collect()
    assert sorted(meta["row_id"]) == ["env-1", "env-2"]
    assert set(meta["status"]) == {"succeeded"}
    fs = s3_server.filesystem()
    for uri in meta["output_uri"]:
        assert uri.startswith(f"{lake}/outputs/")
        with Image.open(io.BytesIO(fs.cat_file(uri))) as image:
            image.load()
    started = json.loads(fs.cat_file(f"{lake}/runs/{summary.run_id}/started.json"))
    assert started["params"]["storage_options"] == []


async def test_manifest_and_images_in_s3_too(
    use_emulator: EmulatorServer, s3_server: S3Server, tmp_path: Path
) -> None:
    """The storage options serve the manifest and its images as well as the lake; relative
    image paths resolve against the manifest's S3 folder."""
    fs = s3_server.filesystem()
    folder = s3_server.uri(f"inputs-{uuid.uuid4().hex[:12]}")
    images = SAMPLE_MANIFEST.parent / "images"
    rows = []
    for i, (person, garment) in enumerate(
        [("person_chi.png", "garment_green_tee.png"), ("person_dev.jpg", "garment_red_tee.jpg")]
    ):
        for name in (person, garment):
            fs.pipe_file(f"{folder}/images/{name}", (images / name).read_bytes())
        rows.append(
            {
                "id": f"s3-{i}",
                "person_image": f"images/{person}",
                "garment_image": f"images/{garment}",
                "category": "upper_body",
            }
        )
    fs.pipe_file(f"{folder}/manifest.csv", pl.DataFrame(rows).write_csv().encode())

    lake = lake_uri(s3_server)
    summary = await tryon_batch(
        BatchParams(
            manifest=f"{folder}/manifest.csv",
            lake=lake,
            storage_options=s3_server.flow_storage_options,
        )
    )
    assert summary.counts == {"succeeded": 2}
    meta = scan_run(s3_server, summary).sort("row_id")
    assert meta["person_image"].to_list() == [
        f"{folder}/images/person_chi.png",
        f"{folder}/images/person_dev.jpg",
    ]
    assert meta["person_sha256"].null_count() == 0


@pytest.mark.parametrize(
    "with_region",
    [
        pytest.param(True, id="region-option"),
        pytest.param(False, id="region-from-env"),
    ],
)
async def test_a_lake_in_a_missing_bucket_does_not_start(
    use_emulator: EmulatorServer, s3_server: S3Server, tmp_path: Path, with_region: bool
) -> None:
    """A mistyped bucket is an unusable lake: the run must not start, nor create a bucket."""
    options = dict(s3_server.flow_storage_options)
    if not with_region:
        del options["client_kwargs"]  # AWS_DEFAULT_REGION gives it, as on most workers
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RunNotStarted):
        await tryon_batch(
            BatchParams(
                manifest=str(two_row_manifest(tmp_path / "m.csv")),
                lake=f"s3://{bucket}/lake",
                storage_options=options,
            )
        )
    assert not s3_server.filesystem().exists(bucket)


async def test_storage_secrets_are_not_kept_in_prefect_parameters(
    use_emulator: EmulatorServer, s3_server: S3Server, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    summary = await tryon_batch(
        BatchParams(
            manifest=str(two_row_manifest(tmp_path / "m.csv")),
            lake=lake_uri(s3_server),
            storage_options=s3_server.flow_storage_options,
        )
    )
    async with get_client() as client:
        run = await client.read_flow_run(uuid.UUID(summary.run_id))
    stored: Any = run.parameters
    assert s3_server.secret not in json.dumps(stored, default=str)


def test_storage_credentials_are_refused_as_flow_parameters(s3_server: S3Server) -> None:
    for options in (
        s3_server.storage_options,
        {"client_kwargs": {"aws_secret_access_key": s3_server.secret}},
    ):
        with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY") as refused:
            BatchParams(manifest="m.csv", lake="s3://b/l", storage_options=options)
        assert s3_server.secret not in str(refused.value)
