"""A run that cannot start says so at once, in one line, and leaves nothing behind.

``tryon run`` checks the manifest, the providers, their credentials and the lake before any
Prefect server or flow run (``flows/preflight.py``). The CLI cases run the command in a fresh
process whose ``PREFECT_API_URL`` names a port nothing listens on: were a server or a flow run
needed to find the problem, the command could not answer with its one line. The process also
reports whether it imported Prefect at all.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from emulator.server import EmulatorServer
from flows.batch import BatchParams, RunNotStarted, tryon_batch
from flows.preflight import check_run, check_secret_blocks
from providers.registry import PROVIDERS, all_specs
from providers.settings import credential
from tests.flows.conftest import REPO, SAMPLE_MANIFEST

KNOWN = ", ".join(sorted(PROVIDERS))  # built-ins and installed plugins (fal: entry points)
# Runs `tryon` as the console script does, then says whether Prefect was imported.
WRAPPER = (
    "import sys\n"
    "from flows.cli import main\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    "    print('prefect imported:', 'prefect' in sys.modules)\n"
)
CREDENTIALS = {env for spec in all_specs() for env in spec.credential_env}


@pytest.fixture(scope="module")
def dead_api() -> Iterator[str]:
    """A Prefect API URL on a loopback port that is bound but never listens: refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/api"


