"""A real S3 server on loopback for the lake tests: moto's ``ThreadedMotoServer``.

It is the convention of s3fs's own test suite: a real HTTP server speaking the S3 protocol
(signed requests, multipart uploads, listings, presigned GETs), in this process, on
127.0.0.1 with a free port. Nothing here talks to AWS: the environment is scrubbed of every
AWS setting that could point a client elsewhere (profiles, config files, endpoints, the
instance-metadata service) before the server starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import s3fs
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
# moto accepts any credentials; fixed fake ones make a leak easy to spot in a test.
ACCESS_KEY = "tryon-test-access-key"
SECRET_KEY = "tryon-test-secret-key-not-a-real-one"

# Variables that could send an AWS client to a real account or endpoint, or make it wait on
# the instance-metadata service (169.254.169.254) looking for credentials.
_AWS_VARIABLES_TO_DROP = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_REGION",
)


@dataclass(frozen=True, slots=True)
class S3Server:
    """One running S3 server and a bucket made for the tests."""

    endpoint_url: str  # http://127.0.0.1:<port>
    bucket: str
    key: str = ACCESS_KEY
    secret: str = SECRET_KEY
    region: str = REGION

    @property
    def storage_options(self) -> dict[str, Any]:
        """Options for s3fs (``fsspec.filesystem("s3", **options)``, ``BatchParams``)."""
        return {
            "key": self.key,
            "secret": self.secret,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self.region},
        }

    @property
    def flow_storage_options(self) -> dict[str, Any]:
        """What a flow run takes as its ``storage_options`` parameter: no credentials (those
        are in the environment, see ``isolate_aws_environment``)."""
        return {"endpoint_url": self.endpoint_url, "client_kwargs": {"region_name": self.region}}

    @property
    def polars_storage_options(self) -> dict[str, str]:
        """The same server for polars (object_store's keys, not s3fs's)."""
        return {
            "aws_endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.key,
            "aws_secret_access_key": self.secret,
            "aws_region": self.region,
            # Plain HTTP on loopback (polars 2.1 accepts an explicit http:// endpoint anyway).
            "aws_allow_http": "true",
        }

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *parts])

    def filesystem(self) -> s3fs.S3FileSystem:
        """A fresh s3fs client (not fsspec's cached instance: its listings cache is its own)."""
        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


def isolate_aws_environment(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Leave no way for an AWS client in this process to reach anything but loopback."""
    for name in _AWS_VARIABLES_TO_DROP:
        monkeypatch.delenv(name, raising=False)
    missing = home / "no-such-aws-file"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    # Credentials come from the environment, as on a worker: flow parameters refuse them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    # Presigned URLs point at 127.0.0.1: fetch them directly, even where a proxy is configured
    # (httpx, aiohttp, botocore and polars' object_store all honour these).
    for name in ("NO_PROXY", "no_proxy"):
        current = [h for h in os.environ.get(name, "").split(",") if h.strip()]
        monkeypatch.setenv(name, ",".join([*current, "127.0.0.1", "localhost"]))


@contextmanager
def run_s3_server(bucket: str = "tryon-lake-test") -> Iterator[S3Server]:
    """Start an S3 server on 127.0.0.1 (a free port), create ``bucket``, stop it afterwards."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Server(endpoint_url=f"http://{host}:{port}", bucket=bucket)
        # Made without the region option: s3fs would send LocationConstraint=us-east-1,
        # which S3 (and moto) refuse for that region.
        admin = s3fs.S3FileSystem(
            key=s3.key, secret=s3.secret, endpoint_url=s3.endpoint_url, skip_instance_cache=True
        )
        admin.mkdir(bucket)
        yield s3
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()  # cached clients point at a dead port now
