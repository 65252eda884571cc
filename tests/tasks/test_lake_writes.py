"""Lake writes are whole or absent: a rerun after kill -9 never reads a file cut short."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.lake import Lake


def test_a_write_cut_off_before_it_lands_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = Lake.open(str(tmp_path / "lake"))
    target = lake.path("jobs", "ab", "job.json")
    lake.write_bytes(target, b'{"job_id": "one"}')

    def killed(src: str, dst: str) -> None:  # the process dies between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        lake.write_bytes(target, b'{"job_id": "two", "padding": "' + b"x" * 10_000 + b'"}')
    assert Path(target).read_bytes() == b'{"job_id": "one"}'  # never half of the new one
    monkeypatch.undo()
    lake.write_bytes(target, b'{"job_id": "two"}')
    assert Path(target).read_bytes() == b'{"job_id": "two"}'
    # Only files being written sit in _partial: the finished ones were renamed out of it.
    leftovers = list((tmp_path / "lake" / "_partial").iterdir())
    assert len(leftovers) == 1  # the one "killed" above; nothing reads this folder
    assert not list((tmp_path / "lake" / "jobs").rglob("*.tmp*"))
