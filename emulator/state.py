"""The emulator's shared state: stats, per-provider faults and accounts, results, composites.

Everything here is touched from the server's event loop only (compositing runs in worker
threads but hands its bytes back to the loop), so no locks are needed.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httpx

from emulator.config import BadOutput, EmulatorConfig, FaultPlan
from emulator.jobs import Clock, EmulatedJob, JobPhase, JobStore, Sleep
from emulator.stats import CacheStats, EmulatorStats, ProviderStats

CALL_LOG_LIMIT = 200_000


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What the gateway does with one call, drawn before the provider logic runs."""

    timeout: bool = False
    rate_limited: bool = False
    unavailable: bool = False
    latency_s: float = 0.0


class QuotaError(Exception):
    """The account behind a token may not make another call."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "credits" | "trial"


@dataclass(slots=True)
class QuotaTicket:
    """One reserved call; give it back if the call fails so failures cost nothing."""

    provider: ProviderState
    token: str
    credit: bool
    trial: bool
    done: bool = False
    cost: int = 1  # the credits taken (``take_quota``)

    def refund(self) -> None:
        if self.done:
            return
        self.done = True
        if self.credit and self.provider.credits_remaining is not None:
            self.provider.credits_remaining += self.cost
        if self.trial:
            self.provider.trial_used[self.token] -= 1

    def commit(self) -> None:
        self.done = True


class ProviderState:
    """Counters, fault plan and account usage for one emulated provider."""

    def __init__(self, name: str, plan: FaultPlan, seed: int) -> None:
        self.name = name
        self.plan = plan
        self.forced: deque[int] = deque(plan.forced_codes)
        self.bad_outputs: deque[BadOutput] = deque(plan.bad_outputs)
        self.credits_remaining: int | None = plan.credits
        self.trial_used: Counter[str] = Counter()
        # String seeds hash deterministically (unlike hash()), so runs repeat exactly.
        self._fault_rng = random.Random(f"faults:{seed}:{name}")
        self.seed_rng = random.Random(f"seeds:{seed}:{name}")
        # Its own stream: drawing for results never shifts the gateway's fault draws.
        self._output_rng = random.Random(f"outputs:{seed}:{name}")
        self.in_flight = 0
        # Async jobs holding their submission's credit until they end (``hold_for_job``).
        self._held: list[EmulatedJob] = []
        self.reset_stats()

    def reset_stats(self) -> None:
        self.requests = 0
        self.succeeded = 0
        self.max_in_flight = self.in_flight
        self.errors: Counter[str] = Counter()
        self.bad_outputs_served: Counter[str] = Counter()

    def apply(self, patch: FaultPlan) -> None:
        """Change the fields ``patch`` sets; ``credits`` and the queues (``forced_codes``,
        ``bad_outputs``) restart."""
        fields = patch.model_fields_set
        self.plan = self.plan.model_copy(update={f: getattr(patch, f) for f in fields})
        if "forced_codes" in fields:
            self.forced = deque(patch.forced_codes)
        if "bad_outputs" in fields:
            self.bad_outputs = deque(patch.bad_outputs)
        if "credits" in fields:
            self.credits_remaining = patch.credits

    def current_plan(self) -> FaultPlan:
        """The plan with the counters as they stand (credits left, queues as they are)."""
        self.settle_jobs()
        return self.plan.model_copy(
            update={
                "credits": self.credits_remaining,
                "forced_codes": list(self.forced),
                "bad_outputs": list(self.bad_outputs),
            }
        )

    def draw_faults(self) -> FaultDecision:
        plan = self.plan
        # Always draw the same number of values so one rate's setting never shifts the others.
        u_timeout, u_429, u_5xx, u_jitter = (self._fault_rng.random() for _ in range(4))
        if u_timeout < plan.timeout_rate:
            return FaultDecision(timeout=True)
        if u_429 < plan.error_rate_429:
            return FaultDecision(rate_limited=True)
        if u_5xx < plan.error_rate_5xx:
            return FaultDecision(unavailable=True)
        jitter = (2.0 * u_jitter - 1.0) * plan.latency_jitter_s
        return FaultDecision(latency_s=max(0.0, plan.latency_s + jitter))

    def pop_forced(self) -> int | None:
        return self.forced.popleft() if self.forced else None

    def next_bad_output(self) -> BadOutput | None:
        """What replaces the successful result being handed out, if anything: the queue's next
        entry, else ``bad_output`` at ``bad_output_rate`` (one draw per result, always)."""
        kind: BadOutput | None = None
        if self.bad_outputs:
            kind = self.bad_outputs.popleft()
        elif self._output_rng.random() < self.plan.bad_output_rate:
            kind = self.plan.bad_output
        if kind is not None:
            self.bad_outputs_served[kind] += 1
        return kind

    def take_quota(self, token: str, trial_limit: int | None, cost: int = 1) -> QuotaTicket:
        """Reserve one call for ``token``, taking ``cost`` credits (the vendor's price where it
        bills in credits; a trial key counts calls); raises ``QuotaError`` when they are not
        all there."""
        self.settle_jobs()
        if trial_limit is not None:
            if self.trial_used[token] >= trial_limit:
                raise QuotaError("trial")
            self.trial_used[token] += 1
            return QuotaTicket(self, token, credit=False, trial=True)
        if self.credits_remaining is not None:
            if self.credits_remaining < cost:
                raise QuotaError("credits")
            self.credits_remaining -= cost
            return QuotaTicket(self, token, credit=True, trial=False, cost=cost)
        return QuotaTicket(self, token, credit=False, trial=False)

    def hold_for_job(self, ticket: QuotaTicket, job: EmulatedJob) -> None:
        """``ticket``'s credit goes with ``job``, an async job its call started: given back if
        the job fails (a vendor that bills successful jobs only), kept once it is done."""
        job.on_fail = ticket.refund
        self._held.append(job)

    def settle_jobs(self) -> None:
        """Give back the credits of held jobs that have failed by now (a vendor does when the
        job ends, polled or not); done ones keep theirs and are let go."""
        running: list[EmulatedJob] = []
        for job in self._held:
            phase = job.phase()
            if phase is JobPhase.FAILED:
                job.give_back()
            elif phase is not JobPhase.DONE:
                running.append(job)
        self._held = running

    def drop_held_jobs(self) -> None:
        """Forget held jobs' credits (the counters restart)."""
        for job in self._held:
            job.on_fail = None
        self._held = []

    def record(self, code: int | str) -> None:
        """Count one answered vendor call by its outcome (vendor code, HTTP status, 'timeout')."""
        if str(code) == "200":
            self.succeeded += 1
        else:
            self.errors[str(code)] += 1

    def snapshot(self) -> ProviderStats:
        return ProviderStats(
            requests=self.requests,
            succeeded=self.succeeded,
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            errors=dict(sorted(self.errors.items())),
            bad_outputs=dict(sorted(self.bad_outputs_served.items())),
        )


