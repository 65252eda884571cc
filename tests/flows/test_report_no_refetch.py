"""The run's contact sheet fetches no input again, through the whole flow.

Inputs are served by a real HTTP server on 127.0.0.1 that counts requests (loopback opened for
the run with ``fetch_allow``): one input hangs, one answers 500, one streams without end. The
run tries each once (``max_attempts=1``) within its short ``fetch_timeout_s``; the report at
the end must add no request, no wait and no download, and show those inputs as placeholders.
A rerun then notes the row done by the first run, reading none of its images.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from emulator.server import EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, tryon_batch
from tests.input_server import SAMPLE, InputServer
from tests.tasks.test_report import parse_html

pytestmark = pytest.mark.e2e

FETCH_TIMEOUT_S = 0.5


def sheet_cells(lake: Path, run_id: str) -> dict[str, list[str]]:
    """Per row id, the person, garment and coarse cells' placeholder text ('' for an image)."""
    page = (lake / "runs" / run_id / "contact_sheet.html").read_text(encoding="utf-8")
    return {cells[1]: cells[2:5] for cells in parse_html(page).rows}


async def test_the_report_fetches_no_input_the_run_could_not(
    use_emulator: EmulatorServer, input_server: InputServer, tmp_path: Path
) -> None:
    garment = str(SAMPLE / "garment_red_tee.jpg")
    people = {
        "held": input_server.url("/img/person.jpg"),
        "hangs": input_server.url("/hang"),
        "errors": input_server.url("/status/500"),
        "endless": input_server.url("/endless"),
    }
    manifest = tmp_path / "manifest.csv"
    pl.DataFrame(
        [
            {"id": row_id, "person_image": uri, "garment_image": garment, "category": "upper_body"}
            for row_id, uri in people.items()
        ]
    ).write_csv(manifest)
    lake = tmp_path / "lake"
    params = BatchParams(
        manifest=str(manifest),
        lake=str(lake),
        max_attempts=1,
        fetch_allow=["127.0.0.1"],
        fetch_timeout_s=FETCH_TIMEOUT_S,
    )

    with pytest.raises(BatchIncomplete) as first:
        await tryon_batch(params)

    # One request per input: the run's own attempt. The report added none.
    once = {"/img/person.jpg": 1, "/hang": 1, "/status/500": 1, "/endless": 1}
    assert input_server.requests() == once
    cells = sheet_cells(lake, first.value.summary.run_id)
    assert cells["held"] == ["", "", ""]
    assert cells["hangs"] == ["input not fetched: FETCH_TIMEOUT", "", "failed: FETCH_TIMEOUT"]
    assert cells["errors"][0] == "input not fetched: FETCH_HTTP_500"
    assert cells["endless"][0] == "input not fetched: FETCH_TOO_LARGE"

    # A rerun fetches its http inputs again itself (their bytes name them: that is the run),
    # decodes none of the done row's, and the report fetches nothing.
    with pytest.raises(BatchIncomplete) as second:
        await tryon_batch(params)
    assert second.value.summary.already_done == 1
    assert second.value.summary.images_prepared == 0  # the failed rows' inputs never decoded
    assert input_server.requests() == {path: 2 for path in once}
    cells = sheet_cells(lake, second.value.summary.run_id)
    # The done row: neither its inputs nor its result (the first run's sheet shows them) read.
    first_id = first.value.summary.run_id[:8]
    assert cells["held"] == ["not read: done by an earlier run"] * 2 + [
        f"done by run {first_id}: see its sheet"
    ]
    assert cells["hangs"][0] == "input not fetched: FETCH_TIMEOUT"
