"""The pieces every provider client shares (providers/common.py)."""

from __future__ import annotations

import pytest

from providers.common import as_int


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, 7),
        ("7", 7),
        (" -5 ", -5),
        ("²", None),  # a digit to str.isdigit, not a number to int()
        ("1e3", None),
        ("", None),
        (True, None),
        (3.0, None),
        (None, None),
    ],
)
def test_as_int_reads_only_whole_numbers(value: object, expected: int | None) -> None:
    assert as_int(value) == expected
