"""Nothing is ever written outside the lake root, whatever a row id, a run id or a provider's
file name says.

Unit tests call ``Lake`` with hostile components and raw paths (each fails if the guard in
``tasks/lake.py`` is removed); an end-to-end run with hostile row ids against an emulator that
hands out hostile result file names then checks every file the run created is in the lake.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from emulator.server import EmulatorConfig, EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, tryon_batch
from flows.cli import emulator_env
from tasks.lake import Lake, LakePathError

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "sample" / "images"
DIGEST = "ab" * 32

# Components that must never reach the filesystem, whatever their source.
HOSTILE_PARTS = [
    "..",
    "../escape",
    "../../escape",
    "a/../../escape",
    "a/../b",  # stays inside, but ".." is refused outright: no path depends on normalising
    "/tmp/abs",
    "/etc/passwd",
    "a\\..\\..\\escape",
    "..\\escape",
    "a\x00b",
    "escape\x00/../../x",
    "a\nb",
    "",
    ".",
    "a//b",
    "a/",
]


def walk(root: Path) -> set[Path]:
    """Every file and directory under ``root`` (symlinks not followed)."""
    found: set[Path] = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(Path(folder) / name)
    return found


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake.open(str(tmp_path / "deep" / "down" / "lake"))


# -- Lake.path and the write methods ---------------------------------------------------------


@pytest.mark.parametrize("part", HOSTILE_PARTS)
def test_path_refuses_hostile_components(lake: Lake, part: str) -> None:
    for parts in ((part,), ("runs", part), ("runs", "r1", part), (part, "x.json")):
        with pytest.raises(LakePathError):
            lake.path(*parts)


@pytest.mark.parametrize("part", [None, 7, b"runs"])
def test_path_refuses_components_that_are_not_text(lake: Lake, part: object) -> None:
    with pytest.raises(LakePathError):
        lake.path("runs", part)  # type: ignore[arg-type]


def test_path_accepts_nested_safe_components(lake: Lake) -> None:
    assert lake.path("work", "ab", "k.json") == f"{lake.root}/work/ab/k.json"
    assert (
        lake.path("metadata/run_id=r1", "p.parquet") == f"{lake.root}/metadata/run_id=r1/p.parquet"
    )


@pytest.mark.parametrize("run_id", ["..", "../../escape", "/tmp/abs", "a/b", "", "x\x00", "a\\b"])
def test_run_ids_that_would_leave_the_root_are_refused(lake: Lake, run_id: str) -> None:
    with pytest.raises(LakePathError):
        lake.run_path(run_id, "summary.json")
    with pytest.raises(LakePathError):
        lake.write_metadata(run_id, "part-0", [])
    with pytest.raises(LakePathError):
        lake.commit_run(run_id, {})


@pytest.mark.parametrize(
    ("digest", "extension"),
    [("../" + "a" * 61, "png"), (DIGEST, "png/../../x"), (DIGEST, "png\x00"), (DIGEST, "")],
)
def test_output_path_takes_only_a_digest_and_a_plain_extension(
    lake: Lake, digest: str, extension: str
) -> None:
    with pytest.raises(LakePathError):
        lake.output_path(digest, extension)


def raw_paths(lake: Lake, tmp_path: Path) -> list[str]:
    """Paths as a caller might build them by hand, bypassing ``Lake.path``."""
    root = lake.root
    return [
        f"{root}/../escape.json",
        f"{root}/runs/../../escape.json",
        f"{root}/outputs/./../../../escape.json",
        f"{root}//../escape.json",
        str(tmp_path / "escape.json"),
        "/tmp/abs-" + uuid.uuid4().hex,
        f"{root}-sibling/escape.json",  # shares the root's prefix as a string, not as a folder
        root,  # the root itself is a folder, never a file
        f"{root}/",
        f"{root}/outputs/a\x00b",
        f"{root}/outputs\\..\\..\\escape.json",
        "escape.json",  # relative: would land in the working directory
    ]


def test_write_methods_refuse_raw_paths_outside_the_root(lake: Lake, tmp_path: Path) -> None:
    Path(lake.root).mkdir(parents=True)
    before = walk(tmp_path)
    for path in raw_paths(lake, tmp_path):
        with pytest.raises(LakePathError):
            lake.write_bytes(path, b"must not be written")
        with pytest.raises(LakePathError):
            lake.write_json(path, {"must": "not be written"})
        with pytest.raises(LakePathError):
            lake.check_inside(path)
    assert walk(tmp_path) == before
    assert not Path("escape.json").exists()


def test_remove_and_read_refuse_paths_outside_the_root(lake: Lake, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside = f"{lake.root}/outputs/../../../../victim.txt"
    assert Path(os.path.normpath(outside)) == victim
    with pytest.raises(LakePathError):
        lake.remove_if_exists(outside)
    with pytest.raises(LakePathError):
        lake.remove_if_exists(str(victim))
    with pytest.raises(LakePathError):
        lake.read_uri(outside)  # a tampered output_uri in the metadata must not read it
    assert victim.read_text() == "keep me"


def test_writes_inside_the_root_still_work(lake: Lake) -> None:
    uri = lake.write_bytes(lake.output_path(DIGEST, "png"), b"png bytes")
    assert Path(uri).read_bytes() == b"png bytes"
    assert lake.read_uri(uri) == b"png bytes"
    lake.write_json(lake.path("runs", "r1", "summary.json"), {"ok": True})
    assert lake.commit_run("r1", {}).endswith("runs/r1/_COMMITTED")


def test_a_relative_lake_with_dot_dot_is_normalised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--lake ../lake`` is common; its root must compare equal to the joined paths."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    lake = Lake.open("../lake/./")
    assert lake.root == str(tmp_path / "lake")
    lake.write_json(lake.path("runs", "r1", "summary.json"), {"ok": True})
    assert (tmp_path / "lake" / "runs" / "r1" / "summary.json").exists()
    with pytest.raises(LakePathError):
        lake.write_bytes(str(tmp_path / "work" / "x.json"), b"")


def test_memory_lake_is_guarded_too() -> None:
    import fsspec

    root = f"memory://guard-{uuid.uuid4().hex}/lake"
    lake = Lake.open(root)
    fs = fsspec.filesystem("memory")
    try:
        for path in (f"{lake.root}/../escape.json", f"{lake.root}-x/escape.json", "/escape"):
            with pytest.raises(LakePathError):
                lake.write_bytes(path, b"no")
        with pytest.raises(LakePathError):
            lake.path("..", "escape.json")
        assert not [p for p in fs.find("/") if "escape" in p]
        lake.write_bytes(lake.path("runs", "r", "x.json"), b"{}")
        assert fs.cat_file(f"{lake.root}/runs/r/x.json") == b"{}"
    finally:
        fs.rm(lake.root.rsplit("/", 1)[0], recursive=True)


async def test_work_ledger_paths_stay_under_the_root(lake: Lake) -> None:
    from tasks.ledger import WorkLedger

    ledger = WorkLedger(lake, "run-1")
    for key in ("../../escape", "/tmp/abs", "ab/../../x", "a\x00b", "../" + "a" * 61):
        with pytest.raises(ValueError):  # a work key is a sha256 digest, nothing else
            ledger._path("work", key)
    assert ledger._path("work", DIGEST) == f"{lake.root}/work/ab/{DIGEST}.json"


# -- end to end: hostile ids and hostile provider file names ----------------------------------

HOSTILE_IDS = [
    "../../escape",
    "../escape-up",
    "/tmp/abs-tryon-" + uuid.uuid4().hex[:8],
    "a/b",
    "..",
    ".hidden",
    "x\\..\\..\\escape-bs",
    "%2e%2e%2fescape-enc",
    "nul\x00byte",
    "x" * 300,
]


@pytest.fixture(scope="module")
def hostile_emulator() -> Iterator[EmulatorServer]:
    """Result and mask URLs are ``/files/..%2F..%2F..%2Fescape-<token>.webp``."""
    config = EmulatorConfig(result_name_prefix="..%2F..%2F..%2Fescape-")
    with EmulatorServer.start(config) as server:
        yield server


@pytest.mark.e2e
async def test_a_run_with_hostile_ids_and_file_names_writes_only_under_the_lake(
    prefect_server: None,
    hostile_emulator: EmulatorServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in emulator_env(hostile_emulator.base_url).items():
        monkeypatch.setenv(name, value)

    work = tmp_path / "work"  # the manifest's folder: the lake is beside it, deeper
    work.mkdir()
    lake_dir = tmp_path / "nested" / "deeper" / "lake"
    person, garment = IMAGES / "person_ana.jpg", IMAGES / "garment_red_tee.jpg"
    rows = [
        {
            "id": row_id,
            "person_image": str(person),
            "garment_image": str(garment),
            "category": "upper_body",
            "garment_description": f"look {i}",
        }
        for i, row_id in enumerate(["good-1", *HOSTILE_IDS, "good-2"])
    ]
    manifest = work / "manifest.csv"
    pl.DataFrame(rows).write_csv(manifest)

    watched = tmp_path.parent  # this session's temp base: every test's folder
    before = walk(watched)
    tmp_before = set(os.listdir("/tmp"))
    try:
        summary = await tryon_batch(BatchParams(manifest=str(manifest), lake=str(lake_dir)))
    except BatchIncomplete as exc:  # hostile rows are invalid: allowed to end "incomplete"
        summary = exc.summary
    created = walk(watched) - before

    # The good rows went through the hostile file names; the hostile ids were refused.
    assert summary.counts == {"succeeded": 2, "invalid": len(HOSTILE_IDS)}
    meta = pl.scan_parquet(f"{lake_dir}/metadata/**/*.parquet").collect()
    invalid = meta.filter(pl.col("status") == "invalid")
    assert sorted(invalid["row_id"].to_list()) == sorted(HOSTILE_IDS)
    for message in invalid["error_message"]:
        assert "unsafe for a path" in message
    for row in meta.filter(pl.col("status") == "succeeded").iter_rows(named=True):
        for uri in (row["output_uri"], row["mask_uri"]):
            assert uri and Path(uri).parent == lake_dir / "outputs"
            assert "escape" not in uri

    # The results really came through the hostile names (route of names holding "/").
    requests = hostile_emulator.control.stats().requests
    assert requests.get("GET /files/{token:path}.webp") == 4  # 2 results, 2 masks

    # Everything the run created is under the lake root (the manifest folder got nothing).
    assert created, "the run wrote nothing?"
    outside = {p for p in created if not p.is_relative_to(lake_dir)}
    assert outside <= {lake_dir.parent.parent, lake_dir.parent}  # the folders leading to it
    assert all(p.is_dir() for p in outside)
    assert not [p for p in created if "escape" in p.name or "abs-tryon" in p.name]
    assert not list(work.iterdir())[1:]  # only the manifest
    new_in_tmp = set(os.listdir("/tmp")) - tmp_before
    assert not [name for name in new_in_tmp if "escape" in name or "abs-tryon" in name]
