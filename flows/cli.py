"""`tryon`: run a batch, validate a manifest, serve the emulator or manage the local Prefect
server, from the shell.

Exit status (for schedulers): 0 every row succeeded (a row the refiner cannot take counts as
done); 1 some rows failed, were invalid or were skipped by a run-fatal error; 2 the run could
not start (bad manifest, unknown provider, missing key, lake): one line says why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from schemas.manifest_rows import InvalidRows
    from schemas.summary import RunSummary

if TYPE_CHECKING:
    from flows.local_server import PrefectApi

# Before Prefect is imported: its telemetry heartbeat races a new server's first SQLite
# migrations ("database is locked") and is useless offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Nor does the client send usage data; this also keeps Prefect's first-run usage-data banner
# out of our commands' output.
os.environ.setdefault("DO_NOT_TRACK", "1")
# Without PREFECT_API_URL the first command starts the local Prefect server, which must migrate
# a fresh SQLite database first: on a busy 2-core machine that took over Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Soft wrap: a long line (a path, a URL) stays one line, whatever the width, so it can be
# copied whole; off a terminal Rich would otherwise break it at 80 columns.
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

EXIT_OK, EXIT_ROWS, EXIT_NOT_STARTED = 0, 1, 2
# 128 + SIGINT, as shells report a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130
TOP_ERRORS_SHOWN = 5  # error codes explained at the end of a run (summary.json keeps more)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed)"


def _show_version(value: bool) -> None:
    if value:
        out.print(
            f"tryon-flows {_package_version('tryon-flows')} "
            f"(prefect {_package_version('prefect')}, Python {platform.python_version()})",
            highlight=False,
        )
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Options before the command (``tryon --version``)."""


class RichProgress:
    """ProgressSink drawing rows done / failed / rate on a terminal."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("rows", total=None, ok=0, bad=0, rate=0.0)
        self.ok = self.bad = 0
        self.t0 = time.perf_counter()

    def started(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def row_done(self, record: Any) -> None:
        if str(record.status) == "succeeded":
            self.ok += 1
        else:
            self.bad += 1
        done = self.ok + self.bad
        rate = done / max(time.perf_counter() - self.t0, 1e-6)
        self.progress.update(self.task, advance=1, ok=self.ok, bad=self.bad, rate=rate)


def _cannot_start(reason: str) -> NoReturn:
    """One line on stderr naming what is wrong and the fix; exit status 2."""
    text = " ".join(reason.split())  # one line, whatever the message held
    err.print(Text.assemble(("cannot start:", "red"), " ", text), soft_wrap=True, highlight=False)
    raise typer.Exit(EXIT_NOT_STARTED)


class _DropTracebacksOf(logging.Filter):
    """Drops records carrying one of ``types``' exceptions (Prefect's "Encountered exception
    during execution" record and its traceback)."""

    def __init__(self, types: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.types = types

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, self.types)


def _quiet_console_tracebacks(stack: ExitStack, types: tuple[type[BaseException], ...]) -> None:
    """Keep the tracebacks of ``types`` off the terminal, for this command: Prefect's console
    handlers drop them; its API log handler still sends them to the flow run's logs."""
    from prefect.logging.handlers import PrefectConsoleHandler

    quiet = _DropTracebacksOf(types)
    names = ["", *logging.root.manager.loggerDict]
    for logger in map(logging.getLogger, names):
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(quiet)
                stack.callback(handler.removeFilter, quiet)


class RunLink:
    """ProgressSink that prints the run's page in the Prefect UI as the run starts."""

    def __init__(self, api: PrefectApi, say: Callable[[str], None]) -> None:
        self.api = api
        self.say = say
        self.flow_run_id: str | None = None

    def started(self, total: int) -> None:
        from prefect.runtime import flow_run

        current = flow_run.get_id()
        if current is None or self.flow_run_id is not None:
            return
        self.flow_run_id = str(current)
        if link := self.api.flow_run_url(self.flow_run_id):
            self.say(f"Prefect UI: {link}")

    def row_done(self, record: Any) -> None:
        del record


