"""Planning a run: which valid rows go to which provider, and which rows no provider can take.

Pure (no IO, no Prefect): a row a provider cannot take as the run is configured becomes an
invalid row with the reason, before anything is paid for. ``capability_problems`` states the
rules for one row; ``plan_run`` applies them to every row at once, in Polars expressions (the
tests hold the two to the same reasons). ``tryon validate --provider`` plans exactly as a run
does, so both report the same invalid rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl

from providers.base import Capabilities
from providers.registry import PROVIDERS, ProviderSpec
from schemas.manifest import ManifestRow, plural
from schemas.manifest_rows import (
    FAILED,
    InvalidRows,
    ManifestRows,
    ValidationReport,
    failing_rows,
    invalid_lines,
)

REFINE_NEEDS_GENDER = "refine needs gender (woman|man): fill the gender column or set refine_gender"
_PROVIDER = "__provider"


@dataclass(frozen=True, slots=True)
class RunPlan:
    """Valid rows by their own provider (in manifest order), every invalid row (sorted by
    index), and the rows each compared provider also gets: every valid row but those whose own
    provider it is. ``fallback``: the providers a failed row goes on to, in order."""

    rows_by_provider: dict[str, ManifestRows] = field(default_factory=dict)
    invalid: InvalidRows = field(default_factory=lambda: InvalidRows.of(()))
    total_rows: int = 0
    compare: dict[str, ManifestRows] = field(default_factory=dict)
    fallback: tuple[str, ...] = ()

    @property
    def runnable_rows(self) -> int:
        return sum(len(rows) for rows in self.rows_by_provider.values())

    @property
    def compared_rows(self) -> int:
        return sum(len(rows) for rows in self.compare.values())

    def providers(self) -> list[str]:
        """Every try-on provider the run may call: own, compared and fallback providers."""
        names = [*self.rows_by_provider, *self.compare]
        if self.rows_by_provider:
            names += self.fallback
        return list(dict.fromkeys(names))

    def summary(self, max_invalid: int | None = 5) -> str:
        """The counts, then one line per invalid row (the first ``max_invalid``; all for
        None), worded as ``tryon validate`` words them."""
        counts = f"{len(self.invalid)} invalid"
        lines = [f"{plural(self.total_rows, 'row')}: {self.runnable_rows} valid, {counts}"]
        return "\n".join(lines + self.provider_lines() + invalid_lines(self.invalid, max_invalid))

    def provider_lines(self) -> list[str]:
        """Where valid rows go, when more than one provider is in play."""
        lines = []
        if len(self.rows_by_provider) > 1:
            lines.append(
                "by provider: "
                + ", ".join(f"{name} {len(rows)}" for name, rows in self.rows_by_provider.items())
            )
        if self.compare:
            lines.append(
                "compared with: "
                + ", ".join(f"{name} {len(rows)} rows" for name, rows in self.compare.items())
            )
        if self.fallback:
            lines.append(f"falling back to: {', '.join(self.fallback)}")
        return lines


def refine_not_applicable(row: ManifestRow) -> str | None:
    """Why the refiner cannot take this row (it needs a top garment), or None."""
    if row.garment_image is None:
        return "the refiner needs a garment image; a prompt row cannot be refined"
    if row.category == "lower_body":
        return "the refiner needs a top garment; a lower_body row has none"
    return None


def capability_problems(
    row: ManifestRow,
    spec: ProviderSpec,
    *,
    refine: bool,
    refine_gender: str | None,
) -> list[str]:
    """Why ``spec``'s provider cannot take ``row`` as the run is configured (checked before
    any call, without importing the provider's client)."""
    problems = []
    if refine and refine_not_applicable(row) is None and not (row.gender or refine_gender):
        problems.append(REFINE_NEEDS_GENDER)
    return problems + provider_problems(row, spec.name, spec.capabilities)


