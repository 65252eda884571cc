"""Contract tests: the HiDream client against the emulator (no mocks).

In-process on the fake clock (tests/contract.py) but for ``test_api_key_never_leaks``, on
loopback: two of its errors are client timeouts. Timeouts, refused connections, expiry and
missing keys in general: test_every_provider.py. notify_url callbacks go to a loopback receiver.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from emulator import EmulatorConfig, FaultPlan
from emulator import hidream as emulated
from providers.base import JobState, PollPolicy, ProviderError, TryOnRequest
from providers.common import ErrorSpec
from providers.hidream.client import (
    DEFAULT_RESULT_PATH,
    DEFAULT_STATUS_MAP,
    SUBMIT_PATH,
    HiDreamClient,
    parse_result_response,
    parse_submit_response,
)
from providers.hidream.settings import PROFILE as HIDREAM
from providers.registry import provider_spec
from schemas.results import ErrorKind
from tasks.images import prepare_image
from tests.contract import CONTRACT_CONFIG, Emulated, Emulators, ImageHost, serving
from tests.images import PERSON_SIZE, band_diff, decode, garment_jpeg, prepared
from tests.providers.sites import FAST, Hd, assert_secret_kept, expect_error, free_port

HD = "hidream"
SECRET = "hd-live-4e8b2c6a0f1d3b5e7a9c"  # distinctive, so any leak is found by substring
RESULTS_KEY = f"GET {DEFAULT_RESULT_PATH}"
SUBMIT_KEY = f"POST {SUBMIT_PATH}"
RED, BLUE, GREEN = (220, 30, 30), (30, 40, 220), (30, 160, 60)


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def emulator(emulators: Emulators) -> Emulated:
    """Short job timings, so each try-on takes a fraction of a (fake) second."""
    quick_jobs = FaultPlan(job_queued_s=0.03, job_running_s=0.03)
    return emulators.start(CONTRACT_CONFIG.model_copy(update={"faults": {HD: quick_jobs}}))


def jpeg(size: tuple[int, int], colour: tuple[int, int, int] = (120, 130, 140)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def tryon(
    person: bytes,
    garment: bytes | None,
    category: str | None = "upper_body",
    lower: bytes | None = None,
) -> TryOnRequest:
    return TryOnRequest(
        row_id="row-1",
        person=prepared(person),
        garment=prepared(garment) if garment is not None else None,
        lower_garment=prepared(lower) if lower is not None else None,
        category=category,  # type: ignore[arg-type]
    )


class Captured:
    """Request bodies the client really sent (an httpx event hook, not a mock)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    @classmethod
    def on(cls, http: httpx.AsyncClient) -> Captured:
        """Recording what ``http`` POSTs from now on."""
        captured = cls()
        http.event_hooks["request"].append(captured)
        return captured

    async def __call__(self, request: httpx.Request) -> None:
        if request.method == "POST":
            self.bodies.append(json.loads(request.content))


