"""API keys never appear in logs, metadata, artifacts, exception text or the contact sheet.

Every provider runs with distinctive canary keys against an emulator that quotes a rejected
credential back in its error text (``EmulatorConfig.echo_credentials``, as careless vendors
do), so the clients' redaction of error text is what keeps the key out. Runs that succeed,
runs refused for a wrong key, runs with injected faults and a run stopped by a credit error
(whose message also quotes the key) are all captured: every Python log record at DEBUG
(httpx and aiohttp included), Prefect's logs, artifacts, flow and task runs, every file under
the lakes (Parquet decoded, PNG text chunks, images embedded in the HTML), the exceptions
(str, repr, the chained traceback and attributes) and the `tryon run` CLI's stdout/stderr. The
canaries, their URL-encoded and base64 forms, and the random tag every canary carries, must
appear nowhere.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx
import polars as pl
import pytest
from PIL import Image

from emulator.server import EmulatorConfig, EmulatorServer
from flows.batch import BatchIncomplete, BatchParams, RunSummary, tryon_batch
from providers.registry import BUILT_IN
from providers.settings import base_url_env
from tests.flows.conftest import REPO, SAMPLE_MANIFEST

pytestmark = pytest.mark.e2e

TAG = uuid.uuid4().hex[:16]  # in every canary: a partial (truncated) leak still shows it
ACCEPTED = {
    "CHANGECLOTHES_API_KEY": f"cc-{TAG}+canary/accepted=",
    "TENCENTCLOUD_SECRET_ID": f"AKID{TAG}canaryaccepted",
    "TENCENTCLOUD_SECRET_KEY": f"tc-{TAG}+canary/accepted=",
    "HIDREAM_API_KEY": f"hd-{TAG}+canary/accepted=",
    "AILAB_API_KEY": f"al-{TAG}+canary/accepted=",
}
WRONG = {name: value.replace("accepted", "wrong") for name, value in ACCEPTED.items()}


def leak_patterns() -> list[str]:
    """Every form a canary could take in text: as is, URL-encoded, base64 (at any byte
    alignment, so also inside a longer encoded string), and the bare tag."""
    patterns = {TAG}
    for secret in [*ACCEPTED.values(), *WRONG.values()]:
        patterns |= {secret, quote(secret, safe=""), quote_plus(secret)}
        raw = secret.encode()
        for shift in range(3):
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                encoded = encode(b"\0" * shift + raw).decode()
                # Only the characters that depend on the secret alone.
                start = 4 if shift else 0
                patterns.add(encoded[start:-4])
    return sorted(patterns, key=len, reverse=True)


PATTERNS = leak_patterns()


def find_leaks(where: str, text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [f"{where}: {p!r}" for p in PATTERNS if p in text]


class Collector(logging.Handler):
    """Every record, formatted with its traceback, from every logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
            self.lines.append(repr(record.args))
        except Exception as exc:  # a record that cannot be formatted is still looked at
            self.lines.append(f"{record.name} unformattable {exc!r} {record.msg!r}")


@pytest.fixture
def all_logs() -> Iterator[Collector]:
    """DEBUG everywhere: root, and every logger that does not propagate (Prefect's)."""
    collector = Collector()
    names = ["", "httpx", "httpcore", "aiohttp", "providers", "tasks", "flows", "prefect"]
    names += list(logging.root.manager.loggerDict)
    saved: list[tuple[logging.Logger, int]] = []
    for name in dict.fromkeys(names):
        logger = logging.getLogger(name)
        if name and logger.propagate and name not in ("httpx", "httpcore", "aiohttp"):
            continue
        saved.append((logger, logger.level))
        logger.setLevel(logging.DEBUG)
        logger.addHandler(collector)
    try:
        yield collector
    finally:
        for logger, level in saved:
            logger.removeHandler(collector)
            logger.setLevel(level)