def provider_problems(row: ManifestRow, name: str, caps: Capabilities) -> list[str]:
    """Why provider ``name`` cannot take ``row``'s request shape (a compared or fallback
    provider is checked with this, row by row, as it is reached)."""
    problems = []
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
    route: Mapping[str, str] | None = None,
    compare: Sequence[str] = (),
    fallback: Sequence[str] = (),
    providers: Mapping[str, ProviderSpec] = PROVIDERS,
) -> RunPlan:
    """Group ``report``'s valid rows by provider; rows their provider cannot take are invalid.

    A row's provider: its ``provider`` column, else ``route`` by its category, else
    ``default_provider``. Each ``compare`` provider also gets every valid row whose own
    provider it is not (whether it can take each row is decided as the row reaches it).
    """
    rows = report.valid
    # What the rules read, and no more: a million rows' image paths need not be copied.
    frame = pl.concat(
        [
            rows.frame(("provider", "category", "gender"), resolve=False),
            rows.present(("garment_image", "lower_garment_image")),
        ],
        how="horizontal",
    )
    routed = (
        pl.col("category").replace_strict(dict(route), default=default_provider)
        if route
        else pl.lit(default_provider)
    )
    frame = frame.with_columns(pl.coalesce(pl.col("provider"), routed).alias(_PROVIDER))
    named = frame[_PROVIDER].unique(maintain_order=True).to_list()
    checks = _capability_checks(
        {name: providers[name] for name in named}, refine=refine, refine_gender=refine_gender
    )
    failing = pl.any_horizontal([when for when, _ in checks]) if checks else pl.lit(False)
    frame = frame.with_row_index("__at").with_columns(failing.alias("__failing"))
    flagged = frame.filter("__failing")
    invalid = report.invalid
    if flagged.height:
        # Reasons are spelled out for the rows that fail only.
        flagged = flagged.with_columns(rows.take(flagged["__at"]).frame(["id"])["id"])
        checked = failing_rows(flagged.lazy(), [pl.when(when).then(why) for when, why in checks])
        invalid = InvalidRows.merged(invalid, InvalidRows(checked.filter(FAILED)))
    ok = frame.filter(~pl.col("__failing"))
    by_provider = {
        name: rows.take(ok.filter(pl.col(_PROVIDER) == name)["__at"])
        for name in ok[_PROVIDER].unique(maintain_order=True).to_list()
    }
    compared = {name: rows.take(ok.filter(pl.col(_PROVIDER) != name)["__at"]) for name in compare}
    return RunPlan(
        rows_by_provider=by_provider,
        invalid=invalid,
        total_rows=report.n_rows,
        compare={name: taken for name, taken in compared.items() if len(taken)},
        fallback=tuple(fallback),
    )


def provider_capability_checks(specs: Mapping[str, ProviderSpec]) -> list[tuple[pl.Expr, pl.Expr]]:
    """The request-shape rules of ``specs`` as (fails, reason) pairs over a frame with the
    provider in ``__provider`` and booleans for garment and lower garment images."""
    return _capability_checks(specs, refine=False, refine_gender=None)


def _capability_checks(
    specs: Mapping[str, ProviderSpec], *, refine: bool, refine_gender: str | None
) -> list[tuple[pl.Expr, pl.Expr]]:
    """``capability_problems`` as (fails, reason) expression pairs, in the same order."""
    # Booleans: whether the row has a garment image, a lower garment image.
    garment, lower = pl.col("garment_image"), pl.col("lower_garment_image")
    category, provider = pl.col("category"), pl.col(_PROVIDER)
    checks: list[tuple[pl.Expr, pl.Expr]] = []
    if refine and not refine_gender:
        # refine_not_applicable: a garment row (which has a category) that is not lower_body.
        refinable = garment & (category != "lower_body")
        checks.append((refinable & pl.col("gender").is_null(), pl.lit(REFINE_NEEDS_GENDER)))
    for name, spec in specs.items():
        caps, this = spec.capabilities, provider == name
        if not caps.prompt:
            checks.append(
                (
                    this & ~garment,
                    pl.lit(f"provider {name!r} needs garment_image (it has no prompt endpoint)"),
                )
            )
        if not caps.lower_garment:
            checks.append(
                (
                    this & lower,
                    pl.lit(f"provider {name!r} does not take lower_garment_image"),
                )
            )
        # Categories are validated already: repr() of one is the value in single quotes.
        checks.append(
            (
                this & garment & ~category.is_in(sorted(caps.categories)),
                pl.format(f"provider {name!r} does not take category '{{}}'", category),
            )
        )
    return checks
