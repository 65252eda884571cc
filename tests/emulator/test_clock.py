"""The time the emulator and the polling clients run on: real by default, a test's fake one
where given (tests/contract.py's ``FakeClock``), and the in-process routing of the tests."""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import httpx
import pytest

from emulator import EmulatorConfig, build_app
from emulator.jobs import JobPhase
from providers.base import (
    REAL_TIME,
    AsyncJobClient,
    JobState,
    JobStatus,
    PollPolicy,
    ProviderError,
    RefinerClient,
    wait_for_job,
)
from tests.contract import Emulators, FakeClock


async def test_fake_clock_moves_only_by_sleeping_and_never_back() -> None:
    clock = FakeClock(start=10.0)
    assert clock.now() == 10.0
    await clock.sleep(2.5)
    assert clock.now() == pytest.approx(12.5, abs=1e-5) and clock.now() > 12.5
    before = clock.now()
    await clock.sleep(-3.0)
    assert before < clock.now() < before + 1e-5

    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())
    await clock.sleep(0.0)  # lets the other tasks run once
    assert ran == ["other"] and task.done()


def test_real_time_is_the_default() -> None:
    assert AsyncJobClient.poll_clock is REAL_TIME and RefinerClient.poll_clock is REAL_TIME
    state = build_app(EmulatorConfig()).state.emulator
    assert state.clock is time.monotonic and state.sleep is asyncio.sleep


async def test_jobs_and_results_follow_the_emulator_s_clock(emulators: Emulators) -> None:
    emulator = emulators.start(EmulatorConfig(result_ttl_s=30.0))
    state, clock = emulator.state, emulators.clock

    async def render() -> str:
        return "done"

    job = state.jobs.submit(
        provider="hidream", queued_s=60.0, running_s=60.0, will_fail=False, render=render
    )
    token = state.results.put(b"webp", "image/webp")
    assert (job.phase(), state.clock_s()) == (JobPhase.QUEUED, 0.0)
    await clock.sleep(61.0)
    assert job.phase() is JobPhase.RUNNING
    assert state.results.get(token) is None  # its 30 s are over
    await clock.sleep(60.0)
    assert job.phase() is JobPhase.DONE and state.clock_s() == pytest.approx(121.0, abs=1e-3)


async def test_the_polling_loop_waits_and_times_out_on_its_clock() -> None:
    clock = FakeClock()
    polls: list[float] = []

    async def poll(job_id: str) -> JobStatus:
        polls.append(clock.now())
        return JobStatus(state=JobState.RUNNING)

    policy = PollPolicy(initial_s=60.0, max_interval_s=60.0, factor=1.0, deadline_s=600.0)
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await wait_for_job(poll, "j-1", policy, provider="p", clock=clock)
    assert time.monotonic() - started < 5  # ten minutes of polling, none of them waited
    assert (info.value.code, len(polls)) == ("POLL_DEADLINE", 11)
    waited = float(re.search(r"after (\d+) s", info.value.message)[1])  # type: ignore[index]
    assert 540 <= waited <= 661  # ten waits of 60 s on the fake clock, +/- 10 % jitter
    assert all(54 <= b - a <= 66 for a, b in itertools.pairwise(polls))


async def test_requests_for_an_unknown_emulator_host_are_refused(emulators: Emulators) -> None:
    emulators.start()
    assert (await emulators.http.get("http://emulator.test/_emulator/stats")).status_code == 200
    with pytest.raises(httpx.ConnectError, match="no emulator app"):
        await emulators.http.get("http://9.emulator.test/_emulator/stats")