class ResultStore:
    """Result files by token, each expiring ``ttl_s`` after it was stored."""

    def __init__(
        self, ttl_s: float, max_items: int, name_prefix: str = "", clock: Clock = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self.max_items = max_items
        # Goes into the URL as given (percent-encoded); the server sees it decoded.
        self.name_prefix = name_prefix
        # Insertion order == expiry order (one TTL for all), so purging pops from the front.
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()

    def put(self, data: bytes, media_type: str) -> str:
        self._purge()
        token = f"{time.time_ns()}{secrets.randbelow(10**6):06d}"
        key = unquote(self.name_prefix) + token
        self._items[key] = (self._clock() + self.ttl_s, data, media_type)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return self.name_prefix + token

    def get(self, token: str) -> tuple[bytes, str] | None:
        item = self._items.get(token)
        if item is None or item[0] <= self._clock():
            return None
        return item[1], item[2]

    def __len__(self) -> int:
        return len(self._items)

    def _purge(self) -> None:
        now = self._clock()
        while self._items:
            expires = next(iter(self._items.values()))[0]
            if expires > now:
                break
            self._items.popitem(last=False)


class CompositeCache:
    """A bounded LRU of rendered results by input hash, computing each key once at a time."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self.hits = 0
        self.misses = 0

    async def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        """The cached value, or ``compute()`` run in a worker thread (the loop never blocks)."""
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        pending = self._pending.get(key)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        self.misses += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await asyncio.to_thread(compute)
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved here: waiters may be none
            else:
                future.cancel()
            raise
        finally:
            del self._pending[key]
        future.set_result(value)
        self._items[key] = value
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return value


class EmulatorState:
    """Shared by the app, its control endpoints and every provider's routes.

    ``clock`` and ``sleep``: the time that jobs, result lifetimes, the call log and deferred
    work (HiDream's callbacks) run on; real time unless a test drives a fake one.
    """

    def __init__(
        self,
        config: EmulatorConfig,
        provider_names: list[str],
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self.providers = {
            name: ProviderState(name, config.fault_plan(name), config.seed)
            for name in provider_names
        }
        self.results = ResultStore(
            config.result_ttl_s, config.max_stored_results, config.result_name_prefix, clock
        )
        self.composites = CompositeCache(config.composite_cache_size)
        self.jobs = JobStore(clock)  # submit-then-poll providers' jobs
        self._http: httpx.AsyncClient | None = None
        self.in_flight = 0
        self._clock0 = clock()
        self.reset_stats()

    def provider(self, name: str) -> ProviderState:
        return self.providers[name]

    @property
    def http(self) -> httpx.AsyncClient:
        """For fetching image URLs; made lazily on the server's loop (lifespan is off)."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.config.fetch_timeout_s, follow_redirects=True
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @contextmanager
    def track(self, route_key: str, provider: str | None) -> Iterator[None]:
        """Count a request; vendor API calls (``provider`` set) also count as in flight."""
        self.requests[route_key] += 1
        if provider is None:
            yield
            return
        ps = self.providers[provider]
        ps.requests += 1
        self.in_flight += 1
        ps.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        ps.max_in_flight = max(ps.max_in_flight, ps.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            ps.in_flight -= 1

    def clock_s(self) -> float:
        """The call log's clock: monotonic seconds since the emulator started."""
        return round(self.clock() - self._clock0, 6)

    def log_call(
        self,
        route_key: str,
        provider: str | None,
        *,
        arrived: float,
        status: int,
        fault: str | None,
    ) -> None:
        """One answered call in the call log (``GET /_emulator/calls``): when it arrived and
        was answered (monotonic seconds since the emulator started), its HTTP status, and the
        injected fault that answered it (``timeout``, ``429``, ``5xx``), if any."""
        self.calls.append(
            {
                "seq": self._call_seq,
                "route": route_key,
                "provider": provider,
                "arrived_s": round(arrived - self._clock0, 6),
                "answered_s": self.clock_s(),
                "status": status,
                "fault": fault,
            }
        )
        self._call_seq += 1

    def reset_stats(self) -> None:
        self.requests: Counter[str] = Counter()
        # The newest CALL_LOG_LIMIT calls (each a small dict): enough for a bench run.
        self.calls: deque[dict[str, Any]] = deque(maxlen=CALL_LOG_LIMIT)
        self._call_seq = 0
        self.max_in_flight = self.in_flight
        self.composites.hits = self.composites.misses = 0
        for ps in self.providers.values():
            ps.reset_stats()

    def reset_faults(self) -> None:
        """Back to the configured fault plans, with fresh credit and trial counters."""
        for name, ps in self.providers.items():
            fresh = ProviderState(name, self.config.fault_plan(name), self.config.seed)
            ps.plan, ps.forced, ps.bad_outputs = fresh.plan, fresh.forced, fresh.bad_outputs
            ps.drop_held_jobs()
            ps.credits_remaining, ps.trial_used = fresh.credits_remaining, fresh.trial_used
            ps._fault_rng, ps.seed_rng = fresh._fault_rng, fresh.seed_rng
            ps._output_rng = fresh._output_rng

    def snapshot(self) -> EmulatorStats:
        """What ``GET /_emulator/stats`` answers."""
        return EmulatorStats(
            requests=dict(sorted(self.requests.items())),
            by_provider={name: ps.snapshot() for name, ps in self.providers.items()},
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            results_stored=len(self.results),
            jobs_submitted=self.jobs.submitted,
            job_contents=self.jobs.content_stats(),
            calls_logged=len(self.calls),
            composite_cache=CacheStats(hits=self.composites.hits, misses=self.composites.misses),
        )
