"""Prices and charge rules: what each spec says a call costs, which answers the vendor bills,
and that the emulator bills as the vendors' documents say (on the fake clock, no mocks)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest

import emulator.ailab
import emulator.hidream
from emulator import FaultPlan
from emulator.common import Credit
from emulator.jobs import JobStore
from emulator.state import ProviderState, QuotaError
from providers import ailab, changeclothes, hidream, tencent
from providers.ailab.errors import ERROR_TABLE as AILAB_ERRORS
from providers.base import JobState
from providers.changeclothes.errors import ERROR_TABLE as CHANGECLOTHES_ERRORS
from providers.common import ErrorSpec
from providers.hidream.errors import ERROR_TABLE as HIDREAM_ERRORS
from providers.registry import PROVIDERS, REFINER
from providers.spec import ProviderSpec
from providers.tencent.errors import ERROR_TABLE as TENCENT_ERRORS
from schemas.money import Price
from schemas.results import ErrorKind
from tests.contract import FakeClock
from tests.images import person_jpeg
from tests.providers.sites import Ai, Hd, Tc, expect_error, standard_request

SPECS = [*PROVIDERS.values(), REFINER]
# The currencies vendors bill try-on in; a new one is added here on purpose, not by a typo.
ISO_4217 = {"USD", "CNY", "EUR", "GBP", "JPY", "KRW", "HKD", "SGD"}


# -- prices -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_a_price_is_unknown_or_sourced(spec: ProviderSpec) -> None:
    if spec.price is None:
        return  # unknown: never 0
    assert isinstance(spec.price, Price)
    assert spec.price.amount > 0
    assert spec.price.currency in ISO_4217
    assert spec.price.source.strip()


def test_credits_per_call_and_shared_accounts() -> None:
    # AILabTools' Billing Instructions: 10 credits a try-on, 25 a refine; one key, one balance.
    assert (ailab.SPEC.credits_per_call, REFINER.credits_per_call) == (10, 25)
    assert ailab.SPEC.account_name == REFINER.account_name == "ailab"
    assert REFINER.name != ailab.SPEC.name  # two specs, one balance
    # The others do not bill in counted credits (or do not say how many): each its own.
    for spec in (changeclothes.SPEC, tencent.SPEC, hidream.SPEC):
        assert spec.credits_per_call is None
        assert spec.account_name == spec.name


def test_published_prices() -> None:
    # AILabTools: 10 credits per try-on, 25 per refine, at the smallest packs' $6 / 2,000.
    assert ailab.SPEC.price is not None and REFINER.price is not None
    assert (ailab.SPEC.price.amount, ailab.SPEC.price.currency) == (Decimal("0.03"), "USD")
    assert (REFINER.price.amount, REFINER.price.currency) == (Decimal("0.075"), "USD")
    assert "10 credits" in ailab.SPEC.price.source and "25 credits" in REFINER.price.source
    # Nothing published to derive a price from.
    assert changeclothes.SPEC.price is None
    assert tencent.SPEC.price is None
    assert hidream.SPEC.price is None


# -- which answers are billed -------------------------------------------------------------------


def charged(table: Mapping[Any, ErrorSpec]) -> set[Any]:
    return {code for code, spec in table.items() if spec.charged}


def test_charged_errors_are_the_documented_ones() -> None:
    # Docs 000/001: "API-Aufrufe verbrauchen Guthaben von Ihrem Konto" - nothing on failures.
    assert charged(CHANGECLOTHES_ERRORS) == set()
    # Doc 002: no word on billing failed calls.
    assert charged(TENCENT_ERRORS) == set()
    # Doc 003: no word on billing at all.
    assert charged(HIDREAM_ERRORS) == set()
    # "Each successful API request consumes N credits [...]. Failed requests are not billed."
    assert charged(AILAB_ERRORS) == set()


def test_failed_jobs_are_billed_as_documented() -> None:
    # AILabTools: "Failed requests are not billed" (a task that ends failed included).
    assert ailab.SPEC.bills_failed_jobs is False and REFINER.bills_failed_jobs is False
    # HiDream: not documented; assumed so.
    assert hidream.SPEC.bills_failed_jobs is False
    # Synchronous providers have no job to fail after acceptance.
    assert changeclothes.SPEC.bills_failed_jobs is False and tencent.SPEC.bills_failed_jobs is False


def test_the_emulator_reads_the_same_rules() -> None:
    # Kept apart on purpose (the emulator imports no client module): two readings, compared.
    assert emulator.ailab.FAILED_JOBS_BILLED is ailab.SPEC.bills_failed_jobs
    assert emulator.ailab.FAILED_JOBS_BILLED is REFINER.bills_failed_jobs
    assert emulator.hidream.FAILED_JOBS_BILLED is hidream.SPEC.bills_failed_jobs
    assert ailab.SPEC.credits_per_call == emulator.ailab.TRYON_CREDITS
    assert REFINER.credits_per_call == emulator.ailab.REFINER_CREDITS


# -- the emulator bills as the vendors do -------------------------------------------------------


async def credits(site: Ai | Hd | Tc) -> int | None:
    return (await site.control.faults())[site.provider].credits


# The AILab account counts the vendor's credits: 10 a try-on (TRYON), 25 a refine.
TRYON = 10


async def test_ailab_failed_task_gives_its_credit_back(
    ai: Ai, person: bytes, garment: bytes
) -> None:
    await ai.quick_jobs(credits=TRYON, async_failure_rate=1.0)
    client = ai.client()
    error = await expect_error(client.try_on(standard_request(ai, person, garment)))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "ERROR_TASK_STOPPED_PROCESSING")
    assert await credits(ai) == TRYON

    await ai.faults(async_failure_rate=0.0)
    assert (await client.try_on(standard_request(ai, person, garment))).result_url
    assert await credits(ai) == 0  # a task that succeeds is billed


async def test_ailab_credit_comes_back_when_the_task_fails_unpolled(
    ai: Ai, person: bytes, garment: bytes
) -> None:
    await ai.quick_jobs(credits=TRYON, async_failure_rate=1.0)
    client = ai.client()
    task_id = await client.submit(standard_request(ai, person, garment))
    assert await credits(ai) == 0  # held while the task runs
    await ai.sleep(0.1)
    assert await credits(ai) == TRYON  # the task ended failed: nobody polled it
    assert await client.submit(standard_request(ai, person, garment))
    assert (await client.poll(task_id)).state is JobState.FAILED


async def test_ailab_task_whose_input_does_not_decode_is_not_billed(
    ai: Ai, person: bytes, garment: bytes
) -> None:
    await ai.quick_jobs(credits=TRYON)
    client = ai.client()
    truncated = person[: len(person) // 2]  # its header reads, its pixels do not
    task_id = await client.submit(standard_request(ai, truncated, garment))
    await ai.sleep(0.1)
    assert await credits(ai) == 0  # done by the clock: billed, until it renders
    assert (await client.poll(task_id)).state is JobState.FAILED
    assert await credits(ai) == TRYON
    assert (await client.poll(task_id)).state is JobState.FAILED  # and stays failed
    assert await credits(ai) == TRYON


async def test_hidream_failed_job_gives_its_credit_back(
    hd: Hd, person: bytes, garment: bytes
) -> None:
    await hd.faults(credits=1, forced_codes=["task_status:4"])
    client = hd.client()
    error = await expect_error(client.try_on(standard_request(hd, person, garment)))
    assert error.code == "MODERATED"
    assert await credits(hd) == 1
    assert (await client.try_on(standard_request(hd, person, garment))).result_url
    error = await expect_error(client.submit(standard_request(hd, person, garment)))
    assert (error.kind, error.code) == (ErrorKind.FATAL, "INSUFFICIENT_CREDITS")


async def test_tencent_rejected_call_costs_nothing(tc: Tc) -> None:
    await tc.faults(credits=1)
    tencent = tc.client()
    small = tc.request(person_jpeg(size=(500, 700)), name="small")
    error = await expect_error(tencent.try_on(small))
    assert error.code == "InvalidParameterValue.ParameterValueError"
    assert (await tencent.try_on(tc.request(name="ok"))).result_url
    error = await expect_error(tencent.try_on(tc.request(name="ok")))
    assert error.code == "ResourceUnavailable.LowBalance"


@pytest.mark.parametrize(("bills_failure", "left"), [(False, 30), (True, 5)])
async def test_a_held_credit_follows_the_vendor_s_rule(bills_failure: bool, left: int) -> None:
    clock = FakeClock()
    account = ProviderState("vendor", FaultPlan(credits=30), seed=1)
    jobs = JobStore(clock.now)

    async def render() -> str:
        return "url"

    credit = Credit(account)
    credit.take("token", None, cost=25)  # a call priced in credits takes them all
    job = jobs.submit(provider="vendor", queued_s=0, running_s=1, will_fail=True, render=render)
    credit.hold_for_job(job, bills_failure=bills_failure)
    credit.commit()  # the submission itself succeeded
    assert account.current_plan().credits == 5
    with pytest.raises(QuotaError):  # 5 left: not enough for another
        account.take_quota("token", None, cost=25)
    await clock.sleep(2)
    assert account.current_plan().credits == left