@pytest.fixture(scope="module")
def echo_emulator() -> Iterator[EmulatorServer]:
    """Accepts the ``ACCEPTED`` canaries; quotes any rejected credential in its error."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in ACCEPTED.items():
            env.setenv(name, value)
        server = EmulatorServer.start(EmulatorConfig(echo_credentials=True))
    yield server
    server.stop()


@pytest.fixture
def emulator(echo_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> EmulatorServer:
    for provider in BUILT_IN:
        monkeypatch.setenv(base_url_env(provider), echo_emulator.base_url)
    echo_emulator.control.reset(faults=True)
    quick = {"job_queued_s": 0.0, "job_running_s": 0.0}
    echo_emulator.control.set_faults({"hidream": quick, "ailab": quick})
    return echo_emulator


def use_keys(monkeypatch: pytest.MonkeyPatch, keys: dict[str, str]) -> None:
    for name, value in keys.items():
        monkeypatch.setenv(name, value)


def manifest(tmp_path: Path, n: int) -> str:
    images = SAMPLE_MANIFEST.parent / "images"
    garments = ["garment_red_tee.jpg", "garment_striped_tee.jpg", "garment_green_tee.png"]
    rows = [
        {
            "id": f"r{i:02d}",
            "person_image": str(images / ["person_ana.jpg", "person_ben.jpg"][i % 2]),
            "garment_image": str(images / garments[i % 3]),
            "category": "upper_body",
            "garment_description": f"look {i}",
            "gender": "woman",
        }
        for i in range(n)
    ]
    path = tmp_path / f"m{n}-{uuid.uuid4().hex[:6]}.csv"
    pl.DataFrame(rows).write_csv(path)
    return str(path)


class Run:
    """One flow run's outcome: its lake, summary and exception (if it ended in one)."""

    def __init__(self, name: str, lake: Path) -> None:
        self.name = name
        self.lake = lake
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None


async def run(name: str, tmp_path: Path, n: int, **params: object) -> Run:
    outcome = Run(name, tmp_path / f"lake-{name}")
    try:
        outcome.summary = await tryon_batch(
            BatchParams(manifest=manifest(tmp_path, n), lake=str(outcome.lake), **params)
        )
    except BatchIncomplete as exc:
        outcome.error, outcome.summary = exc, exc.summary
    except Exception as exc:
        outcome.error = exc
    return outcome


# -- what a run left behind ------------------------------------------------------------------


def exception_texts(exc: BaseException) -> Iterator[tuple[str, str]]:
    yield "traceback", "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield "str", str(current)
        yield "repr", repr(current)
        yield "args", repr(current.args)
        yield "attributes", repr(getattr(current, "__dict__", {}))
        current = current.__cause__ or current.__context__