def _route_prefect_console_logs(stack: ExitStack, console: Console) -> None:
    """Print Prefect's console logs above the live progress bar instead of through it.

    rich keeps a bar at the bottom only for output printed through the bar's own Console, so
    Prefect's console handlers print through it while the bar is shown.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    names = ["", *logging.root.manager.loggerDict]
    for logger in map(logging.getLogger, names):
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                stack.callback(setattr, handler, "console", handler.console)
                handler.console = console


def _say(line: str) -> None:
    """One line on stderr as it is (no markup), never wrapped: it may end with a URL to copy."""
    err.print(line, markup=False, highlight=False, soft_wrap=True)


def emulator_env(base_url: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables that point every provider at the emulator on ``base_url``: the base URLs
    and the keys an emulator started from ``environ`` accepts (``environ``'s own where set,
    else the emulator's defaults). Only an emulator run takes those defaults."""
    from emulator.keys import accepted_keys
    from providers.registry import PROVIDERS
    from providers.settings import base_url_env

    urls = {base_url_env(provider): base_url for provider in PROVIDERS}
    return {**urls, **accepted_keys(environ)}


def _start_emulator(stack: ExitStack) -> str:
    """Serve every provider's protocol on loopback and point all providers (and keys) at it."""
    from emulator.server import EmulatorConfig, EmulatorServer

    server = EmulatorServer.start(EmulatorConfig())
    stack.callback(server.stop)
    os.environ.update(emulator_env(server.base_url))
    return server.base_url


# The many-provider options `run` and `validate` share (see README "Choosing a provider").
RouteOption = Annotated[
    list[str] | None,
    typer.Option(
        "--route",
        metavar="CATEGORY=PROVIDER",
        help="Provider for rows of a category that name none, repeatable "
        "(e.g. --route dresses=hidream).",
    ),
]
FallbackOption = Annotated[
    list[str] | None,
    typer.Option(
        "--fallback",
        metavar="PROVIDER",
        help="Provider a row goes on to when its provider fails it, repeatable, in order.",
    ),
]
CompareOption = Annotated[
    list[str] | None,
    typer.Option(
        "--compare",
        metavar="PROVIDER",
        help="Provider every valid row also goes to, side by side, repeatable.",
    ),
]


PriceOption = Annotated[
    list[str] | None,
    typer.Option(
        "--price",
        metavar="PROVIDER=AMOUNT",
        help="Price per charged call, in --currency, repeatable (default: TRYON_PRICES, else "
        "the vendor's published price).",
    ),
]


