"""``Lake.probe_writable``: whether a lake takes files, leaving nothing behind either way."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tasks.lake import Lake, LakeNotUsable
from tests.s3server import S3Server


def tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_a_new_lake_is_probed_and_not_created(tmp_path: Path) -> None:
    Lake.open(str(tmp_path / "a" / "b" / "lake")).probe_writable()
    assert tree(tmp_path) == []  # the folders the probe made are gone with it


def test_an_existing_lake_keeps_exactly_what_it_held(tmp_path: Path) -> None:
    (tmp_path / "lake" / "runs").mkdir(parents=True)
    (tmp_path / "lake" / "runs" / "x.json").write_text("{}")
    before = tree(tmp_path)
    Lake.open(str(tmp_path / "lake")).probe_writable()
    assert tree(tmp_path) == before


def test_a_file_is_no_lake(tmp_path: Path) -> None:
    (tmp_path / "lake").write_text("not a folder")
    with pytest.raises(LakeNotUsable, match="is a file, not a folder") as caught:
        Lake.open(str(tmp_path / "lake")).probe_writable()
    assert caught.value.is_file
    with pytest.raises(LakeNotUsable, match=r"cannot be created: .*lake is a file") as caught:
        Lake.open(str(tmp_path / "lake" / "sub")).probe_writable()
    assert caught.value.is_file
    assert tree(tmp_path) == ["lake"]


def test_a_read_only_folder_is_refused_untouched(read_only_dir: Path) -> None:
    for lake in (read_only_dir, read_only_dir / "lake"):
        with pytest.raises(LakeNotUsable, match="is not writable: permission denied") as caught:
            Lake.open(str(lake)).probe_writable()
        assert not caught.value.is_file
    assert tree(read_only_dir) == []


def test_an_s3_lake_is_probed_without_a_trace(s3_server: S3Server) -> None:
    fs = s3_server.filesystem()
    prefix = f"lake-{uuid.uuid4().hex[:12]}"
    Lake.open(s3_server.uri(prefix), storage_options=s3_server.storage_options).probe_writable()
    fs.invalidate_cache()
    assert fs.glob(f"{s3_server.bucket}/{prefix}/**") == []

    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    missing = Lake.open(f"s3://{bucket}/lake", storage_options=s3_server.storage_options)
    with pytest.raises(LakeNotUsable, match="is not writable"):
        missing.probe_writable()
    assert not fs.exists(bucket)  # a mistyped bucket is never created
