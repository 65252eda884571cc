"""Asynchronous jobs for the emulator's submit-then-poll providers (HiDream, AILabTools).

A job's state is a function of time since submission: queued for ``job_queued_s``, running for
``job_running_s``, then done (its result rendered on first need, then kept) or failed, decided
at submission from the provider's seeded fault RNG. Jobs are kept per provider, so one vendor's
task id never answers on another's result endpoint.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from emulator.stats import JobContents

Clock = Callable[[], float]
"""The emulator's time in seconds (``time.monotonic`` unless a test gives a fake one)."""
Sleep = Callable[[float], Awaitable[None]]
"""How the emulator waits on its clock (``asyncio.sleep`` unless a test gives a fake one)."""

JOB_LIMIT = 100_000  # oldest jobs are forgotten past this (as vendors expire task results)


class JobPhase(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True)
class EmulatedJob:
    job_id: str
    provider: str
    submitted: float
    queued_s: float
    running_s: float
    will_fail: bool
    render: Callable[[], Awaitable[Any]]  # produces the result (e.g. a stored file's URL)
    meta: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    polls: int = 0
    content: str | None = None  # a digest of what was asked (see ``JobStore.submit``)
    clock: Clock = time.monotonic  # the store's (``submitted`` is on it)
    # Gives back the credit the submission took, for a vendor that bills successful jobs only
    # (``ProviderState.hold_for_job``); run once, when the job is found failed.
    on_fail: Callable[[], None] | None = None

    def phase(self, now: float | None = None) -> JobPhase:
        elapsed = (self.clock() if now is None else now) - self.submitted
        if elapsed < self.queued_s:
            return JobPhase.QUEUED
        if elapsed < self.queued_s + self.running_s:
            return JobPhase.RUNNING
        return JobPhase.FAILED if self.will_fail else JobPhase.DONE

    def give_back(self) -> None:
        """Run ``on_fail`` (once): the job failed."""
        refund, self.on_fail = self.on_fail, None
        if refund is not None:
            refund()

    def fail(self) -> None:
        """End the job failed though its time said done (an input found not to decode)."""
        self.will_fail = True
        self.give_back()

    async def outcome(self) -> Any:
        """The job's result, rendered once (only call when ``phase()`` is DONE)."""
        if self.result is None:
            self.result = await self.render()
        return self.result


class JobStore:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._jobs: OrderedDict[str, EmulatedJob] = OrderedDict()
        self.submitted = 0
        # Submissions by request content (a provider's digest of the inputs that shape the
        # job, ids excluded): a second submission of the same content is a resubmission.
        # ``resubmitted_accepted`` counts those made while an earlier job for that content
        # had not failed (queued, running or done: work already accepted, paid twice);
        # ``resubmitted_after_failure`` those whose earlier jobs had all ended failed (or were
        # forgotten, as vendors expire old tasks). Job ids only: the jobs stay bounded.
        self._by_content: dict[str, list[str]] = {}
        self.resubmitted_accepted = 0
        self.resubmitted_after_failure = 0

    def submit(
        self,
        *,
        provider: str,
        queued_s: float,
        running_s: float,
        will_fail: bool,
        render: Callable[[], Awaitable[Any]],
        meta: dict[str, Any] | None = None,
        content: str | None = None,
    ) -> EmulatedJob:
        """``content``: a digest of the request's inputs, for the resubmission counts."""
        job = EmulatedJob(
            job_id=str(uuid.uuid4()),
            provider=provider,
            submitted=self._clock(),
            queued_s=queued_s,
            running_s=running_s,
            will_fail=will_fail,
            render=render,
            meta=meta or {},
            content=content,
            clock=self._clock,
        )
        if content is not None:
            key = f"{provider}|{content}"
            earlier = self._by_content.setdefault(key, [])
            if earlier:
                known = (self._jobs.get(job_id) for job_id in earlier)
                if any(
                    j is not None and j.phase(job.submitted) is not JobPhase.FAILED for j in known
                ):
                    self.resubmitted_accepted += 1
                else:
                    self.resubmitted_after_failure += 1
            earlier.append(job.job_id)
        self._jobs[job.job_id] = job
        self.submitted += 1
        while len(self._jobs) > JOB_LIMIT:
            self._jobs.popitem(last=False)
        return job

    def content_stats(self) -> JobContents:
        """Submissions by content (only jobs submitted with a ``content`` digest)."""
        ids = [job_id for job_ids in self._by_content.values() for job_id in job_ids]
        jobs = [job for job_id in ids if (job := self._jobs.get(job_id)) is not None]
        return JobContents(
            submissions=len(ids),
            distinct_contents=len(self._by_content),
            max_submissions_per_content=max(map(len, self._by_content.values()), default=0),
            resubmitted_accepted=self.resubmitted_accepted,
            resubmitted_after_failure=self.resubmitted_after_failure,
            failing=sum(job.will_fail for job in jobs),
        )

    def get(self, provider: str, job_id: str) -> EmulatedJob | None:
        job = self._jobs.get(job_id)
        if job is None or job.provider != provider:
            return None
        job.polls += 1
        return job

    def __len__(self) -> int:
        return len(self._jobs)