@app.command()
def run(
    manifest: Annotated[str, typer.Argument(help="Manifest: CSV/Parquet path or fsspec URL.")],
    lake: Annotated[str, typer.Option(help="Lake root: folder or fsspec URL.")] = "./lake",
    provider: Annotated[str, typer.Option(help="Provider for rows naming none.")] = "changeclothes",
    route: RouteOption = None,
    fallback: FallbackOption = None,
    compare: CompareOption = None,
    price: PriceOption = None,
    currency: Annotated[str, typer.Option(help="Currency of prices and budget.")] = "USD",
    budget: Annotated[
        float,
        typer.Option(help="Most the run may spend, in --currency (0: no cap)."),
    ] = 0,
    emulator: Annotated[
        bool,
        typer.Option(
            "--emulator",
            help="Start the emulator in-process and use it (input fetches may reach loopback).",
        ),
    ] = False,
    fetch_allow: Annotated[
        list[str] | None,
        typer.Option(
            "--fetch-allow",
            help="Non-public network (CIDR), address or host name input image URLs may reach, "
            "repeatable. Default: loopback, private, link-local... addresses are refused.",
        ),
    ] = None,
    fetch_timeout: Annotated[
        float, typer.Option(help="Read timeout of an input image fetch (s).")
    ] = 30.0,
    chunk_size: Annotated[int, typer.Option(help="Rows per Prefect task.")] = 100,
    max_in_flight: Annotated[
        int | None, typer.Option(help="Provider calls in flight (default: provider's).")
    ] = None,
    rps: Annotated[float | None, typer.Option(help="Provider requests per second.")] = None,
    max_attempts: Annotated[int, typer.Option(help="Provider calls per row, at most.")] = 4,
    refine: Annotated[
        bool, typer.Option("--refine", help="Chain the AILabTools refiner onto each result.")
    ] = False,
    refine_gender: Annotated[
        str | None, typer.Option(help="woman|man, for rows without a gender (refiner).")
    ] = None,
    allow_row_errors: Annotated[
        bool, typer.Option("--allow-row-errors", help="Exit 0 even if some rows failed.")
    ] = False,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: tty).")
    ] = None,
) -> None:
    """Run a try-on batch and write results and metadata to the lake."""
    from pydantic import ValidationError

    from flows.params import BatchParams
    from flows.preflight import (
        check_run,
        check_secret_blocks,
        describe_invalid_params,
        missing_credentials_message,
    )
    from providers.settings import secret_block_name
    from schemas.summary import RunNotStarted
    from tasks.fetch_guard import LOOPBACK
    from tasks.money import parse_prices

    # Every check that needs no Prefect API, before Prefect is even imported: a run that
    # cannot start says why in one line, at once, and leaves nothing behind.
    try:
        params = BatchParams(
            manifest=manifest,
            lake=lake,
            provider=provider,
            route=parse_routes(route),
            fallback=fallback or [],
            compare=compare or [],
            prices={
                k: float(v)
                for k, v in parse_prices(" ".join(price or []), option="--price").items()
            },
            currency=currency,
            budget=budget,
            chunk_size=chunk_size,
            limits={"max_in_flight": max_in_flight, "requests_per_second": rps},
            max_attempts=max_attempts,
            refine=refine,
            refine_gender=refine_gender,
            # The emulator and the images a local test serves live on loopback.
            fetch_allow=[*(fetch_allow or []), *(LOOPBACK if emulator else ())],
            fetch_timeout_s=fetch_timeout,
        )
        checks = check_run(params, emulator=emulator)
    except ValidationError as exc:
        _cannot_start(describe_invalid_params(exc))
    except ValueError as exc:  # a malformed --route
        _cannot_start(str(exc))
    except RunNotStarted as exc:
        _cannot_start(str(exc))

    from flows.batch import BatchIncomplete
    from flows.local_server import LocalServerError, prefect_api, secret_blocks_absent
    from flows.progress import watching

    blocks = [secret_block_name(name) for name in checks.missing_credentials]
    if blocks and secret_blocks_absent(blocks):
        # The local server's database holds no such block: say so now, no server to start.
        names = list(checks.missing_credentials)
        _cannot_start(missing_credentials_message(names, checks.needed_by, cli=True))

    show_progress = sys.stderr.isatty() if progress is None else progress
    with ExitStack() as stack:
        try:
            api = stack.enter_context(prefect_api(say=_say))
        except LocalServerError as exc:
            _cannot_start(str(exc))
        except KeyboardInterrupt:
            err.print(
                "[yellow]interrupted[/] while the local Prefect server was starting: nothing ran",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if checks.missing_credentials:  # a Prefect Secret block may hold them: one read each
            try:
                asyncio.run(check_secret_blocks(checks, cli=True))
            except RunNotStarted as exc:
                _cannot_start(str(exc))
        stack.enter_context(watching(RunLink(api, say=_say)))
        if emulator:
            err.print(f"emulator: serving every provider at {_start_emulator(stack)}")
        if show_progress:
            bar = Progress(
                TextColumn("[bold]try-on"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[bad]} not ok[/]"),
                TextColumn("{task.fields[rate]:.1f} rows/s"),
                TimeElapsedColumn(),
                console=err,
            )
            stack.enter_context(bar)
            _route_prefect_console_logs(stack, err)
            stack.enter_context(watching(RichProgress(bar)))
        from flows.batch import tryon_batch

        # The flow run still ends Failed in Prefect, with its traceback in its logs; the
        # terminal gets the explanation below instead.
        _quiet_console_tracebacks(stack, (BatchIncomplete, RunNotStarted))
        try:
            summary = asyncio.run(tryon_batch(params=params))
        except RunNotStarted as exc:
            _cannot_start(str(exc))
        except BatchIncomplete as exc:
            summary = exc.summary
        except KeyboardInterrupt:
            err.print(
                "[yellow]interrupted:[/] rows finished so far are kept in the lake; run the same "
                "command again to resume (finished rows are not sent to the provider again)",
                highlight=False,
                soft_wrap=True,  # one line, whatever the width: it is meant to be copied
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None

    _print_outcome(summary, api)
    raise typer.Exit(EXIT_OK if allow_row_errors else summary.exit_code)


def _cost(summary: RunSummary) -> str:
    """``0.45 USD (budget 1.00 USD)``; unknown when a price in play is."""
    currency = summary.currency
    unpriced = summary.unpriced or ["a provider"]
    hint = " ".join(f"--price {name}=AMOUNT" for name in summary.unpriced) or "--price"
    text = f"unknown (no price for {', '.join(unpriced)}: {hint})" if summary.cost is None else ""
    amount = "" if summary.cost is None else f"{summary.cost:.6f}".rstrip("0").rstrip(".")
    text = text or f"{amount} {currency}"
    if summary.budget is not None:
        text += f" (budget {summary.budget:g} {currency}"
        text += (
            ", reached: rows not started are BUDGET_EXHAUSTED)" if summary.budget_exhausted else ")"
        )
    return text


def _print_outcome(summary: RunSummary, api: PrefectApi) -> None:
    """Where everything is, the counts, and why rows did not succeed (top error codes)."""

    def line(text: str | Text) -> None:  # paths and messages are copied: never wrapped
        out.print(text, soft_wrap=True, highlight=False, markup=False)

    line(f"Results:  {summary.results_uri}")
    line(f"Metadata: {summary.metadata_uri}  (read with polars.scan_parquet)")
    line(f"Summary:  {summary.summary_uri}")
    if summary.currency is not None:
        line(f"Cost:     {_cost(summary)}")
    if summary.fatal_error:
        after = f" ({summary.fell_back} rows went on to a fallback)" if summary.fell_back else ""
        line(Text.assemble(("Stopped calling: ", "red"), summary.fatal_error, after))
    line(Text(summary.one_line(), style="bold"))
    if summary.top_errors:
        line("Why rows did not succeed (top error codes, one example each):")
        for error in summary.top_errors[:TOP_ERRORS_SHOWN]:
            line(Text.assemble("  ", error.describe()))
        more = len(summary.top_errors) - TOP_ERRORS_SHOWN
        if more > 0:
            line(f"  ... and {more} more error codes (summary.json)")
    if summary.contact_sheet_uri:
        every_row = " (every row, with its message)" if summary.top_errors else ""
        line(f"Contact sheet{every_row}: {summary.contact_sheet_uri}")
    if link := api.flow_run_url(summary.run_id):
        line(f"Prefect UI: {link}")


@app.command()
def validate(
    manifest: Annotated[str, typer.Argument(help="Manifest: CSV/Parquet path or fsspec URL.")],
    provider: Annotated[
        str | None,
        typer.Option(
            help="Also check what this provider can take (rows naming their own provider: "
            "theirs), as `tryon run --provider` does.",
        ),
    ] = None,
    route: RouteOption = None,
    fallback: FallbackOption = None,
    compare: CompareOption = None,
    refine: Annotated[
        bool, typer.Option("--refine", help="Also check the refiner's needs, as `run --refine`.")
    ] = False,
    refine_gender: Annotated[
        str | None, typer.Option(help="woman|man, for rows without a gender (refiner).")
    ] = None,
    check_files: Annotated[
        bool,
        typer.Option(
            "--check-files/--no-check-files",
            help="Check local image files exist, as `tryon run` does (off: when the run will "
            "read them on another machine).",
        ),
    ] = True,
) -> None:
    """Check a manifest and print every bad row with its reason. With --provider (and
    --refine), exactly the rows `tryon run` with the same options records invalid.

    Rows are numbered from 1, the first row under the header (the lake's row_index is one
    less)."""
    from providers.registry import PROVIDERS, provider_spec
    from schemas.manifest import ManifestError, plural
    from tasks.manifest import load_manifest
    from tasks.plan import plan_run

    try:
        if refine and provider is None:
            raise ValueError("--refine needs --provider (the provider `tryon run` would use)")
        if refine_gender not in (None, "woman", "man"):
            raise ValueError(f"--refine-gender must be woman or man, not {refine_gender!r}")
        name = provider_spec(provider).name if provider is not None else None
        routes = {c: provider_spec(p).name for c, p in parse_routes(route).items()}
        extra = [provider_spec(p).name for p in [*(fallback or []), *(compare or [])]]
        if (routes or extra) and name is None:
            raise ValueError("--route, --fallback and --compare need --provider, as to run")
    except ValueError as exc:
        err.print(f"[red]cannot check:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_NOT_STARTED) from None
    try:
        report = load_manifest(manifest, known_providers=sorted(PROVIDERS), check_files=check_files)
    except ManifestError as exc:
        err.print(f"[red]manifest unusable:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_NOT_STARTED) from None

    invalid, valid = report.invalid, len(report.valid)
    if name is not None:
        plan = plan_run(
            report,
            default_provider=name,
            refine=refine,
            refine_gender=refine_gender,
            route=routes,
            compare=[provider_spec(p).name for p in compare or []],
            fallback=[provider_spec(p).name for p in fallback or []],
        )
        invalid, valid = plan.invalid, plan.runnable_rows
    _print_invalid_rows(invalid)
    out.print(f"{plural(report.n_rows, 'row')}: {valid} valid, {len(invalid)} invalid")
    for line in plan.provider_lines() if name is not None else []:
        out.print(line, markup=False)
    if report.ignored_columns:
        ignored = ", ".join(map(repr, report.ignored_columns))
        out.print(f"ignored columns: {ignored}", markup=False)
    if name is None:
        out.print("provider capabilities not checked: pass --provider (and --refine) as to run")
    raise typer.Exit(EXIT_OK if not invalid else EXIT_ROWS)


def parse_routes(values: list[str] | None) -> dict[str, str]:
    """``--route CATEGORY=PROVIDER`` options -> {category: provider} (checked by BatchParams)."""
    routes: dict[str, str] = {}
    for value in values or []:
        category, sep, provider = value.partition("=")
        if not (sep and category.strip() and provider.strip()):
            raise ValueError(f"--route {value!r}: expected CATEGORY=PROVIDER, e.g. dresses=hidream")
        routes[category.strip()] = provider.strip()
    return routes


@app.command("plan")
def plan_cmd(
    manifest: Annotated[str, typer.Argument(help="Manifest: CSV/Parquet path or fsspec URL.")],
    lake: Annotated[str, typer.Option(help="Lake root: folder or fsspec URL.")] = "./lake",
    provider: Annotated[str, typer.Option(help="Provider for rows naming none.")] = "changeclothes",
    route: RouteOption = None,
    fallback: FallbackOption = None,
    compare: CompareOption = None,
    price: PriceOption = None,
    currency: Annotated[str, typer.Option(help="Currency of prices.")] = "USD",
    max_in_flight: Annotated[
        int | None, typer.Option(help="Provider calls in flight (default: provider's).")
    ] = None,
    rps: Annotated[float | None, typer.Option(help="Provider requests per second.")] = None,
    refine: Annotated[
        bool, typer.Option("--refine", help="Chain the AILabTools refiner onto each result.")
    ] = False,
    refine_gender: Annotated[
        str | None, typer.Option(help="woman|man, for rows without a gender (refiner).")
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="table (default), or json for scripts.")
    ] = "table",
) -> None:
    """What a run with these options would do and cost, before it runs: rows to do and already
    done in the lake, calls, cost and time, per provider and stage. No provider is called and
    no image fetched."""
    from pydantic import ValidationError

    from flows.estimate import estimate_for
    from flows.params import BatchParams
    from flows.preflight import describe_invalid_params
    from schemas.summary import RunNotStarted
    from tasks.money import parse_prices

    try:
        if output_format not in ("table", "json"):
            raise ValueError(f"--format must be table or json, not {output_format!r}")
        params = BatchParams(
            manifest=manifest,
            lake=lake,
            provider=provider,
            route=parse_routes(route),
            fallback=fallback or [],
            compare=compare or [],
            prices={
                k: float(v)
                for k, v in parse_prices(" ".join(price or []), option="--price").items()
            },
            currency=currency,
            limits={"max_in_flight": max_in_flight, "requests_per_second": rps},
            refine=refine,
            refine_gender=refine_gender,
        )
        estimate = estimate_for(params)
    except ValidationError as exc:
        _cannot_start(describe_invalid_params(exc))
    except (ValueError, RunNotStarted) as exc:
        _cannot_start(str(exc))
    if output_format == "json":
        out.print_json(json.dumps(estimate.to_json()))
        return
    out.print(_estimate_table(estimate))
    invalid = len(estimate.plan.invalid)
    if invalid:
        out.print(f"{invalid} invalid rows: nothing is paid for them (tryon validate lists them)")
    cost = "unknown (a provider's price is unknown: --price P=AMOUNT)"
    if estimate.cost is not None:
        cost = f"{estimate.cost:.4f}".rstrip("0").rstrip(".") + f" {estimate.currency}"
    duration = "unknown (no recorded calls in the lake)"
    if estimate.seconds is not None:
        duration = f"about {_uptime(estimate.seconds)}"
    out.print(f"Estimate: {estimate.calls} calls, cost {cost}, {duration}", markup=False)
    out.print(
        "Retries and fallbacks are not counted (a fallback line is its most); an image "
        'changed in place under the same URI is counted done. See README "Money".',
        markup=False,
    )


def _estimate_table(estimate: Any) -> Table:
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    headings = ("provider", "stage", "track", "rows", "done", "to do", "calls", "price", "cost")
    names = estimate.lines["provider"].to_list() + estimate.lines["track"].to_list()
    for heading in (*headings, "time"):
        text = heading in headings[:3]
        # Names are never cut: a terminal too narrow wraps the table's lines instead.
        width = max(map(len, [heading, *names])) if text else None
        table.add_column(heading, justify="left" if text else "right", min_width=width)
    for line in estimate.lines.iter_rows(named=True):
        price = "unknown" if line["price"] is None else f"{line['price']:g}"
        cost = "unknown" if line["cost"] is None else f"{line['cost']:.4f}".rstrip("0").rstrip(".")
        took = "-" if line["seconds"] is None else _uptime(line["seconds"])
        table.add_row(
            *(Text(str(line[k])) for k in ("provider", "stage", "track")),
            *(str(line[k]) for k in ("rows", "done", "to_do", "calls")),
            price,
            cost,
            took,
        )
    return table


def _print_invalid_rows(invalid: InvalidRows) -> None:
    """A table on a terminal; otherwise one line per row, never wrapped (logs are grepped,
    and paths in them copied)."""
    from schemas.manifest import plural

    if not invalid:
        return
    if not out.is_terminal:
        # Straight to the file: Rich's print costs ~0.3 ms a call, 30 s for 100,000 rows.
        out.file.write("".join(f"{line}\n" for line in invalid.lines()))
        return
    table = Table(title=plural(len(invalid), "invalid row"))
    table.add_column("row", justify="right")
    table.add_column("id")
    table.add_column("reason", overflow="fold")
    for bad in invalid:
        # Text, not markup: a reason quotes the manifest, which may hold '[...]'.
        label = Text(bad.row_id) if bad.row_id is not None else Text("(no id)", style="dim")
        table.add_row(str(bad.row_number), label, Text(bad.message))
    out.print(table)


@app.command("emulator")
def emulator_cmd(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    latency: Annotated[
        float | None, typer.Option(help="Added latency per provider call, every provider (s).")
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            help="PROVIDER.FIELD=VALUE (or all.FIELD=VALUE), repeatable: latency_s, "
            "error_rate_5xx, error_rate_429, retry_after_s, timeout_rate, credits, "
            "forced_codes, job_queued_s, job_running_s, async_failure_rate ..."
        ),
    ] = None,
    result_ttl: Annotated[float, typer.Option(help="Seconds a result URL stays valid.")] = 3600,
    seed: Annotated[int, typer.Option(help="Seed of the fault draws.")] = 0,
    fast_mode: Annotated[
        bool, typer.Option("--fast-mode", help="Pre-rendered results: tiny CPU per call.")
    ] = False,
) -> None:
    """Serve the providers' protocols locally (see README for keys and routes)."""
    from emulator.app import PROVIDER_ROUTES
    from emulator.config import faults_from_options
    from emulator.server import EmulatorConfig, serve
    from emulator.stats import STATS_PATH

    try:
        faults = faults_from_options(
            fault or [], providers=list(PROVIDER_ROUTES), latency_s=latency
        )
        config = EmulatorConfig(
            result_ttl_s=result_ttl, faults=faults, seed=seed, fast_mode=fast_mode
        )
    except ValueError as exc:
        err.print(f"[red]bad option:[/] {exc}")
        raise typer.Exit(EXIT_NOT_STARTED) from None
    err.print(f"emulator on http://{host}:{port}  (stats: {STATS_PATH})")
    serve(config, host=host, port=port)


server_app = typer.Typer(
    no_args_is_help=True,
    short_help="Start, stop or check the local Prefect server (without PREFECT_API_URL).",
    help="The local Prefect server `tryon run` uses (and starts) when PREFECT_API_URL is not "
    "set: one per Prefect home, on 127.0.0.1, with the UI; it keeps running between commands.",
)
app.add_typer(server_app, name="server")


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def _api_url_note() -> None:
    from prefect.settings import get_current_settings

    if url := get_current_settings().api.url:
        _say(f"note: PREFECT_API_URL is set ({url}): `tryon run` uses that server, not this one")


def _show(line: str) -> None:
    """One line on stdout as it is (no markup), never wrapped."""
    out.print(line, markup=False, highlight=False, soft_wrap=True)


def _failed(what: str, exc: Exception) -> None:
    err.print(f"[red]{what}:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


@server_app.command("start")
def server_start(
    port: Annotated[
        int | None,
        typer.Option(
            help="Port on 127.0.0.1. Default: PREFECT_SERVER_API_PORT (4200), or a free port "
            "if that one is taken by another program."
        ),
    ] = None,
) -> None:
    """Start the local Prefect server in the background, unless it is running already."""
    from flows.local_server import LocalServerError, ensure_server, prefect_home

    try:
        state, started = ensure_server(home=prefect_home(), port=port, say=_say)
    except LocalServerError as exc:
        _failed("cannot start", exc)
        raise typer.Exit(EXIT_NOT_STARTED) from None
    _show(f"{'started' if started else 'already running'}: {state.url}  (pid {state.pid})")
    _show(f"log:      {state.log}")
    _api_url_note()


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server (runs still using it lose their connection to it)."""
    from flows.local_server import LocalServerError, prefect_home, stop_server

    try:
        state, clean = stop_server(prefect_home())
    except LocalServerError as exc:
        _failed("cannot stop", exc)
        raise typer.Exit(EXIT_NOT_STARTED) from None
    if state is None:
        _show("not running")
    else:
        how = "stopped" if clean else "killed (it did not stop on SIGTERM)"
        _show(f"{how}: {state.url}  (pid {state.pid})")


@server_app.command("status")
def server_status() -> None:
    """Say whether the local Prefect server runs (URL, pid, uptime, log); exit 1 if not."""
    from flows.local_server import LOG_NAME, lock_is_held, prefect_home, read_state, running_server

    home = prefect_home()
    state = read_state(home)
    if state is not None and state.is_alive():
        answering = running_server(home) is not None
        _show(f"running:  {state.url}  (API {state.api_url})")
        uptime = _uptime(state.uptime_s())
        _show(f"pid:      {state.pid}, up {uptime}, prefect {state.prefect_version}")
        _show(f"home:     {home}")
        _show(f"log:      {state.log}")
        if not answering:
            _say(f"warning: it does not answer at {state.api_url}/health (see its log)")
        _api_url_note()
        raise typer.Exit(EXIT_OK if answering else EXIT_ROWS)
    if lock_is_held(home):
        _show("not running yet: another command is starting (or stopping) it")
    elif state is not None:
        _show(f"not running (its last pid, {state.pid}, is gone: the next start replaces it)")
    else:
        _show("not running")
    _show(f"home:     {home}")
    if (home / LOG_NAME).exists():
        _show(f"log:      {home / LOG_NAME}  (of the last server)")
    _api_url_note()
    raise typer.Exit(EXIT_ROWS)


if TYPE_CHECKING:
    import polars as pl

SCORE_FORMATS = ("table", "csv", "json")


def _storage_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as fsspec options; a VALUE that parses as JSON is taken as such
    (``client_kwargs={"region_name": "eu-west-1"}``, ``anon=true``), else as a string."""
    import json

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--storage-option {pair!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


# Terminal headings: narrow, so a run's scorecard fits 80 columns (the page has room for
# SCORE_HEADINGS' longer ones).
_SCORE_TERMINAL_HEADINGS = {
    "succeeded": "ok",
    "failed_by_code": "codes",
    "fallbacks_out": "fb out",
    "fallbacks_in": "fb in",
}


def _score_table(score: pl.DataFrame, where: str) -> Table:
    """The scorecard for people: columns zero in every row (and records, when they are the
    rows) are left out, so it fits a terminal; CSV and JSON keep every column."""
    from rich import box

    from tasks.scorecard import SCORE_HEADINGS, scorecard_text_rows

    rows = scorecard_text_rows(score)
    optional = ("failed", "skipped", "invalid", "fallbacks_out", "fallbacks_in")
    shown = [
        name
        for name in SCORE_HEADINGS
        if name in score.columns
        and not (name in optional and all(row[name] == "0" for row in rows))
        and not (name == "failed_by_code" and not any(row[name] for row in rows))
        and not (name == "cost" and all(row[name] == "-" for row in rows))
        and not (name == "records" and all(row["records"] == row["rows"] for row in rows))
    ]
    table = Table(
        title=f"Scorecard: {where}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        pad_edge=False,
        collapse_padding=True,
    )
    for name in shown:
        heading = _SCORE_TERMINAL_HEADINGS.get(name, SCORE_HEADINGS[name])
        words = [*heading.split(), *(word for row in rows for word in row[name].split())]
        text = name in ("run_id", "provider", "stage", "failed_by_code")
        table.add_column(
            heading,
            justify="left" if text else "right",
            # Never narrower than its longest word: a name or a number is never cut in two
            # (a terminal too narrow for the table wraps its lines instead).
            min_width=max(map(len, words)),
        )
    for row in rows:  # Text, not markup: codes may hold '[...]'
        table.add_row(*(Text(row[name]) for name in shown))
    return table


@app.command("scorecard")
def scorecard_cmd(
    lake: Annotated[str, typer.Argument(help="Lake root: folder or fsspec URL.")],
    runs: Annotated[
        list[str] | None, typer.Option("--run", help="Only this run (repeatable).")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Records started at or after this (ISO 8601; UTC unless it says)."),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Records started before this (ISO 8601; UTC unless it says).")
    ] = None,
    categories: Annotated[
        list[str] | None, typer.Option("--category", help="Only this category (repeatable).")
    ] = None,
    by_run: Annotated[bool, typer.Option("--by-run", help="A row per run as well.")] = False,
    output_format: Annotated[
        str, typer.Option("--format", help="table (default), or csv or json for scripts.")
    ] = "table",
    storage_option: Annotated[
        list[str] | None,
        typer.Option(
            "--storage-option",
            help="KEY=VALUE fsspec option for the lake, repeatable (VALUE as JSON if it parses).",
        ),
    ] = None,
) -> None:
    """Per provider and stage, over the lake's committed runs: rows, outcomes, failures by
    code, provider calls, provider time p50/p95 and fallbacks. A record's time is its start
    (its run's start when it never started). Exit 1 if a --run is not committed in the lake."""
    import json

    from tasks.lake import Lake
    from tasks.scorecard import (
        filter_records,
        parse_time,
        read_committed,
        scorecard,
        scorecard_flat,
    )

    try:
        if output_format not in SCORE_FORMATS:
            raise ValueError(f"--format {output_format!r}: one of {', '.join(SCORE_FORMATS)}")
        start, end = parse_time(since, "--since"), parse_time(until, "--until")
        opened = Lake.open(lake, storage_options=_storage_options(storage_option or []))
        committed = read_committed(opened, runs=runs)
    except ValueError as exc:
        _failed("cannot report", exc)
        raise typer.Exit(EXIT_NOT_STARTED) from None
    except OSError as exc:
        _failed(f"cannot read the lake {lake}", exc)
        raise typer.Exit(EXIT_NOT_STARTED) from None
    for run_id in committed.not_committed:
        _say(f"not a committed run in {opened.uri}: {run_id}")
    if committed.skipped:
        _say(f"left out, published but not committed: {', '.join(committed.skipped)}")
    records = filter_records(
        committed.records,
        since=start,
        until=end,
        categories=categories,
        run_starts=committed.run_starts,
    )
    score = scorecard(records, by_run=by_run)
    if output_format == "csv":
        out.file.write(scorecard_flat(score).write_csv())
    elif output_format == "json":
        out.file.write(json.dumps(score.to_dicts(), indent=2) + "\n")
    else:
        out.print(_score_table(score, f"{len(committed.runs)} committed run(s) in {opened.uri}"))
    raise typer.Exit(EXIT_ROWS if committed.not_committed else EXIT_OK)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
