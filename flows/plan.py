"""The ``tryon-plan`` flow: a run's estimate from the Prefect UI, with the same parameters as
``tryon-batch`` (``flows.estimate``; ``tryon plan`` on the command line). Calls no provider,
fetches no image, writes nothing to the lake: a table artifact and the flow's result."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact

from flows.batch import name_of_this_run
from flows.estimate import RunEstimate, estimate_for
from flows.params import BatchParams

PLAN_TABLE_KEY = "tryon-run-plan"


def plan_of_this_run() -> str:
    return name_of_this_run(kind="plan")


def describe(estimate: RunEstimate) -> str:
    """One line: calls, cost, time, as ``tryon plan`` ends."""
    cost = "unknown (a provider's price is unknown)"
    if estimate.cost is not None:
        cost = f"{estimate.cost:.4f}".rstrip("0").rstrip(".") + f" {estimate.currency}"
    took = "unknown" if estimate.seconds is None else f"about {estimate.seconds:.0f} s"
    invalid = len(estimate.plan.invalid)
    return f"{estimate.calls} calls, cost {cost}, {took}; {invalid} invalid rows"


@flow(
    name="tryon-plan",
    description="What a try-on batch with these parameters would do and cost: rows to do and "
    "already done in the lake, calls, cost and time per provider. Calls no provider.",
    flow_run_name=plan_of_this_run,
)
async def tryon_plan(params: BatchParams) -> dict[str, Any]:
    """Estimate the run ``params`` describe; the lines are the flow's result and a table.

    Args:
        params: The batch's parameters, as for tryon-batch.
    """
    estimate = await asyncio.to_thread(estimate_for, params)
    line = describe(estimate)
    get_run_logger().info("plan: %s", line)
    await acreate_table_artifact(
        estimate.lines.to_dicts(),
        key=PLAN_TABLE_KEY,
        description=f"Plan at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {line}",
    )
    return estimate.to_json()