def tryon(
    *args: str, cwd: Path, api: str | None, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``api`` None: no Prefect API configured (the local server's case), in Prefect ``home``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRYON_", "PREFECT_")) and k not in CREDENTIALS
    }
    env |= {"PYTHONPATH": str(REPO), "COLUMNS": "80"}
    env |= {"PREFECT_API_URL": api} if api is not None else {}
    env |= {"PREFECT_HOME": str(home)} if home is not None else {}
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def refused(done: subprocess.CompletedProcess[str], *, prefect: bool = False) -> str:
    """The one stderr line of a run that could not start (exit status 2)."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cannot start: "), lines
    assert "Traceback" not in done.stderr
    assert f"prefect imported: {prefect}" in done.stdout
    return lines[0]


def rows_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    pl.DataFrame(rows).write_csv(path)
    return path


def good_rows(n: int = 2, **extra: str) -> list[dict[str, str]]:
    images = SAMPLE_MANIFEST.parent / "images"
    return [
        {
            "id": f"r{i}",
            "person_image": str(images / "person_ana.jpg"),
            "garment_image": str(images / "garment_red_tee.jpg"),
            "category": "upper_body",
            **extra,
        }
        for i in range(n)
    ]


# -------------------------------------------------------------------------- the CLI, at once


def _manifest_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after `run`, the start of the message after 'cannot start: ')."""
    (tmp_path / "binary.csv").write_bytes(b"id,person_image\n\xff\xfe\x00garbage")
    (tmp_path / "columns.csv").write_text("name,photo\nx,y\n")
    (tmp_path / "folder.csv").mkdir()
    unknown = rows_csv(tmp_path / "unknown.csv", good_rows(3))
    return {
        "missing": (["missing.csv"], "manifest not found: missing.csv: check the path"),
        "unparsable": (["binary.csv"], "manifest binary.csv is neither Parquet nor UTF-8 CSV"),
        "no-columns": (["columns.csv"], "missing required column(s) 'id', 'person_image'"),
        "unreadable": (["folder.csv"], "manifest folder.csv is a directory, not a file"),
        "provider": (
            [str(unknown), "--provider", "nope"],
            f"unknown provider 'nope' (known: {KNOWN})",
        ),
    }


@pytest.mark.parametrize("case", ["missing", "unparsable", "no-columns", "unreadable", "provider"])
def test_a_bad_manifest_or_provider_is_one_line_before_prefect(
    tmp_path: Path, dead_api: str, case: str
) -> None:
    args, expected = _manifest_cases(tmp_path)[case]
    before = tree(tmp_path)
    line = refused(tryon("run", *args, "--lake", "lake", cwd=tmp_path, api=dead_api))
    assert expected in line, line
    if case == "provider":
        assert line == f"cannot start: {expected}"
    assert tree(tmp_path) == before  # no lake, nothing else


def test_a_lake_that_is_a_file_is_one_line_and_stays_as_it_was(
    tmp_path: Path, dead_api: str
) -> None:
    (tmp_path / "lake").write_text("a file")
    before = tree(tmp_path)
    for lake, message in (
        ("lake", "the lake {} is a file, not a folder: give a folder (--lake)"),
        ("lake/sub", "the lake {} cannot be created: "),
    ):
        done = tryon("run", str(SAMPLE_MANIFEST), "--lake", lake, "--emulator",
                     cwd=tmp_path, api=dead_api)  # fmt: skip
        line = refused(done)
        assert message.format(tmp_path / lake) in line, line
    assert tree(tmp_path) == before


def test_a_read_only_lake_is_one_line_and_stays_empty(
    tmp_path: Path, read_only_dir: Path, dead_api: str
) -> None:
    for lake in (read_only_dir, read_only_dir / "lake"):
        done = tryon("run", str(SAMPLE_MANIFEST), "--lake", str(lake), "--emulator",
                     cwd=tmp_path, api=dead_api)  # fmt: skip
        line = refused(done)
        assert f"the lake {lake} is not writable: permission denied" in line, line
        assert "--lake" in line  # and what to do about it
    assert list(read_only_dir.iterdir()) == []


def test_a_missing_key_is_one_line_naming_every_way_to_give_it(
    tmp_path: Path, dead_api: str
) -> None:
    """Not in the environment: only a Prefect API could say whether a Secret block holds it.
    With none answering, the command still answers at once, in one line."""
    before = tree(tmp_path)
    done = tryon("run", str(SAMPLE_MANIFEST), "--lake", "lake", cwd=tmp_path, api=dead_api)
    line = refused(done, prefect=True)
    assert line.startswith(
        "cannot start: CHANGECLOTHES_API_KEY is not set (needed by changeclothes): export it, "
        "save it as the Prefect Secret block 'changeclothes-api-key', or add --emulator to use "
        "the local emulator"
    ), line
    assert f"the Prefect API {dead_api} did not answer" in line
    assert tree(tmp_path) == before


def test_a_missing_key_in_a_new_prefect_home_is_one_line_without_starting_a_server(
    tmp_path: Path,
) -> None:
    """No API configured and no local database yet: no Secret block can exist, so the command
    says so at once instead of starting the local server to ask it."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    done = tryon("run", str(SAMPLE_MANIFEST), "--lake", "lake", cwd=tmp_path, api=None, home=home)
    line = refused(done, prefect=True)
    assert line == (
        "cannot start: CHANGECLOTHES_API_KEY is not set (needed by changeclothes): export it, "
        "save it as the Prefect Secret block 'changeclothes-api-key', or add --emulator to use "
        "the local emulator"
    ), line
    assert list(home.iterdir()) == []  # no server, no database, no state file
    assert not (tmp_path / "lake").exists()


def test_a_missing_key_with_the_local_server_stopped_is_read_from_its_database(
    tmp_path: Path,
) -> None:
    """The local server ran once, stored another Secret block, and was stopped: the command
    reads the database's Secret block names (read-only) and answers without a server start."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRYON_", "PREFECT_"))}
    env |= {"PYTHONPATH": str(REPO), "PREFECT_HOME": str(home)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "flows.cli", *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    started = cli("server", "start", "--port", str(_free_port()))
    try:
        assert started.returncode == 0, started.stderr
        url = next(w for w in started.stdout.split() if w.startswith("http://"))
        save = "from prefect.blocks.system import Secret; Secret(value='x').save('hidream-api-key')"
        saved = subprocess.run(
            [sys.executable, "-c", save],
            env={**env, "PREFECT_API_URL": f"{url}/api"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert saved.returncode == 0, saved.stderr
    finally:
        assert cli("server", "stop").returncode == 0
    kept = sorted(p.name for p in home.iterdir())

    done = tryon("run", str(SAMPLE_MANIFEST), "--lake", "lake", cwd=tmp_path, api=None, home=home)
    line = refused(done, prefect=True)
    assert line.startswith("cannot start: CHANGECLOTHES_API_KEY is not set"), line
    assert cli("server", "status").returncode == 1  # no server was started to ask
    assert sorted(p.name for p in home.iterdir()) == kept

    # And the look-up itself, in this home: absent, and present (the server must read it).
    look = (
        "from flows.local_server import secret_blocks_absent as absent; "
        "print(absent(['changeclothes-api-key']), absent(['hidream-api-key']))"
    )
    found = subprocess.run(
        [sys.executable, "-c", look], env=env, capture_output=True, text=True, timeout=120
    )
    assert found.stdout.split() == ["True", "False"], found.stdout + found.stderr


def test_version(tmp_path: Path, dead_api: str) -> None:
    done = tryon("--version", cwd=tmp_path, api=dead_api)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tryon-flows 0.1.0 (prefect 3.")
    assert "prefect imported: False" in done.stdout


# ------------------------------------------------------------- the checks, and the flow's own


def test_the_run_names_the_credentials_of_every_account_it_will_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHANGECLOTHES_API_KEY", "k")
    rows = good_rows(2)
    rows[1]["provider"] = "tencent"  # with the staging base a Tencent run needs
    monkeypatch.setenv("TRYON_STAGING_BASE_URL", "https://cdn.example.com/in/")
    manifest = str(rows_csv(tmp_path / "m.csv", [{**r, "gender": "woman"} for r in rows]))
    params = BatchParams(manifest=manifest, lake=str(tmp_path / "lake"), refine=True)

    checks = check_run(params)
    assert checks.providers == ("changeclothes", "tencent", "ailab_refiner")
    assert checks.missing_credentials == (
        "TENCENTCLOUD_SECRET_ID",
        "TENCENTCLOUD_SECRET_KEY",
        "AILAB_API_KEY",
    )
    assert checks.needed_by["AILAB_API_KEY"] == "the refiner (--refine)"
    assert check_run(params, emulator=True).missing_credentials == ()  # it brings its keys
    assert not (tmp_path / "lake").exists()

    monkeypatch.setenv("CHANGECLOTHES_API_KEY", "k\nx")  # pasted with a newline inside
    with pytest.raises(RunNotStarted, match="CHANGECLOTHES_API_KEY contains a control"):
        check_run(params)
    monkeypatch.setenv("CHANGECLOTHES_API_KEY", "k")
    monkeypatch.setenv("TRYON_TENCENT_TIMEOUT_S", "soon")
    with pytest.raises(RunNotStarted, match="TRYON_TENCENT_TIMEOUT_S='soon'"):
        check_run(params)


async def test_secret_blocks_fill_what_the_environment_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret

    monkeypatch.setenv("CHANGECLOTHES_API_KEY", "k")
    monkeypatch.delenv("AILAB_API_KEY", raising=False)
    manifest = str(rows_csv(tmp_path / "m.csv", good_rows(1, gender="man")))
    checks = check_run(BatchParams(manifest=manifest, lake=str(tmp_path / "l"), refine=True))
    assert checks.missing_credentials == ("AILAB_API_KEY",)

    with pytest.raises(RunNotStarted) as caught:
        await check_secret_blocks(checks)
    assert str(caught.value) == (
        "AILAB_API_KEY is not set (needed by the refiner (--refine)): export it where the flow "
        "runs, or save it as the Prefect Secret block 'ailab-api-key'"
    )
    await Secret(value="from-a-block").save("ailab-api-key", overwrite=True)
    try:
        await check_secret_blocks(checks, cli=True)  # one read, and the key is there
    finally:
        await Secret.adelete("ailab-api-key")
    supplied = credential("AILAB_API_KEY")
    assert supplied is not None and supplied.get_secret_value() == "from-a-block"


@pytest.mark.parametrize("problem", ["missing-key", "manifest", "lake"])
async def test_the_flow_writes_nothing_before_its_checks_pass(
    use_emulator: EmulatorServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    problem: str,
) -> None:
    """For runs that do not come through the CLI (deployments, Python): no started.json, no
    ledger entry, no invalid rows in the lake when the run cannot start."""
    rows = good_rows(2)
    rows.append({**rows[0], "id": "bad", "category": "shoes"})  # an invalid row, to record
    manifest = tmp_path / "m.csv"
    lake = tmp_path / "lake"
    if problem == "missing-key":
        monkeypatch.delenv("CHANGECLOTHES_API_KEY")
    elif problem == "manifest":
        manifest = tmp_path / "nope.csv"
    else:
        lake.write_text("a file")
    if problem != "manifest":
        rows_csv(manifest, [{"provider": "", **row} for row in rows])
    before = tree(tmp_path)
    with pytest.raises(RunNotStarted):
        await tryon_batch(BatchParams(manifest=str(manifest), lake=str(lake)))
    assert tree(tmp_path) == before
    assert use_emulator.control.posts() == 0
