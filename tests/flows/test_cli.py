"""The `tryon` command as a user and a scheduler see it: output, lake, exit status."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from tests.flows.conftest import REPO, SAMPLE_MANIFEST

pytestmark = pytest.mark.e2e
TRYON = [sys.executable, "-m", "flows.cli"]


def tryon(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh process against this session's Prefect server (no second server)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRYON_")}
    env.pop("CHANGECLOTHES_API_KEY", None)
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [*TRYON, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_demo_command_end_to_end(tmp_path: Path) -> None:
    """What `make demo` runs, on a copy of the sample: lake, messages, exit status."""
    shutil.copytree(SAMPLE_MANIFEST.parent, tmp_path / "sample")
    done = tryon("run", "sample/manifest.csv", "--emulator", "--lake", "lake", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # one row is invalid on purpose
    assert "8 succeeded / 0 failed / 1 invalid of 9 rows" in done.stdout
    assert "Results:" in done.stdout and "Metadata:" in done.stdout

    meta = pl.scan_parquet(str(tmp_path / "lake/metadata/**/*.parquet")).collect()
    assert meta.height == 9
    for uri in meta.filter(pl.col("status") == "succeeded")["output_uri"]:
        with Image.open(tmp_path / uri if not Path(uri).is_absolute() else uri) as image:
            image.load()
    assert meta.filter(pl.col("status") == "invalid")["row_id"].to_list() == ["ana-shoes"]

    # The run's contact sheet opens and shows every row of the manifest.
    (run_dir,) = (tmp_path / "lake" / "runs").iterdir()
    assert (run_dir / "_COMMITTED").is_file()
    html = (run_dir / "contact_sheet.html").read_text()
    for row_id in pl.read_csv(SAMPLE_MANIFEST)["id"]:
        assert f">{row_id}<" in html or f"{row_id}</" in html, row_id
    assert html.count("data:image/") >= 8 * 2  # at least person and coarse per done row
    with Image.open(run_dir / "contact_sheet.jpg") as sheet:
        sheet.load()
        assert sheet.height > 9 * 100  # a band per row

    allowed = tryon(
        "run",
        "sample/manifest.csv",
        "--emulator",
        "--lake",
        "lake2",
        "--allow-row-errors",
        cwd=tmp_path,
    )
    assert allowed.returncode == 0, allowed.stderr


def test_run_that_cannot_start_exits_2(tmp_path: Path) -> None:
    done = tryon("run", "missing.csv", "--emulator", "--lake", "lake", cwd=tmp_path)
    assert done.returncode == 2
    assert "missing.csv" in done.stderr


def test_unknown_provider_exits_2(tmp_path: Path) -> None:
    done = tryon("run", str(SAMPLE_MANIFEST), "--provider", "nope", "--lake", "l", cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown provider 'nope'" in done.stderr


def test_route_fallback_and_compare_options_are_checked_before_anything_starts(
    tmp_path: Path,
) -> None:
    for args, said in [
        (["--route", "dresses"], "--route 'dresses': expected CATEGORY=PROVIDER"),
        (["--route", "dress=hidream"], "unknown category 'dress'"),
        (["--fallback", "nope"], "unknown provider 'nope'"),
        (["--compare", "nope"], "unknown provider 'nope'"),
    ]:
        done = tryon("run", str(SAMPLE_MANIFEST), *args, "--lake", "lake", cwd=tmp_path)
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "lake").exists()


def test_validate_shows_where_rows_go_with_the_run_options(tmp_path: Path) -> None:
    done = tryon(
        "validate",
        str(SAMPLE_MANIFEST),
        "--provider",
        "changeclothes",
        "--route",
        "dresses=hidream",
        "--fallback",
        "tencent",
        "--compare",
        "ailab",
        cwd=tmp_path,
    )
    assert done.returncode == 1  # the sample's shoes row
    assert "by provider: changeclothes 7, hidream 1" in done.stdout
    # AILab takes no prompt row: it is compared on the 7 others, and skips that one.
    assert "compared with: ailab 8 rows" in done.stdout
    assert "falling back to: tencent" in done.stdout
    alone = tryon("validate", str(SAMPLE_MANIFEST), "--route", "dresses=hidream", cwd=tmp_path)
    assert alone.returncode == 2 and "need --provider" in alone.stderr


def test_validate_reports_each_bad_row(tmp_path: Path) -> None:
    done = tryon("validate", str(SAMPLE_MANIFEST), cwd=tmp_path)
    assert done.returncode == 1
    assert "ana-shoes" in done.stdout and "unknown category 'shoes'" in done.stdout

    good = tmp_path / "good.csv"
    pl.read_csv(SAMPLE_MANIFEST).filter(pl.col("id") != "ana-shoes").write_csv(good)
    # Relative image paths resolve against the manifest's folder, so copy the images too.
    shutil.copytree(SAMPLE_MANIFEST.parent / "images", tmp_path / "images")
    assert tryon("validate", str(good), cwd=tmp_path).returncode == 0

    bad = tmp_path / "bad.csv"
    bad.write_text("name,photo\nx,y\n")
    unusable = tryon("validate", str(bad), cwd=tmp_path)
    assert unusable.returncode == 2
    assert "person_image" in unusable.stderr


def test_validate_prints_each_row_once_numbered_from_1_and_never_wrapped(tmp_path: Path) -> None:
    """Off a terminal (CI logs, pipes): one line per invalid row, whole, however long; the
    first row under the header is row 1; the count line says "1 invalid" of one row."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    shutil.copytree(SAMPLE_MANIFEST.parent / "images", deep / "images")
    manifest = deep / "m.csv"
    manifest.write_text(
        "id,person_image,garment_image,category\n"
        "ok,images/person_ana.jpg,images/garment_red_tee.jpg,upper_body\n"
        "gone,images/nobody-with-a-rather-long-file-name.jpg,images/garment_red_tee.jpg,dresses\n"
    )
    done = tryon("validate", str(manifest), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    missing = deep / "images" / "nobody-with-a-rather-long-file-name.jpg"
    line = f"row 2 (id 'gone'): no such file in column 'person_image': {missing}"
    assert len(line) > 200
    assert done.stdout.splitlines() == [
        line,
        "2 rows: 1 valid, 1 invalid",
        "provider capabilities not checked: pass --provider (and --refine) as to run",
    ]

    one = tryon("validate", str(manifest), "--provider", "hidream", cwd=tmp_path)
    assert one.stdout.splitlines()[:2] == [line, "2 rows: 1 valid, 1 invalid"]
    bad_option = tryon("validate", str(manifest), "--refine", cwd=tmp_path)
    assert bad_option.returncode == 2 and "--refine needs --provider" in bad_option.stderr
    unknown = tryon("validate", str(manifest), "--provider", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown provider 'nope'" in unknown.stderr


def test_validate_draws_a_table_on_a_terminal() -> None:
    import io

    from rich.console import Console
    from rich.text import Text

    from flows import cli
    from schemas.manifest import InvalidRow
    from schemas.manifest_rows import InvalidRows

    terminal = Console(file=io.StringIO(), force_terminal=True, width=100, soft_wrap=True)
    original, cli.out = cli.out, terminal
    try:
        cli._print_invalid_rows(InvalidRows.of([InvalidRow(8, "ana-shoes", ["[red]shoes"])]))
    finally:
        cli.out = original
    text = Text.from_ansi(terminal.file.getvalue()).plain
    assert "1 invalid row" in text and "1 invalid rows" not in text
    assert "│   9 │ ana-shoes │ [red]shoes" in text  # row 9: row_index 8; the text as written


def test_prefect_console_logs_go_through_the_progress_console() -> None:
    """With a live bar, Prefect's console handlers print through the bar's Console."""
    import io
    import logging
    from contextlib import ExitStack

    from prefect.logging.handlers import PrefectConsoleHandler
    from rich.console import Console

    from flows.cli import _route_prefect_console_logs

    logger = logging.getLogger("tests.tryon.console")
    handler = PrefectConsoleHandler(stream=io.StringIO())
    logger.addHandler(handler)
    before = handler.console
    bar_console = Console(file=io.StringIO())
    try:
        with ExitStack() as stack:
            _route_prefect_console_logs(stack, bar_console)
            assert handler.console is bar_console
            logger.warning("above the bar")
        assert handler.console is before
        assert "above the bar" in bar_console.file.getvalue()
    finally:
        logger.removeHandler(handler)


def test_emulator_command_serves_with_injected_faults(tmp_path: Path) -> None:
    """`tryon emulator --fault ...` as an operator runs it: faults reach the wire."""
    import socket
    import time

    import httpx

    from emulator.control import EmulatorControl
    from emulator.keys import DEFAULT_KEYS

    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "CHANGECLOTHES_API_KEY"}
    env["PYTHONPATH"] = str(REPO)
    server = subprocess.Popen(
        [
            *TRYON,
            "emulator",
            "--port",
            str(port),
            "--fault",
            "changeclothes.forced_codes=[10005]",
            "--fault",
            "hidream.credits=0",
            "--fault",
            "all.bad_outputs=blank,tiny",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    control = EmulatorControl(base, timeout_s=1)
    try:
        for _ in range(100):
            try:
                stats = control.stats()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("emulator did not start")
        assert stats.requests == {}
        key = {"Authorization": f"Bearer {DEFAULT_KEYS['CHANGECLOTHES_API_KEY']}"}
        answer = httpx.post(
            f"{base}/api/openapi/change-clothes-ai",
            headers=key,
            files={"category": (None, "upper_body")},
        ).json()
        assert answer["code"] == 10005  # the forced code, before any other check
        plans = control.faults()
        assert plans["hidream"].credits == 0
        from emulator.app import PROVIDER_ROUTES

        assert set(plans) == set(PROVIDER_ROUTES)  # "all." reaches the plugins' routes too
        assert all(plan.bad_outputs == ["blank", "tiny"] for plan in plans.values())
    finally:
        control.close()
        server.terminate()
        server.wait(timeout=10)

    bad = tryon("emulator", "--fault", "nope.latency_s=1", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown provider 'nope'" in bad.stderr
