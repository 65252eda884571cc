"""Planning a run: which valid rows go to which provider, and which rows no provider can take.

Pure (no IO, no Prefect): a row a provider cannot take as the run is configured becomes an
invalid row with the reason, before anything is paid for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from providers.registry import PROVIDERS, ProviderSpec
from schemas.manifest import InvalidRow, ManifestRow, ValidationReport
from tasks.process import refine_not_applicable


@dataclass(frozen=True, slots=True)
class RunPlan:
    """Valid rows by provider (in manifest order) and every invalid row (sorted by index)."""

    rows_by_provider: dict[str, list[ManifestRow]] = field(default_factory=dict)
    invalid: list[InvalidRow] = field(default_factory=list)
    total_rows: int = 0


def capability_problems(
    row: ManifestRow,
    spec: ProviderSpec,
    *,
    refine: bool,
    refine_gender: str | None,
) -> list[str]:
    """Why ``spec``'s provider cannot take ``row`` as the run is configured (checked before
    any call, without importing the provider's client)."""
    caps, name = spec.capabilities, spec.name
    problems = []
    if refine and refine_not_applicable(row) is None and not (row.gender or refine_gender):
        problems.append(
            "refine needs gender (woman|man): fill the gender column or set refine_gender"
        )
    if row.garment_image is None and not caps.prompt:
        problems.append(f"provider {name!r} needs garment_image (it has no prompt endpoint)")
    if row.lower_garment_image is not None and not caps.lower_garment:
        problems.append(f"provider {name!r} does not take lower_garment_image")
    if row.garment_image is not None and row.category not in caps.categories:
        problems.append(f"provider {name!r} does not take category {row.category!r}")
    return problems


def plan_run(
    report: ValidationReport,
    *,
    default_provider: str,
    refine: bool = False,
    refine_gender: str | None = None,
) -> RunPlan:
    """Group ``report``'s valid rows by provider; rows their provider cannot take are invalid."""
    invalid: list[InvalidRow] = list(report.invalid)
    by_provider: dict[str, list[ManifestRow]] = {}
    for row in report.valid:
        name = row.provider or default_provider
        problems = capability_problems(
            row, PROVIDERS[name], refine=refine, refine_gender=refine_gender
        )
        if problems:
            invalid.append(InvalidRow(row_index=row.row_index, row_id=row.id, reasons=problems))
        else:
            by_provider.setdefault(name, []).append(row)
    invalid.sort(key=lambda r: r.row_index)
    return RunPlan(rows_by_provider=by_provider, invalid=invalid, total_rows=report.n_rows)