@dataclass
class Receiver:
    """A plain HTTP server on loopback that records POSTed JSON (a notify_url target)."""

    url: str = ""
    posts: list[dict[str, Any]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def wait(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.posts) < count and time.monotonic() < deadline:
            self.arrived.wait(0.05)
        return self.posts


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            found.posts.append(json.loads(self.rfile.read(length)))
            found.arrived.set()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serving(Handler) as base_url:
        found.url = f"{base_url}/hooks/hidream"
        yield found


# -- the job lifecycle --------------------------------------------------------------------------


async def test_submit_then_poll_sees_queued_running_done(
    hd: Hd, person: bytes, garment: bytes
) -> None:
    await hd.faults(job_queued_s=0.6, job_running_s=0.6)
    client = hd.client()
    task_id = await client.submit(tryon(person, garment))
    uuid.UUID(task_id)

    states = [(await client.poll(task_id)).state]
    await hd.sleep(0.9)
    states.append((await client.poll(task_id)).state)
    await hd.sleep(0.6)
    done = await client.poll(task_id)
    states.append(done.state)

    assert states == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert done.result is not None and done.result.request_id == task_id
    assert done.result.extra["task_id"] == task_id and done.result.extra["sub_task_id"]
    output = decode(await client.download(done.result.result_url or ""))
    assert output.shape[:2] == (PERSON_SIZE[1], PERSON_SIZE[0])
    assert band_diff(output, decode(person), 0.25, 0.50) > 40  # the red top covers the torso
    assert band_diff(output, decode(person), 0.00, 0.15) < 6  # the head is untouched


async def test_try_on_reports_the_task_id_once_before_polling(
    hd: Hd, person: bytes, garment: bytes
) -> None:
    seen: list[tuple[str, int]] = []

    async def on_submitted(task_id: str) -> None:
        polls = (await hd.control.stats()).requests.get(RESULTS_KEY, 0)
        seen.append((task_id, polls))

    result = await hd.client().try_on(tryon(person, garment), on_submitted=on_submitted)

    assert len(seen) == 1
    task_id, polls_before = seen[0]
    assert polls_before == 0
    assert result.request_id == task_id
    requests = (await hd.control.stats()).requests
    assert requests[SUBMIT_KEY] == 1 and requests[RESULTS_KEY] >= 1


async def test_upper_and_lower_garments_in_one_call(hd: Hd, person: bytes) -> None:
    captured, client = Captured.on(hd.http), hd.client()
    request = tryon(person, garment_jpeg(RED), "upper_body", lower=garment_jpeg(BLUE))
    result = await client.try_on(request)
    output = decode(await client.download(result.result_url or ""))

    (body,) = captured.bodies
    assert set(body) == {"person", "upper_clothes", "lower_clothes", "request_id"}
    assert base64.b64decode(body["lower_clothes"], validate=True) == garment_jpeg(BLUE)
    uuid.UUID(body["request_id"])
    original = decode(person)
    assert band_diff(output, original, 0.25, 0.45) > 40  # upper garment on the torso
    assert band_diff(output, original, 0.65, 0.85) > 40  # lower garment on the legs
    torso = output[round(0.35 * output.shape[0]), output.shape[1] // 2]
    legs = output[round(0.75 * output.shape[0]), output.shape[1] // 2]
    assert torso[0] > torso[2] and legs[2] > legs[0]  # red on top, blue below


@pytest.mark.parametrize(
    ("category", "field", "changed", "unchanged"),
    [
        ("dresses", "dress", (0.25, 0.85), (0.00, 0.15)),
        ("lower_body", "lower_clothes", (0.65, 0.85), (0.20, 0.45)),
    ],
)
async def test_dress_and_lower_body_map_to_their_fields(
    hd: Hd,
    person: bytes,
    category: str,
    field: str,
    changed: tuple[float, float],
    unchanged: tuple[float, float],
) -> None:
    captured, client = Captured.on(hd.http), hd.client()
    result = await client.try_on(tryon(person, garment_jpeg(GREEN), category))
    output = decode(await client.download(result.result_url or ""))

    assert set(captured.bodies[0]) == {"person", field, "request_id"}
    assert band_diff(output, decode(person), *changed) > 30
    assert band_diff(output, decode(person), *unchanged) < 6


async def test_dress_with_lower_garment_is_refused_without_a_call(
    hd: Hd, person: bytes, garment: bytes
) -> None:
    client = hd.client()
    requests = [
        tryon(person, garment, "dresses", lower=garment_jpeg(BLUE)),
        tryon(person, garment, "lower_body", lower=garment_jpeg(BLUE)),
        tryon(person, None),
        tryon(person, garment, "hats"),
    ]
    for request in requests:
        error = await expect_error(client.try_on(request))
        assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNSUPPORTED_REQUEST")
    assert (await hd.provider_stats()).requests == 0


# -- failed jobs and deadlines ------------------------------------------------------------------


async def test_async_failures_are_permanent(hd: Hd, person: bytes, garment: bytes) -> None:
    await hd.faults(async_failure_rate=1.0)
    client = hd.client()
    errors = await asyncio.gather(
        *(expect_error(client.try_on(tryon(person, garment))) for _ in range(12))
    )
    assert {e.kind for e in errors} == {ErrorKind.PERMANENT}
    assert {e.code for e in errors} <= {"JOB_FAILED", "MODERATED"}
    assert all(e.request_id and "task_status" in e.message for e in errors)


@pytest.mark.parametrize(
    ("status", "code"), [(3, "JOB_FAILED"), (4, "MODERATED"), (1005, "NO_RESULT")]
)
async def test_forced_final_status_is_a_permanent_error(
    hd: Hd, person: bytes, garment: bytes, status: int, code: str
) -> None:
    await hd.faults(forced_codes=[f"task_status:{status}"])
    error = await expect_error(hd.client().try_on(tryon(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, code)
    assert f"task_status {status}" in error.message


async def test_forced_final_status_waits_for_the_next_submission(
    hd: Hd, person: bytes, garment: bytes
) -> None:
    client = hd.client()
    first = await client.submit(tryon(person, garment))
    await hd.faults(forced_codes=["task_status:4"])
    await hd.sleep(0.1)
    assert (await client.poll(first)).state is JobState.SUCCEEDED  # polls leave it queued
    error = await expect_error(client.try_on(tryon(person, garment)))
    assert error.code == "MODERATED"


async def test_poll_deadline_is_transient_and_names_the_task(
    hd: Hd, person: bytes, garment: bytes
) -> None:
    await hd.faults(job_queued_s=30.0)
    policy = PollPolicy(initial_s=0.05, max_interval_s=0.1, deadline_s=0.3)
    submitted: list[str] = []

    async def on_submitted(task_id: str) -> None:
        submitted.append(task_id)

    client = hd.client(poll_policy=policy)
    error = await expect_error(client.try_on(tryon(person, garment), on_submitted=on_submitted))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "POLL_DEADLINE")
    assert error.request_id == submitted[0]


async def test_polling_survives_transient_errors(hd: Hd, person: bytes, garment: bytes) -> None:
    client = hd.client()
    task_id = await client.submit(tryon(person, garment))
    await hd.faults(forced_codes=[503, 429])
    assert (await expect_error(client.poll(task_id))).code == "HTTP_503"
    assert (await expect_error(client.poll(task_id))).code == "RATE_LIMITED"
    await hd.faults(forced_codes=[503, 503])
    result = await client.wait(task_id)  # the two failed polls are retried, not fatal
    assert result.request_id == task_id


async def test_unknown_task_id_is_permanent(hd: Hd) -> None:
    error = await expect_error(hd.client().poll(str(uuid.uuid4())))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "TASK_NOT_FOUND")
    assert error.http_status == 200


async def test_fast_mode_answers_prerendered_results(
    emulators: Emulators, image_host: ImageHost, person: bytes
) -> None:
    fast_jobs = FaultPlan(job_queued_s=0.0, job_running_s=0.0)
    config = EmulatorConfig(fast_mode=True, faults={"hidream": fast_jobs})
    on = Hd(emulators.http, emulators.start(config), emulators.clock, image_host)
    client = on.client()
    outputs = [
        await client.download(
            (await client.try_on(tryon(person, garment_jpeg(colour)))).result_url or ""
        )
        for colour in (RED, BLUE)
    ]
    assert outputs[0] == outputs[1]  # one fixed answer, whatever the inputs


# -- gateway and account errors -----------------------------------------------------------------


async def test_wrong_key_is_fatal_on_submit_and_poll(hd: Hd, person: bytes, garment: bytes) -> None:
    task_id = await hd.client().submit(tryon(person, garment))
    wrong = hd.client(api_key=SecretStr(SECRET))
    for call in (wrong.submit(tryon(person, garment)), wrong.poll(task_id)):
        error = await expect_error(call)
        assert (error.kind, error.code) == (ErrorKind.FATAL, "INVALID_TOKEN")
        assert error.http_status == 401


@pytest.mark.parametrize(
    ("authorization", "code", "name"),
    [(None, 40101, "UNAUTHORIZED"), ("Token abc", 40102, "INVALID_TOKEN")],
)
async def test_missing_or_malformed_auth_header(
    hd: Hd, person: bytes, garment: bytes, authorization: str | None, code: int, name: str
) -> None:
    body = {"person": b64(person), "upper_clothes": b64(garment)}
    response = await hd.raw("POST", SUBMIT_PATH, body=body, authorization=authorization)
    assert (response.status_code, response.json()["code"]) == (401, code)
    with pytest.raises(ProviderError) as info:
        parse_submit_response(response.status_code, response.headers, response.content)
    assert (info.value.kind, info.value.code) == (ErrorKind.FATAL, name)


async def test_429_is_transient_with_retry_after(hd: Hd, person: bytes, garment: bytes) -> None:
    await hd.faults(error_rate_429=1.0, retry_after_s=7)
    error = await expect_error(hd.client().submit(tryon(person, garment)))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.TRANSIENT, "RATE_LIMITED", 429)
    assert error.retry_after == 7.0


@pytest.mark.parametrize(
    ("fault", "code", "status"),
    [
        ({"error_rate_5xx": 1.0}, "HTTP_503", 503),
        ({"forced_codes": [502]}, "HTTP_502", 502),
        ({"forced_codes": [50000]}, "INTERNAL_ERROR", 500),
    ],
)
async def test_server_errors_are_transient(
    hd: Hd, person: bytes, garment: bytes, fault: dict[str, Any], code: str, status: int
) -> None:
    await hd.faults(**fault)
    error = await expect_error(hd.client().submit(tryon(person, garment)))
    assert (error.kind, error.code, error.http_status) == (ErrorKind.TRANSIENT, code, status)


async def test_no_credits_is_fatal_and_failed_calls_cost_nothing(
    hd: Hd, person: bytes, garment: bytes
) -> None:
    await hd.faults(credits=1)
    client = hd.client()
    tiny = await expect_error(client.submit(tryon(jpeg((100, 100)), garment)))
    assert tiny.code == "IMAGE_SIZE"  # refused: the credit is given back
    assert (await client.try_on(tryon(person, garment))).result_url
    error = await expect_error(client.submit(tryon(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.FATAL, "INSUFFICIENT_CREDITS")
    assert error.http_status == 402


async def test_unknown_code_is_permanent_unless_the_table_says_otherwise(
    hd: Hd, person: bytes, garment: bytes
) -> None:
    await hd.faults(forced_codes=[12345, 12345])
    error = await expect_error(hd.client().submit(tryon(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNKNOWN_CODE")
    assert error.http_status == 200
    assert "12345" in error.message
    table = {12345: ErrorSpec(ErrorKind.TRANSIENT, "try later", name="BUSY")}
    error = await expect_error(hd.client(error_table=table).submit(tryon(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.TRANSIENT, "BUSY")


# -- notify_url ---------------------------------------------------------------------------------


async def test_notify_url_receives_the_task_result(
    hd: Hd, receiver: Receiver, person: bytes, garment: bytes
) -> None:
    captured, client = Captured.on(hd.http), hd.client(notify_url=receiver.url)
    result = await client.try_on(tryon(person, garment))
    posts = await asyncio.to_thread(receiver.wait, 1)

    assert captured.bodies[0]["notify_url"] == receiver.url
    (post,) = posts
    assert post["code"] == 0
    assert post["result"]["task_id"] == result.request_id
    (sub,) = post["result"]["sub_task_results"]
    assert sub["task_status"] == 1 and sub["image"] == result.result_url
    # The callback body parses like a poll answer.
    status = parse_result_response(
        200, {}, json.dumps(post).encode(), task_id=result.request_id or ""
    )
    assert status.result is not None and status.result.result_url == result.result_url


async def test_notify_url_reports_a_failed_job(
    hd: Hd, receiver: Receiver, person: bytes, garment: bytes
) -> None:
    await hd.faults(forced_codes=["task_status:3"])
    task_id = await hd.client(notify_url=receiver.url).submit(tryon(person, garment))
    (post,) = await asyncio.to_thread(receiver.wait, 1)
    assert post["result"]["task_id"] == task_id
    assert post["result"]["sub_task_results"][0]["task_status"] == 3


# -- the unverified parts are configuration -----------------------------------------------------


async def test_status_map_drives_the_parsing(hd: Hd, person: bytes, garment: bytes) -> None:
    await hd.faults(job_queued_s=0.5, job_running_s=0.5)
    swapped = {**DEFAULT_STATUS_MAP, 0: JobState.RUNNING, 2: JobState.QUEUED}
    client = hd.client(status_map=swapped)
    task_id = await client.submit(tryon(person, garment))
    first = (await client.poll(task_id)).state  # the emulator says 0
    await hd.sleep(0.75)
    second = (await client.poll(task_id)).state  # the emulator says 2
    assert (first, second) == (JobState.RUNNING, JobState.QUEUED)

    without_running = {k: v for k, v in DEFAULT_STATUS_MAP.items() if k != 2}
    error = await expect_error(hd.client(status_map=without_running).poll(task_id))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "UNKNOWN_STATUS")
    assert "task_status 2" in error.message

    await hd.sleep(0.45)
    inverted = {**DEFAULT_STATUS_MAP, 1: JobState.FAILED}
    failed = await hd.client(status_map=inverted, failure_codes={1: "DONE_IS_FAILED"}).poll(task_id)
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error.code == "DONE_IS_FAILED"


async def test_result_path_is_the_one_polled(hd: Hd, person: bytes, garment: bytes) -> None:
    task_id = await hd.client().submit(tryon(person, garment))
    wrong = hd.client(result_path="/api-pub/ec/v3/image/vton/async/result")
    error = await expect_error(wrong.poll(task_id))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "HTTP_404")
    assert RESULTS_KEY not in (await hd.control.stats()).requests
    assert (await hd.client(result_path=DEFAULT_RESULT_PATH).wait(task_id)).result_url


def test_client_and_emulator_defaults_agree() -> None:
    """Two readings of the unverified parts, kept apart; they must still say the same thing."""
    assert emulated.RESULT_PATH == DEFAULT_RESULT_PATH
    assert emulated.SUBMIT_PATH == SUBMIT_PATH
    expected = {
        emulated.STATUS_WAITING: JobState.QUEUED,
        emulated.STATUS_RUNNING: JobState.RUNNING,
        emulated.STATUS_DONE: JobState.SUCCEEDED,
        emulated.STATUS_FAILED: JobState.FAILED,
        emulated.STATUS_MODERATED: JobState.FAILED,
    }
    assert {k: DEFAULT_STATUS_MAP[k] for k in expected} == expected


# -- image transports and limits ----------------------------------------------------------------


async def test_url_transport_lets_the_emulator_fetch(
    hd: Hd, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    request = image_host.request(person, garment, name="hidream")
    result = await hd.client(image_transport="url").try_on(request)
    assert result.result_url
    assert image_host.hits["/hidream/person.jpg"] == 1


async def test_url_transport_without_url_fails_before_sending(
    hd: Hd, person: bytes, garment: bytes
) -> None:
    error = await expect_error(hd.client(image_transport="url").submit(tryon(person, garment)))
    assert (error.kind, error.code) == (ErrorKind.PERMANENT, "NO_IMAGE_URL")
    assert (await hd.provider_stats()).requests == 0


async def test_base64_prefix_sends_data_uris(hd: Hd, person: bytes, garment: bytes) -> None:
    captured, client = Captured.on(hd.http), hd.client(base64_prefix=True)
    assert (await client.try_on(tryon(person, garment))).result_url
    assert captured.bodies[0]["person"].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize(
    ("size", "accepted"),
    [
        ((emulated.MIN_SIDE - 1, 400), False),
        ((emulated.MIN_SIDE, emulated.MIN_SIDE), True),
        ((emulated.MAX_SIDE + 1, 600), False),
    ],
)
async def test_emulator_enforces_image_sides(
    hd: Hd, garment: bytes, size: tuple[int, int], accepted: bool
) -> None:
    client = hd.client()
    request = tryon(jpeg(size), garment)
    if accepted:
        assert await client.submit(request)
    else:
        error = await expect_error(client.submit(request))
        assert (error.kind, error.code) == (ErrorKind.PERMANENT, "IMAGE_SIZE")
        assert f"{size[0]}x{size[1]}" in error.message


@pytest.mark.parametrize("size", [(120, 180), (384, 576), (3000, 4000), (3600, 900), (260, 2000)])
async def test_prepared_images_fit_the_emulator(
    hd: Hd, garment: bytes, size: tuple[int, int]
) -> None:
    source = jpeg(size, (90, 120, 150))
    image = await asyncio.to_thread(
        prepare_image, source, profile=HIDREAM, source_uri=f"mem://{size[0]}x{size[1]}.jpg"
    )
    assert min(image.width, image.height) >= emulated.MIN_SIDE
    assert max(image.width, image.height) <= emulated.MAX_SIDE
    assert len(image.data) <= emulated.MAX_IMAGE_BYTES
    request = TryOnRequest(
        row_id="row-p", person=image, garment=prepared(garment), category="upper_body"
    )
    assert await hd.client().submit(request)


def test_hidream_profile_is_inside_the_emulator_limits() -> None:
    assert HIDREAM.min_side >= emulated.MIN_SIDE
    assert HIDREAM.max_side <= emulated.MAX_SIDE
    assert HIDREAM.max_bytes <= emulated.MAX_IMAGE_BYTES


# -- the emulator's request validation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"upper_clothes": "G"}, 40001),  # no person
        ({"person": "P"}, 40001),  # no garment
        ({"person": "P", "dress": "G", "upper_clothes": "G"}, 40001),  # dress is exclusive
        ({"person": "P", "dress": "G", "lower_clothes": "G"}, 40001),
        ({"person": "P", "upper_clothes": 5}, 40001),  # not a string
        ({"person": "P", "upper_clothes": "G", "notify_url": "ftp://x"}, 40001),
        ({"person": "%%%not base64%%%", "upper_clothes": "G"}, 40002),
        ({"person": b64(b"not an image at all"), "upper_clothes": "G"}, 40002),
        ({"person": "http://127.0.0.1:9/missing.jpg", "upper_clothes": "G"}, 40002),
        ({"person": "data:text/plain;base64,aGVsbG8=", "upper_clothes": "G"}, 40002),
    ],
)
async def test_emulator_validates_the_body(
    hd: Hd, person: bytes, garment: bytes, fields: dict[str, Any], code: int
) -> None:
    real = {"P": b64(person), "G": b64(garment)}
    body = {k: real.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    response = await hd.raw("POST", SUBMIT_PATH, body=body)
    assert (response.status_code, response.json()["code"]) == (200, code)
    assert (await hd.provider_stats()).errors == {str(code): 1}


async def test_emulator_refuses_a_non_json_body(hd: Hd) -> None:
    response = await hd.raw("POST", SUBMIT_PATH, content=b"person=x")
    assert response.json()["code"] == 40001


async def test_emulator_echoes_request_id(hd: Hd, person: bytes, garment: bytes) -> None:
    body = {"person": b64(person), "upper_clothes": b64(garment), "request_id": "req-42"}
    response = await hd.raw("POST", SUBMIT_PATH, body=body)
    payload = response.json()
    assert (payload["code"], payload["request_id"]) == (0, "req-42")
    assert len(payload["result"]["sub_task_ids"]) == 1
    assert parse_submit_response(200, {}, response.content, request_id="req-42")
    with pytest.raises(ProviderError) as info:
        parse_submit_response(200, {}, response.content, request_id="other")
    assert (info.value.kind, info.value.code) == (ErrorKind.PERMANENT, "REQUEST_ID_MISMATCH")
    missing = await hd.raw("GET", DEFAULT_RESULT_PATH, params={})
    assert missing.json()["code"] == 40001


# -- parsing on its own -------------------------------------------------------------------------


def _result_body(*subs: dict[str, Any], task_id: str = "t-1") -> bytes:
    return json.dumps(
        {"code": 0, "message": "ok", "result": {"task_id": task_id, "sub_task_results": subs}}
    ).encode()


def test_sub_tasks_are_aggregated() -> None:
    done = {"sub_task_id": "s1", "task_status": 1, "image": "https://r/1.png"}
    running = {"sub_task_id": "s2", "task_status": 2, "image": ""}
    failed = {"sub_task_id": "s3", "task_status": 3, "description": "boom"}
    assert parse_result_response(200, {}, _result_body(done, running), task_id="t-1").state is (
        JobState.RUNNING
    )
    status = parse_result_response(200, {}, _result_body(failed, done), task_id="t-1")
    assert status.result is not None and status.result.result_url == "https://r/1.png"
    status = parse_result_response(200, {}, _result_body(failed), task_id="t-1")
    assert status.error is not None and "boom" in status.error.message
    # task_status as a string, sub_task_results as a single object: both tolerated.
    single = json.dumps(
        {"code": 0, "result": {"sub_task_results": {"task_status": "1", "image": "https://r/x"}}}
    ).encode()
    status = parse_result_response(200, {}, single, task_id="t-1")
    assert status.result is not None and status.result.result_url == "https://r/x"


def test_a_different_status_map_reads_other_values() -> None:
    body = _result_body({"task_status": 7, "image": "https://r/7.png"})
    custom = {5: JobState.QUEUED, 6: JobState.RUNNING, 7: JobState.SUCCEEDED}
    status = parse_result_response(200, {}, body, task_id="t-1", status_map=custom)
    assert status.state is JobState.SUCCEEDED
    with pytest.raises(ProviderError) as info:
        parse_result_response(200, {}, body, task_id="t-1")
    assert info.value.code == "UNKNOWN_STATUS"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (_result_body({"task_status": 1, "image": ""}), "MALFORMED_RESPONSE"),
        (_result_body(), "MALFORMED_RESPONSE"),
        (_result_body({"task_status": 1, "image": "u"}, task_id="t-2"), "TASK_ID_MISMATCH"),
        (b'{"code": 0, "result": null}', "MALFORMED_RESPONSE"),
        (b"<html>ok</html>", "MALFORMED_RESPONSE"),
    ],
)
def test_malformed_results_are_permanent(body: bytes, code: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_result_response(200, {}, body, task_id="t-1")
    assert (info.value.kind, info.value.code) == (ErrorKind.PERMANENT, code)


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (401, b"<html>401</html>", ErrorKind.FATAL, "HTTP_401"),
        (403, b'{"code": 7, "message": "forbidden"}', ErrorKind.FATAL, "HTTP_403"),
        (402, b'{"code": 40201, "message": "no credits"}', ErrorKind.FATAL, "INSUFFICIENT_CREDITS"),
        (400, b'{"code": 1, "message": "bad"}', ErrorKind.PERMANENT, "HTTP_400"),
        (404, b"not found", ErrorKind.PERMANENT, "HTTP_404"),
        (429, b'{"code": 40001}', ErrorKind.TRANSIENT, "RATE_LIMITED"),
        (502, b"<html>bad gateway</html>", ErrorKind.TRANSIENT, "HTTP_502"),
        (200, b'{"code": 0, "result": {}}', ErrorKind.PERMANENT, "MALFORMED_RESPONSE"),
        (200, b'{"code": 40003, "message": "too big"}', ErrorKind.PERMANENT, "IMAGE_SIZE"),
    ],
)
def test_submit_answers_are_classified(
    status: int, body: bytes, kind: ErrorKind, code: str
) -> None:
    with pytest.raises(ProviderError) as info:
        parse_submit_response(status, {"Retry-After": "3"}, body, request_id="r-1")
    error = info.value
    assert (error.kind, error.code, error.http_status) == (kind, code, status)
    assert error.request_id == "r-1" and error.retry_after == 3.0


# -- configuration and secrets ------------------------------------------------------------------


async def test_api_key_never_leaks(
    http: httpx.AsyncClient,
    loopback: Emulated,
    image_host: ImageHost,
    caplog: pytest.LogCaptureFixture,
    person: bytes,
    garment: bytes,
) -> None:
    caplog.set_level(logging.DEBUG)
    hd = Hd(http, loopback, None, image_host)
    key = SecretStr(SECRET)
    clients = [
        hd.client(api_key=key),
        hd.client(api_key=key, timeout=0.3),
        hd.client(api_key=key, base_url=f"http://127.0.0.1:{free_port()}"),
    ]
    errors = [
        await expect_error(clients[0].submit(tryon(person, garment))),
        await expect_error(clients[0].poll("t-1")),
    ]
    await hd.faults(latency_s=5.0)
    errors.append(await expect_error(clients[1].submit(tryon(person, garment))))
    errors.append(await expect_error(clients[1].poll("t-1")))
    await hd.faults(latency_s=0.0)
    errors.append(await expect_error(clients[2].submit(tryon(person, garment))))
    # A vendor echoing the key in its message is redacted too.
    body = json.dumps({"code": 40102, "message": f"bad token {SECRET}"}).encode()
    with pytest.raises(ProviderError) as info:
        parse_submit_response(401, {}, body, redact=[SECRET])
    errors.append(info.value)

    codes = [e.code for e in errors[:5]]
    assert codes == ["INVALID_TOKEN", "INVALID_TOKEN", "TIMEOUT", "TIMEOUT", "CONNECTION_ERROR"]
    assert_secret_kept(SECRET, errors, clients)
    assert SECRET not in caplog.text


async def test_from_env_and_registry_use_key_and_base_url(
    monkeypatch: pytest.MonkeyPatch, hd: Hd, person: bytes, garment: bytes
) -> None:
    monkeypatch.setenv("HIDREAM_API_KEY", hd.key.get_secret_value())
    monkeypatch.setenv("TRYON_HIDREAM_BASE_URL", hd.base_url + "/")
    client = hd.polling(HiDreamClient.from_env(http=hd.http, poll_policy=FAST))
    assert client.base_url == hd.base_url and client.poll_policy == FAST
    assert (await client.try_on(tryon(person, garment))).result_url
    made = provider_spec("hidream").make_client(http=hd.http)
    assert isinstance(made, HiDreamClient) and made.profile == HIDREAM
    assert made.capabilities.async_jobs and made.capabilities.lower_garment
    assert made.poll_policy.deadline_s == 600.0


def test_bad_options_are_rejected() -> None:
    """(An empty key: test_every_provider.py.)"""
    http = httpx.AsyncClient()
    with pytest.raises(ValueError):
        HiDreamClient(http=http, api_key=SecretStr("k"), base_url="http://x", result_path="x")
    with pytest.raises(ValueError):
        HiDreamClient(
            http=http,
            api_key=SecretStr("k"),
            base_url="http://x",
            image_transport="file",  # type: ignore[arg-type]
        )
