"""What a run must pass before anything starts: no Prefect server, flow run or lake write first.

``check_run`` is pure and imports no Prefect (``tryon run`` answers a run that cannot start in
about a second, without starting a server):

- the manifest is readable and parses (``tasks.manifest.load_manifest``);
- the run's ``provider`` is registered (``BatchParams`` checks it); a row naming an unknown
  one is an invalid row, as ``tryon validate`` reports it, and the run goes on;
- each provider the run will call, and the refiner with ``refine``, is configured: its call
  timeout parses, its credentials hold no control character, a URL-only provider can be given
  URLs of its inputs (``tasks.staging``);
- the lake takes files (``Lake.probe_writable``, which leaves nothing behind).

A credential the environment lacks may still be in a Prefect Secret block, which only a
Prefect API can tell: ``check_run`` returns those names and ``check_secret_blocks`` reads the
blocks (one read each) once an API is up. ``tryon run`` calls the first before it starts a
server and the second just after; the flow calls both before it writes anything (for runs
that do not come through the CLI: deployments, Python). Each raises ``RunNotStarted`` with one
line that names the problem and its fix.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import httpx
import polars as pl
from pydantic import ValidationError

from flows.params import BatchParams
from providers.registry import PROVIDERS, REFINER, ProviderSpec
from providers.settings import base_url, call_timeout_s, credential, secret_block_name
from schemas.manifest import ManifestError
from schemas.manifest_rows import ValidationReport
from schemas.results import ErrorKind
from schemas.summary import RunNotStarted
from tasks.lake import Lake, LakeNotUsable
from tasks.manifest import load_manifest, redact_uri
from tasks.money import run_prices
from tasks.plan import RunPlan, plan_run
from tasks.staging import InputStager

_API_PROBE_TIMEOUT_S = 5.0
_BALANCE_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

__all__ = [
    "Preflight",
    "check_run",
    "check_secret_blocks",
    "describe_invalid_params",
    "missing_credentials_message",
    "run_checks",
]


@dataclass(frozen=True, slots=True)
class Preflight:
    """What the checks found: the validated manifest, the run's plan, and the credentials
    neither the environment nor this process holds (a Prefect Secret block may)."""

    report: ValidationReport
    plan: RunPlan
    providers: tuple[str, ...]  # the accounts the run will call: try-on providers, refiner
    missing_credentials: tuple[str, ...] = field(default=())
    needed_by: dict[str, str] = field(default_factory=dict)  # variable -> provider
    # Each account's price per charged call in the run's currency; None: unknown.
    prices: dict[str, Decimal | None] = field(default_factory=dict)


def check_run(params: BatchParams, *, emulator: bool = False) -> Preflight:
    """Every check that needs no Prefect API, in the order a user would fix them: manifest,
    provider names, provider configuration, lake. Raises ``RunNotStarted``.

    ``emulator``: the CLI's ``--emulator`` will point every provider at a local emulator, with
    the keys it accepts, once the checks have passed: credentials and staging are not checked.
    """
    report = _check_manifest(params)
    plan = plan_run(report, **params.plan_options())
    specs = _specs_in_use(plan, refine=params.refine)
    prices = _check_prices(params, specs)
    lake = _open_lake(params)
    missing: dict[str, str] = {}
    for spec in specs:
        try:
            call_timeout_s(spec.name)
        except ValueError as exc:
            raise RunNotStarted(str(exc)) from None
        if emulator:
            continue
        for env_name in spec.credential_env:
            if _credential_is_missing(env_name):
                missing.setdefault(env_name, _who(spec))
        _check_staging(spec, lake)
    try:
        lake.probe_writable()
    except LakeNotUsable as exc:
        fix = "give a folder (--lake)" if exc.is_file else "choose another lake (--lake)"
        raise RunNotStarted(f"{exc}: {fix}") from None
    return Preflight(
        report=report,
        plan=plan,
        providers=tuple(spec.name for spec in specs),
        missing_credentials=tuple(missing),
        needed_by=missing,
        prices=prices,
    )


async def check_secret_blocks(checks: Preflight, *, cli: bool = False) -> None:
    """Read the Prefect Secret blocks of the credentials ``checks`` found missing (one read
    each; the values stay in this process, see ``tasks.credentials``). Raises
    ``RunNotStarted`` when any is still missing, or when no Prefect API answers to tell."""
    names = list(checks.missing_credentials)
    if not names:
        return
    from prefect.settings import PREFECT_API_URL

    from tasks.credentials import load_secret_blocks  # Prefect: only once there is an API

    api_url = str(PREFECT_API_URL.value() or "")
    try:
        # Prefect's client retries a refused connection for seconds: ask once first.
        if api_url:
            async with httpx.AsyncClient(timeout=_API_PROBE_TIMEOUT_S) as client:
                await client.get(f"{api_url.rstrip('/')}/health")
        await load_secret_blocks(names)
    except Exception as exc:  # the API is down or refuses: the blocks cannot be known
        message = missing_credentials_message(names, checks.needed_by, cli=cli)
        raise RunNotStarted(
            f"{message} (no Secret block could be read: the Prefect API "
            f"{api_url or '(none configured)'} did not answer: {type(exc).__name__})"
        ) from None
    still = [name for name in names if _credential_is_missing(name)]
    if still:
        raise RunNotStarted(missing_credentials_message(still, checks.needed_by, cli=cli))


async def run_checks(params: BatchParams) -> Preflight:
    """Every step, for the flow: nothing is written to the lake before they pass."""
    checks = await asyncio.to_thread(check_run, params)
    await check_secret_blocks(checks)
    await check_balances(params, checks)
    return checks


async def check_balances(params: BatchParams, checks: Preflight) -> None:
    """Where a vendor documents its account's credit balance (``ProviderSpec.credits_per_call``
    and a client with ``credits_balance``), the plan must be payable: the credits the rows to
    do need (``tasks.estimate``: rows earlier runs did are free; fallbacks, which may not be
    needed, are left out) against the balance, read once per account. Raises
    ``RunNotStarted`` when it is short, or when the account refuses the key."""
    specs = [PROVIDERS[name] for name in checks.providers if name in PROVIDERS]
    specs += [REFINER] if REFINER.name in checks.providers else []
    billed = [spec for spec in specs if spec.credits_per_call]
    if not billed:
        return
    from providers.base import ProviderError
    from providers.transport import provider_http_client
    from tasks.estimate import estimate_run, read_done_work

    lake = _open_lake(params)
    done = await asyncio.to_thread(
        read_done_work, lake if lake.fs.exists(lake.metadata_dir()) else None
    )
    lines = estimate_run(
        checks.plan,
        done=done,
        prices=checks.prices,
        limits={},
        refine=params.refine,
        refine_gender=params.gender_for_refiner,
    ).filter(pl.col("track") != "fallback")
    calls = dict(lines.group_by("provider").agg(pl.col("calls").sum()).iter_rows())
    accounts: dict[str, list[ProviderSpec]] = {}
    for spec in billed:
        accounts.setdefault(spec.account_name, []).append(spec)
    async with provider_http_client(max_connections=1, timeout=_BALANCE_TIMEOUT) as http:
        for account, members in accounts.items():
            needs = {
                spec.name: calls.get(spec.name, 0) * (spec.credits_per_call or 0)
                for spec in members
            }
            needed = sum(needs.values())
            if not needed:
                continue
            try:
                balance = await members[0].make_client(http=http).credits_balance()
            except ProviderError as exc:
                if exc.kind is ErrorKind.FATAL:
                    raise RunNotStarted(f"{account}: its credit balance: {exc}") from None
                continue  # the balance is unknown for now: the run's own calls will tell
            if balance is not None and balance < needed:
                parts = " + ".join(
                    f"{calls.get(spec.name, 0)} {spec.name} calls x {spec.credits_per_call}"
                    for spec in members
                    if needs[spec.name]
                )
                raise RunNotStarted(
                    f"{account} has {balance} credits and this run needs {needed} ({parts}; "
                    f"rows earlier runs did are free): top up the account, or run fewer rows "
                    f"(`tryon plan` shows what each provider gets)"
                )


def missing_credentials_message(
    names: Sequence[str], needed_by: dict[str, str] | None = None, *, cli: bool = False
) -> str:
    """One line: which variables are missing, for which provider, and the ways to give them."""
    needed_by = needed_by or {}
    who = sorted({needed_by[name] for name in names if name in needed_by})
    for_whom = f" (needed by {' and '.join(who)})" if who else ""
    blocks = " and ".join(f"'{secret_block_name(name)}'" for name in names)
    if len(names) == 1:
        head = f"{names[0]} is not set{for_whom}: export it"
        save = f"save it as the Prefect Secret block {blocks}"
    else:
        head = f"{' and '.join(names)} are not set{for_whom}: export them"
        save = f"save them as the Prefect Secret blocks {blocks}"
    if cli:
        return f"{head}, {save}, or add --emulator to use the local emulator"
    return f"{head} where the flow runs, or {save}"


def describe_invalid_params(exc: ValidationError) -> str:
    """A ``BatchParams`` validation error as one line (no pydantic dump, no link)."""
    parts = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        where = ".".join(str(part) for part in error["loc"])
        own = error["type"] == "value_error" or not where  # our validators name the field
        parts.append(message if own else f"{where}: {message}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the checks


def _check_manifest(params: BatchParams) -> ValidationReport:
    shown = redact_uri(params.manifest)
    try:
        # A row naming an unknown provider is an invalid row, as `tryon validate` reports it.
        return load_manifest(
            params.manifest,
            storage_options=params.storage_options,
            known_providers=sorted(PROVIDERS),
            check_files=True,
        )
    except ManifestError as exc:
        text = str(exc)
        if text.startswith("manifest not found"):
            fix = f"check the path (relative to {os.getcwd()})" if "://" not in shown else ""
            fix = fix or "check the URL and the storage options"
        else:
            fix = f"`tryon validate {shown}` lists every problem"
        raise RunNotStarted(f"{text}: {fix}") from None


def _specs_in_use(plan: RunPlan, *, refine: bool) -> list[ProviderSpec]:
    """The accounts the flow will open (``tasks.context.open_run_contexts``): one per provider
    with rows, compared or fallen back to, and the refiner's when the run refines."""
    specs = [PROVIDERS[name] for name in plan.providers()]
    return [*specs, REFINER] if refine else specs


