"""tasks.plan: rows go to their provider, or become invalid with every reason, before any call."""

from __future__ import annotations

from typing import Any

from schemas.manifest import InvalidRow, ManifestRow, ValidationReport
from tasks.plan import plan_run


def row(index: int, **fields: Any) -> ManifestRow:
    values: dict[str, Any] = {
        "row_index": index,
        "id": f"r{index}",
        "person_image": "p.jpg",
        "garment_image": "g.jpg",
        "category": "upper_body",
        **fields,
    }
    return ManifestRow(**values)


def report(*rows: ManifestRow, invalid: list[InvalidRow] | None = None) -> ValidationReport:
    bad = invalid or []
    return ValidationReport(
        valid=list(rows), invalid=bad, n_rows=len(rows) + len(bad), columns=["id"]
    )


def test_rows_are_grouped_by_their_provider_in_manifest_order() -> None:
    plan = plan_run(
        report(row(0), row(1, provider="hidream"), row(2), row(3, provider="hidream")),
        default_provider="changeclothes",
    )
    assert {name: [r.id for r in rows] for name, rows in plan.rows_by_provider.items()} == {
        "changeclothes": ["r0", "r2"],
        "hidream": ["r1", "r3"],
    }
    assert plan.invalid == [] and plan.total_rows == 4


def test_rows_a_provider_cannot_take_are_invalid_with_every_reason_in_row_order() -> None:
    earlier = InvalidRow(row_index=1, row_id="r1", reasons=["duplicate id"])
    prompt_row = row(2, garment_image=None, category=None, prompt="a red coat")
    lower = row(0, lower_garment_image="l.jpg")
    plan = plan_run(report(lower, prompt_row, row(3), invalid=[earlier]), default_provider="ailab")
    assert [bad.row_index for bad in plan.invalid] == [0, 1, 2]
    reasons = {bad.row_id: bad.reasons for bad in plan.invalid}
    assert reasons["r0"] == ["provider 'ailab' does not take lower_garment_image"]
    assert reasons["r2"] == ["provider 'ailab' needs garment_image (it has no prompt endpoint)"]
    assert [r.id for r in plan.rows_by_provider["ailab"]] == ["r3"]
    # The same rows are fine where the provider takes them.
    other = plan_run(report(lower), default_provider="hidream")
    assert other.invalid == [] and list(other.rows_by_provider) == ["hidream"]


def test_refining_needs_a_gender_from_the_row_or_the_run() -> None:
    rows = (row(0), row(1, gender="woman"), row(2, category="lower_body"))
    plan = plan_run(report(*rows), default_provider="changeclothes", refine=True)
    # The lower-body row is not refined at all (REFINE_NOT_APPLICABLE later): no gender needed.
    assert [bad.row_id for bad in plan.invalid] == ["r0"]
    assert "refine needs gender" in plan.invalid[0].reasons[0]
    defaulted = plan_run(
        report(*rows), default_provider="changeclothes", refine=True, refine_gender="man"
    )
    assert defaulted.invalid == []
