"""tasks.plan: rows go to their provider, or become invalid with every reason, before any call."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from providers.base import Capabilities
from providers.registry import PROVIDERS, ProviderSpec
from schemas.manifest import InvalidRow, ManifestRow
from schemas.manifest_rows import ValidationReport
from tasks.plan import capability_problems, plan_run


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


def reference_plan(
    report: ValidationReport,
    providers: dict[str, ProviderSpec],
    *,
    default_provider: str,
    refine: bool,
    refine_gender: str | None,
) -> tuple[dict[str, list[int]], list[InvalidRow]]:
    """The plan row by row, ``capability_problems`` on each: what ``plan_run`` does in bulk."""
    invalid, by_provider = list(report.invalid), {}
    for r in report.valid:
        name = r.provider or default_provider
        problems = capability_problems(
            r, providers[name], refine=refine, refine_gender=refine_gender
        )
        if problems:
            invalid.append(InvalidRow(r.row_index, r.id, problems))
        else:
            by_provider.setdefault(name, []).append(r.row_index)
    return by_provider, sorted(invalid, key=lambda bad: bad.row_index)


@pytest.mark.parametrize("refine_gender", [None, "man"])
@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("default_provider", ["wide", "narrow", "prompts"])
def test_the_bulk_plan_gives_every_row_the_reasons_capability_problems_gives(
    default_provider: str, refine: bool, refine_gender: str | None
) -> None:
    base = PROVIDERS["changeclothes"]
    providers = {
        "wide": replace(base, name="wide", capabilities=Capabilities(lower_garment=True)),
        "narrow": replace(
            base,
            name="narrow",
            capabilities=Capabilities(categories=frozenset({"dresses", "upper_body"})),
        ),
        "prompts": replace(
            base,
            name="prompts",
            capabilities=Capabilities(categories=frozenset({"lower_body"}), prompt=True),
        ),
    }
    rng = random.Random(7)
    rows = []
    for i in range(600):
        fields: dict[str, Any] = {"category": rng.choice(["upper_body", "lower_body", "dresses"])}
        if rng.random() < 0.25:
            fields.update(garment_image=None, category=None, prompt="a coat")
        if fields.get("garment_image", "g") is not None and rng.random() < 0.2:
            fields["lower_garment_image"] = "l.jpg"
        fields["gender"] = rng.choice([None, "woman", "man"])
        fields["provider"] = rng.choice([None, None, *providers])
        rows.append(row(i, **fields))
    earlier = [InvalidRow(600, None, ["missing value in column 'id'"])]
    given = ValidationReport(valid=rows, invalid=earlier, n_rows=601, columns=["id"])
    options = {
        "default_provider": default_provider,
        "refine": refine,
        "refine_gender": refine_gender,
    }
    plan = plan_run(given, providers=providers, **options)
    by_provider, invalid = reference_plan(given, providers, **options)
    assert plan.invalid == invalid
    assert {k: [r.row_index for r in v] for k, v in plan.rows_by_provider.items()} == by_provider
    assert list(plan.rows_by_provider) == list(by_provider)  # first appearance order
    assert 50 < len(invalid) < 550  # both outcomes, in numbers


def test_plan_summary_counts_and_lists_rows_as_validate_does() -> None:
    prompt_row = row(1, garment_image=None, category=None, prompt="a red coat")
    plan = plan_run(report(row(0), prompt_row), default_provider="hidream")
    assert plan.summary() == (
        "2 rows: 1 valid, 1 invalid\n"
        "  row 2 (id 'r1'): provider 'hidream' needs garment_image (it has no prompt endpoint)"
    )
    assert plan.summary(max_invalid=0).endswith("  ... and 1 more invalid row")


def test_route_picks_the_provider_by_category_and_the_provider_column_wins() -> None:
    plan = plan_run(
        report(
            row(0, category="dresses"),
            row(1, category="dresses", provider="changeclothes"),
            row(2),
            row(3, category="lower_body"),
        ),
        default_provider="changeclothes",
        route={"dresses": "hidream", "lower_body": "tencent"},
    )
    grouped = {name: [r.id for r in rows] for name, rows in plan.rows_by_provider.items()}
    assert grouped == {"hidream": ["r0"], "changeclothes": ["r1", "r2"], "tencent": ["r3"]}


def test_a_routed_provider_that_cannot_take_the_row_makes_it_invalid() -> None:
    prompt_row = row(0, garment_image=None, category="dresses", prompt="a red dress")
    plan = plan_run(
        report(prompt_row), default_provider="changeclothes", route={"dresses": "ailab"}
    )
    assert plan.runnable_rows == 0
    assert plan.invalid[0].reasons == [
        "provider 'ailab' needs garment_image (it has no prompt endpoint)"
    ]


def test_compare_gives_each_compared_provider_every_valid_row_but_its_own() -> None:
    plan = plan_run(
        report(
            row(0),
            row(1, provider="hidream"),
            row(2, provider="ailab", garment_image=None, category=None, prompt="a coat"),
            row(3),
        ),
        default_provider="changeclothes",
        compare=["hidream", "tencent"],
        fallback=["ailab"],
    )
    # r2 its own provider cannot take: invalid, so compared nowhere.
    assert [r.id for r in plan.compare["hidream"]] == ["r0", "r3"]
    assert [r.id for r in plan.compare["tencent"]] == ["r0", "r1", "r3"]
    assert plan.compared_rows == 5
    assert plan.providers() == ["changeclothes", "hidream", "tencent", "ailab"]
    text = plan.summary()
    assert "compared with: hidream 2 rows, tencent 3 rows" in text
    assert "falling back to: ailab" in text
    assert "by provider: changeclothes 2, hidream 1" in text
