"""Run outputs people look at: a contact sheet of every row, and tallies for the run report.

Prefect-free. ``records`` reads a run's records back and counts them; ``thumbnails`` makes the
sheet's pictures without fetching anything; ``sheet`` draws the JPEG grid, ``page`` renders
the HTML page; ``contact_sheet`` builds both and writes them beside the run.
"""

from tasks.report.contact_sheet import (
    CONTACT_SHEET_HTML,
    CONTACT_SHEET_JPEG,
    DEFAULT_MAX_LISTED_ROWS,
    ContactSheet,
    ContactSheetUris,
    build_contact_sheet,
    write_contact_sheet,
)
from tasks.report.records import (
    FailureGroup,
    SheetRow,
    SheetTrack,
    StatusCount,
    count_statuses,
    group_failures,
    group_rows,
    read_run_records,
    write_report_records,
)
from tasks.report.sheet import PLACEHOLDER_RGB, SheetLayout
from tasks.report.thumbnails import (
    DEFAULT_MAX_IMAGE_ROWS,
    DEFAULT_THUMB_PX,
    OutputReader,
    ThumbnailBank,
    lake_output_reader,
    make_thumbnail,
)

__all__ = [
    "CONTACT_SHEET_HTML",
    "CONTACT_SHEET_JPEG",
    "DEFAULT_MAX_IMAGE_ROWS",
    "DEFAULT_MAX_LISTED_ROWS",
    "DEFAULT_THUMB_PX",
    "PLACEHOLDER_RGB",
    "ContactSheet",
    "ContactSheetUris",
    "FailureGroup",
    "OutputReader",
    "SheetLayout",
    "SheetRow",
    "SheetTrack",
    "StatusCount",
    "ThumbnailBank",
    "build_contact_sheet",
    "count_statuses",
    "group_failures",
    "group_rows",
    "lake_output_reader",
    "make_thumbnail",
    "read_run_records",
    "write_contact_sheet",
    "write_report_records",
]
