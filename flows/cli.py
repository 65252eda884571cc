"""`tryon`: run a batch, validate a manifest, serve the emulator or manage the local Prefect
server, from the shell.

Exit status (for schedulers): 0 every valid row succeeded; 1 some rows failed, were skipped or
were invalid; 2 the run could not start (bad manifest, unknown provider, missing key, lake).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Annotated, Any

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
err = Console(stderr=True)
out = Console()

EXIT_OK, EXIT_ROWS, EXIT_NOT_STARTED = 0, 1, 2
# 128 + SIGINT, as shells report a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130


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
    import logging

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


@app.command()
def run(
    manifest: Annotated[str, typer.Argument(help="Manifest: CSV/Parquet path or fsspec URL.")],
    lake: Annotated[str, typer.Option(help="Lake root: folder or fsspec URL.")] = "./lake",
    provider: Annotated[str, typer.Option(help="Provider for rows naming none.")] = "changeclothes",
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
    from flows.batch import BatchIncomplete, BatchParams, RunNotStarted
    from flows.progress import watching
    from tasks.fetch_guard import LOOPBACK

    try:
        params = BatchParams(
            manifest=manifest,
            lake=lake,
            provider=provider,
            chunk_size=chunk_size,
            limits={"max_in_flight": max_in_flight, "requests_per_second": rps},
            max_attempts=max_attempts,
            refine=refine,
            refine_gender=refine_gender,
            # The emulator and the images a local test serves live on loopback.
            fetch_allow=[*(fetch_allow or []), *(LOOPBACK if emulator else ())],
            fetch_timeout_s=fetch_timeout,
        )
    except ValueError as exc:
        err.print(f"[red]cannot start:[/] {exc}")
        raise typer.Exit(EXIT_NOT_STARTED) from None

    from flows.local_server import LocalServerError, prefect_api

    show_progress = sys.stderr.isatty() if progress is None else progress
    with ExitStack() as stack:
        try:
            api = stack.enter_context(prefect_api(say=_say))
        except LocalServerError as exc:
            _failed("cannot start", exc)
            raise typer.Exit(EXIT_NOT_STARTED) from None
        except KeyboardInterrupt:
            err.print(
                "[yellow]interrupted[/] while the local Prefect server was starting: nothing ran",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
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

        try:
            summary = asyncio.run(tryon_batch(params=params))
        except RunNotStarted as exc:
            err.print(f"[red]cannot start:[/] {exc}")
            raise typer.Exit(EXIT_NOT_STARTED) from None
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

    out.print(f"Results:  {summary.results_uri}")
    out.print(f"Metadata: {summary.metadata_uri}  (read with polars.scan_parquet)")
    out.print(f"Summary:  {summary.summary_uri}")
    if summary.contact_sheet_uri:
        out.print(f"Contact sheet: {summary.contact_sheet_uri}")
    if summary.fatal_error:
        out.print(f"[red]Stopped early:[/] {summary.fatal_error}")
    out.print(f"[bold]{summary.one_line()}[/]")
    if link := api.flow_run_url(summary.run_id):
        _show(f"Prefect UI: {link}")
    code = summary.exit_code
    raise typer.Exit(EXIT_OK if allow_row_errors else code)


@app.command()
def validate(
    manifest: Annotated[str, typer.Argument(help="Manifest: CSV/Parquet path or fsspec URL.")],
) -> None:
    """Check a manifest and print every bad row with its reason."""
    from providers.registry import PROVIDERS
    from schemas.manifest import ManifestError
    from tasks.manifest import load_manifest

    try:
        report = load_manifest(manifest, known_providers=sorted(PROVIDERS))
    except ManifestError as exc:
        err.print(f"[red]manifest unusable:[/] {exc}")
        raise typer.Exit(EXIT_NOT_STARTED) from None
    if report.invalid:
        table = Table(title=f"{len(report.invalid)} invalid rows")
        table.add_column("row", justify="right")
        table.add_column("id")
        table.add_column("reason")
        for row in report.invalid:
            table.add_row(str(row.row_index + 1), str(row.row_id), row.message)  # 1-based
        out.print(table)
    out.print(report.summary())
    raise typer.Exit(EXIT_OK if not report.invalid else EXIT_ROWS)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