def png_texts(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return repr(image.info) + repr(getattr(image, "text", {}))


_DATA_URI = re.compile(rb"data:image/[a-z]+;base64,([A-Za-z0-9+/=]+)")


def lake_leaks(lake: Path) -> Iterator[str]:
    for path in sorted(p for p in lake.rglob("*") if p.is_file()):
        data = path.read_bytes()
        yield from find_leaks(str(path), data)
        if path.suffix == ".parquet":
            frame = pl.read_parquet(path)
            yield from find_leaks(f"{path} (decoded)", frame.write_json())
        elif data.startswith(b"\x89PNG"):
            yield from find_leaks(f"{path} (PNG text)", png_texts(data))
        elif path.suffix == ".html":
            for match in _DATA_URI.finditer(data):
                try:
                    embedded = base64.b64decode(match[1])
                except binascii.Error:
                    continue
                yield from find_leaks(f"{path} (embedded image)", embedded)
                if embedded.startswith(b"\x89PNG"):
                    yield from find_leaks(f"{path} (embedded PNG text)", png_texts(embedded))


async def prefect_texts(since: float) -> Iterator[tuple[str, str]]:
    from prefect import get_client

    texts: list[tuple[str, str]] = []
    async with get_client() as client:
        offset = 0
        while True:
            logs = await client.read_logs(limit=200, offset=offset)
            texts += [("prefect log", log.model_dump_json()) for log in logs]
            if len(logs) < 200:
                break
            offset += 200
        for artifact in await client.read_artifacts():
            texts.append((f"artifact {artifact.key}", artifact.model_dump_json()))
        # The runs' events (payloads: counts, errors, lake) as far as the server stored them.
        from prefect.events.filters import EventFilter, EventNameFilter

        events = await client.read_events(
            filter=EventFilter(event=EventNameFilter(prefix=["tryon.run."])), limit=50
        )
        texts += [(f"event {e.event}", e.model_dump_json()) for e in events.events]
        for flow_run in await client.read_flow_runs(limit=200):
            texts.append((f"flow run {flow_run.name}", flow_run.model_dump_json()))
            states = await client.read_flow_run_states(flow_run.id)
            texts += [("flow run state", s.model_dump_json()) for s in states]
        offset = 0
        while True:
            task_runs = await client.read_task_runs(limit=200, offset=offset)
            texts += [(f"task run {t.name}", t.model_dump_json()) for t in task_runs]
            if len(task_runs) < 200:
                break
            offset += 200
    return iter(texts)


def stored_results(since: float) -> Iterator[str]:
    """Files Prefect may have persisted (results) during the test."""
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH

    for folder in {Path(PREFECT_LOCAL_STORAGE_PATH.value()), Path(PREFECT_HOME.value())}:
        if not folder.is_dir():
            continue
        for path in folder.rglob("*"):
            try:
                stat = path.stat()
                if path.is_file() and stat.st_mtime >= since and stat.st_size < 50 * 1024**2:
                    yield from find_leaks(str(path), path.read_bytes())
            except OSError:
                continue


def tryon_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    full = {k: v for k, v in os.environ.items() if not k.startswith("TRYON_")}
    full |= env
    full["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    full["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- the test ---------------------------------------------------------------------------------


def test_the_canaries_are_found_where_they_are_put() -> None:
    """The detector itself: each form of a canary is recognised, also inside other text."""
    secret = WRONG["HIDREAM_API_KEY"]
    for shift in range(3):
        hidden = base64.b64encode(b"Bearer "[:shift] + b":" + secret.encode()).decode()
        assert find_leaks("t", f"x{hidden}y")
    assert find_leaks("t", quote(secret, safe=""))
    assert find_leaks("t", f"key {secret[:20]}... (truncated)")  # the tag survives a cut
    assert not find_leaks("t", "API key '***' was not accepted")


# Named ids: the canaries are random, and test ids must be the same in every process.
@pytest.mark.parametrize(
    "secret",
    [WRONG["AILAB_API_KEY"], f"k-{TAG}\n", f"k'{TAG}\"\t"],
    ids=["vendor-key", "newline", "quotes-tab"],
)
def test_redaction_covers_the_forms_a_message_quotes_a_secret_in(secret: str) -> None:
    from providers.common import redact_secrets

    texts = [
        f"key {secret} refused",
        f"Illegal header value {(b'Bearer ' + secret.encode())!r}",
        f"{secret!r}",
        json.dumps({"msg": f"token {secret}"}),
        f"https://h/x?key={quote_plus(secret)}&k2={quote(secret, safe='')}",
    ]
    for text in texts:
        redacted = redact_secrets(text, [secret])
        assert "***" in redacted and not find_leaks("redacted", redacted), redacted


@pytest.mark.parametrize("key", [f"cc-{TAG}\n", f" cc-{TAG} "], ids=["newline", "spaces"])
async def test_a_key_httpx_refuses_to_send_is_not_quoted_back(
    echo_emulator: EmulatorServer, key: str
) -> None:
    """A key read from a file keeps its newline; h11 then refuses the header, quoting it."""
    from pydantic import SecretStr

    from providers.base import ProviderError, TryOnRequest
    from providers.changeclothes.client import ChangeClothesClient
    from tests.images import garment_jpeg, person_jpeg, prepared

    request = TryOnRequest(
        row_id="r", person=prepared(person_jpeg()), garment=prepared(garment_jpeg()),
        category="upper_body",
    )  # fmt: skip
    async with httpx.AsyncClient() as http:  # any injected client, not only the project's
        client = ChangeClothesClient(
            http=http, api_key=SecretStr(key), base_url=echo_emulator.base_url
        )
        with pytest.raises(ProviderError) as caught:
            await client.try_on(request)
    leaks = [
        leak for where, text in exception_texts(caught.value) for leak in find_leaks(where, text)
    ]
    assert leaks == []


async def test_no_key_appears_anywhere_a_run_leaves_text(
    emulator: EmulatorServer,
    all_logs: Collector,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    since = time.time()
    runs: list[Run] = []
    one_at_a_time = {"max_in_flight": 1}

    # Accepted keys: every provider succeeds, with the refiner chained on.
    use_keys(monkeypatch, ACCEPTED)
    for provider in BUILT_IN:
        runs.append(await run(f"ok-{provider}", tmp_path, 2, provider=provider, refine=True))

    # Injected faults recorded in metadata, then a credit error (quoting the key) stops it.
    emulator.control.set_faults(
        {
            "changeclothes": {"forced_codes": [500, 10005, 20001, 10004], "credits": 3},
            "hidream": {
                "forced_codes": [500, "task_status:3"],
                "job_queued_s": 0,
                "job_running_s": 0,
            },
            # AILab's balance is checked before a run: enough for the plan (10 a try-on).
            "ailab": {"forced_codes": ["ERROR_INVALID_PARAMETER"], "credits": 30},
        }
    )
    runs.append(await run("faults-cc", tmp_path, 6, limits=one_at_a_time, max_attempts=2))
    runs.append(await run("faults-hd", tmp_path, 3, provider="hidream", limits=one_at_a_time))
    runs.append(await run("faults-al", tmp_path, 3, provider="ailab", limits=one_at_a_time))

    # Wrong keys: each provider refuses them, quoting them back.
    use_keys(monkeypatch, WRONG)
    for provider in BUILT_IN:
        runs.append(await run(f"wrong-{provider}", tmp_path, 2, provider=provider))
    # A wrong refiner key only: the try-on succeeds, the refiner is refused.
    use_keys(monkeypatch, ACCEPTED)
    monkeypatch.setenv("AILAB_API_KEY", WRONG["AILAB_API_KEY"])
    runs.append(await run("wrong-refiner", tmp_path, 2, refine=True))

    # The runs did what they are here for (else the test proves nothing).
    outcome = {r.name: r for r in runs}
    for provider in BUILT_IN:
        assert outcome[f"ok-{provider}"].error is None, outcome[f"ok-{provider}"].error
    fatal = {name: r.summary.fatal_error if r.summary else None for name, r in outcome.items()}
    for provider in BUILT_IN:
        assert outcome[f"wrong-{provider}"].error is not None
        if provider == "ailab":  # refused before the run, by the balance check (key quoted)
            assert "credit balance" in str(outcome["wrong-ailab"].error)
        else:
            assert fatal[f"wrong-{provider}"], provider
    assert "INSUFFICIENT_CREDITS" in (fatal["faults-cc"] or "")
    stats = emulator.control.stats()
    assert stats.provider("changeclothes").errors.get("30001", 0) >= 1
    assert stats.provider("hidream").errors.get("40102", 0) >= 1
    assert stats.provider("tencent").errors.get("AuthFailure.SecretIdNotFound", 0) >= 1
    assert stats.provider("ailab").errors.get("ERROR_APPLICATIONS_NOT_EXISTS", 0) >= 1
    # And the echo was really there to be redacted: the error texts show where it was.
    wrote = [r for r in runs if any(Path(r.lake).glob("metadata/**/*.parquet"))]
    failed = pl.concat(
        [pl.scan_parquet(f"{r.lake}/metadata/**/*.parquet").collect() for r in wrote]
    ).filter(pl.col("status") != "succeeded")
    messages = " | ".join(m for m in failed["error_message"] if m)
    assert "was not accepted" in messages and "***" in messages

    # The CLI with a wrong key: what a scheduler's log would keep.
    cli_env = {base_url_env(p): emulator.base_url for p in BUILT_IN} | WRONG
    cli = tryon_cli(
        "run", manifest(tmp_path, 2), "--lake", str(tmp_path / "lake-cli"), "--no-progress",
        cwd=tmp_path, env=cli_env,
    )  # fmt: skip
    assert cli.returncode == 1, cli.stdout + cli.stderr

    leaks: list[str] = []
    for line in all_logs.lines:
        leaks += find_leaks("python log", line)
    assert any("HTTP Request" in line for line in all_logs.lines)  # httpx was captured
    for r in runs:
        leaks += lake_leaks(r.lake)
        if r.error is not None:
            for where, text in exception_texts(r.error):
                leaks += find_leaks(f"{r.name} exception {where}", text)
        if r.summary is not None:
            leaks += find_leaks(f"{r.name} summary", r.summary.model_dump_json())
            leaks += find_leaks(f"{r.name} summary line", r.summary.one_line())
    leaks += lake_leaks(tmp_path / "lake-cli")
    leaks += find_leaks("cli stdout", cli.stdout) + find_leaks("cli stderr", cli.stderr)
    for where, text in await prefect_texts(since):
        leaks += find_leaks(where, text)
    leaks += stored_results(since)
    assert leaks == []
