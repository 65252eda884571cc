"""The control endpoints: their paths and what they answer (the server builds these models,
``emulator.control`` parses them). No vendor uses the ``/_emulator/`` prefix."""

from __future__ import annotations

from pydantic import BaseModel, Field

STATS_PATH = "/_emulator/stats"
CALLS_PATH = "/_emulator/calls"
RESET_PATH = "/_emulator/reset"
FAULTS_PATH = "/_emulator/faults"


class ProviderStats(BaseModel):
    """One provider's vendor calls since the last reset."""

    requests: int = 0
    succeeded: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    errors: dict[str, int] = Field(
        default_factory=dict, description="Answered calls by vendor code, HTTP status or timeout."
    )
    bad_outputs: dict[str, int] = Field(
        default_factory=dict, description="Successful results the fault plan replaced, by kind."
    )


class JobContents(BaseModel):
    """Submit-then-poll jobs by request content (jobs submitted with a content digest)."""

    submissions: int = 0
    distinct_contents: int = 0
    max_submissions_per_content: int = 0
    resubmitted_accepted: int = 0
    resubmitted_after_failure: int = 0
    failing: int = Field(default=0, description="Jobs failed or planned to fail.")


class CacheStats(BaseModel):
    hits: int = 0
    misses: int = 0


class EmulatorStats(BaseModel):
    """``GET /_emulator/stats``: counters since the last reset (control calls not counted)."""

    requests: dict[str, int] = Field(
        default_factory=dict, description="By route, e.g. 'POST /api/openapi/change-clothes-ai'."
    )
    by_provider: dict[str, ProviderStats] = Field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    results_stored: int = 0
    jobs_submitted: int = 0
    job_contents: JobContents = Field(default_factory=JobContents)
    calls_logged: int = 0
    composite_cache: CacheStats = Field(default_factory=CacheStats)

    def provider(self, name: str) -> ProviderStats:
        return self.by_provider[name]

    def posts(self, prefix: str = "POST") -> int:
        """Requests on routes starting with ``prefix``: by default every call that sends work
        (result downloads and polls are GETs)."""
        return sum(n for route, n in self.requests.items() if route.startswith(prefix))


class EmulatorCall(BaseModel):
    """One answered call; times are seconds on the log's clock (monotonic, from start)."""

    seq: int
    route: str
    provider: str | None = Field(description="None for result downloads.")
    arrived_s: float
    answered_s: float
    status: int
    fault: str | None = Field(description="The injected fault that answered: timeout, 429, 5xx.")


class CallLog(BaseModel):
    """``GET /_emulator/calls``: the call log, oldest first."""

    calls: list[EmulatorCall]
    now_s: float = Field(description="The log's clock when it was read.")
    clock0_unix: float = Field(description="The log's zero as Unix time.")