def _check_prices(params: BatchParams, specs: Sequence[ProviderSpec]) -> dict[str, Decimal | None]:
    """Each account's price; a budget needs every one of them known."""
    try:
        prices = run_prices(specs, currency=params.currency, given=params.prices)
    except ValueError as exc:  # a malformed TRYON_PRICES
        raise RunNotStarted(f"{exc}: expected e.g. changeclothes=0.05,hidream=0.04") from None
    unknown = [name for name, price in prices.items() if price is None]
    if params.budget and unknown:
        given = " ".join(f"--price {name}=AMOUNT" for name in unknown)
        raise RunNotStarted(
            f"a budget needs the price of every provider the run may call, and "
            f"{', '.join(unknown)} has none in {params.currency}: give it ({given}, or the "
            f"prices parameter, or TRYON_PRICES where the flow runs)"
        )
    return prices


def _who(spec: ProviderSpec) -> str:
    return "the refiner (--refine)" if spec is REFINER else spec.name


def _credential_is_missing(env_name: str) -> bool:
    try:
        return credential(env_name) is None
    except ValueError as exc:  # a control character: names the variable, never the value
        raise RunNotStarted(f"{exc}: set it again without it") from None


def _open_lake(params: BatchParams) -> Lake:
    try:
        return Lake.open(params.lake, storage_options=params.storage_options)
    except Exception as exc:  # any fsspec backend: unknown protocol, missing package...
        detail = " ".join(str(exc).split())[:200]
        raise RunNotStarted(
            f"the lake {redact_uri(params.lake)} cannot be opened: {type(exc).__name__}: "
            f"{detail}: check the lake URL (--lake) and its storage options"
        ) from None


def _check_staging(spec: ProviderSpec, lake: Lake) -> None:
    """A URL-only provider must be able to fetch the run's inputs (``InputStager``)."""
    if not spec.capabilities.needs_urls:
        return
    try:
        InputStager(lake, provider_base_url=base_url(spec.name, spec.default_base_url)).close()
    except ValueError as exc:
        raise RunNotStarted(str(exc)) from None
