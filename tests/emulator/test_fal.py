"""The emulator's fal queue on the wire, by hand-made calls: what it refuses, how a request
moves through the queue, what it bills, and that it is served as a plugin (entry point)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from emulator import FaultPlan
from emulator import fal as emulated
from emulator.fal import EMULATED as FAL_EMULATED
from emulator.plugins import EmulatedProvider
from tests.contract import CONTRACT_CONFIG, Emulated, Emulators, FakeClock, ImageHost
from tests.images import garment_jpeg, person_jpeg
from tests.providers.sites import Fal, plugin_served

FASHN = emulated.FASHN
KOLORS = emulated.KOLORS


@pytest.fixture(scope="module", autouse=True)
def _fal_served() -> Iterator[None]:
    """The emulators of this module serve fal (registered by entry points only)."""
    with plugin_served(FAL_EMULATED):
        yield


@pytest.fixture
def fal(
    emulators: Emulators, http: httpx.AsyncClient, clock: FakeClock, image_host: ImageHost
) -> Fal:
    quick = FaultPlan(job_queued_s=0.2, job_running_s=0.3)
    on: Emulated = emulators.start(CONTRACT_CONFIG.model_copy(update={"faults": {"fal": quick}}))
    return Fal(http, on, clock, image_host)


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def fashn_body(**fields: Any) -> dict[str, Any]:
    body = {
        "model_image": data_uri(person_jpeg()),
        "garment_image": data_uri(garment_jpeg()),
        "category": "tops",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


async def submit(fal: Fal, body: dict[str, Any], model: emulated.Model = FASHN) -> dict[str, Any]:
    answer = await fal.raw("POST", f"/{model.model_id}", body=body)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def settle(
    fal: Fal, request_id: str, app_id: str = FASHN.app_id
) -> tuple[dict[str, Any], httpx.Response]:
    """The COMPLETED status and the result, once the job had time to end."""
    await fal.sleep(0.6)
    status = await fal.raw("GET", f"/{app_id}/requests/{request_id}/status")
    assert status.status_code == 200 and status.json()["status"] == "COMPLETED"
    return status.json(), await fal.raw("GET", f"/{app_id}/requests/{request_id}")


def test_it_is_an_entry_point_plugin() -> None:
    assert isinstance(emulated.EMULATED, EmulatedProvider) and emulated.EMULATED.name == "fal"
    assert emulated.EMULATED.default_keys == {"FAL_KEY": "emulator-fal-key"}


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer emulator-fal-key", "Key", "Key wrong-key", "Basic emulator-fal-key"],
)
async def test_only_the_key_scheme_with_the_accounts_key_is_accepted(
    fal: Fal, authorization: str | None
) -> None:
    for method, path, body in (
        ("POST", f"/{FASHN.model_id}", fashn_body()),
        ("GET", f"/{FASHN.app_id}/requests/x/status", None),
        ("GET", f"/{FASHN.app_id}/requests/x", None),
    ):
        answer = await fal.raw(method, path, body=body, authorization=authorization)
        assert answer.status_code == 401 and isinstance(answer.json()["detail"], str)
    assert (
        await fal.raw("GET", f"/{FASHN.app_id}/requests/x", authorization="key emulator-fal-key")
        is not None
    )


async def test_a_submission_answers_the_request_and_its_urls(fal: Fal) -> None:
    answer = await submit(fal, fashn_body())
    request_id = answer["request_id"]
    base = f"{fal.base_url}/fal-ai/fashn/requests/{request_id}"
    assert answer == {
        "request_id": request_id,
        "status": "IN_QUEUE",
        "queue_position": 0,
        "status_url": f"{base}/status",
        "response_url": base,
        "cancel_url": f"{base}/cancel",
    }
    second = await submit(fal, fashn_body(category="bottoms"))
    assert second["queue_position"] == 1


async def test_a_request_goes_in_queue_in_progress_completed(fal: Fal) -> None:
    request_id = (await submit(fal, fashn_body()))["request_id"]
    path = f"/{FASHN.app_id}/requests/{request_id}"
    seen = []
    for _ in range(5):  # 0 .. 0.6 s: queued 0.2, running 0.3
        answer = (await fal.raw("GET", f"{path}/status")).json()
        seen.append(answer["status"])
        if answer["status"] != "COMPLETED":
            early = await fal.raw("GET", path)
            assert early.status_code == 400  # the result is not there yet
        await fal.sleep(0.15)
    assert seen[0] == "IN_QUEUE" and "IN_PROGRESS" in seen and seen[-1] == "COMPLETED"
    result = await fal.raw("GET", path)
    assert result.status_code == 200
    url = result.json()["images"][0]["url"]
    image = await fal.http.get(url)
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size[0] > 100


async def test_requests_are_found_under_their_own_app_only(fal: Fal) -> None:
    request_id = (await submit(fal, fashn_body()))["request_id"]
    for path in (
        f"/{KOLORS.app_id}/requests/{request_id}/status",
        f"/{FASHN.app_id}/requests/nope",
    ):
        answer = await fal.raw("GET", path)
        assert answer.status_code == 404 and answer.json() == {"detail": "Request not found"}


@pytest.mark.parametrize(
    ("body", "kind", "loc"),
    [
        (fashn_body(model_image=None), "missing", ["body", "model_image"]),
        (fashn_body(garment_image=12), "string_type", ["body", "garment_image"]),
        (fashn_body(category="shoes"), "enum", ["body", "category"]),
        (fashn_body(model_image="c29tZSBieXRlcw=="), "image_load_error", ["body", "model_image"]),
        (
            fashn_body(model_image=data_uri(b"not an image")),
            "image_load_error",
            ["body", "model_image"],
        ),
        (
            fashn_body(model_image=data_uri(person_jpeg(size=(200, 300)))),
            "image_too_small",
            ["body", "model_image"],
        ),
    ],
)
async def test_the_runner_validates_each_models_input(
    fal: Fal, body: dict[str, Any], kind: str, loc: list[str]
) -> None:
    """Accepted by the queue, then COMPLETED with the model's error (422 ``detail`` list)."""
    request_id = (await submit(fal, body))["request_id"]
    status, result = await settle(fal, request_id)
    assert status["error_type"] == kind
    assert result.status_code == 422
    (detail,) = result.json()["detail"]
    assert (detail["type"], detail["loc"]) == (kind, loc) and detail["url"].endswith(kind)


async def test_kolors_wants_its_own_field_names_and_300_px(fal: Fal) -> None:
    fashn_names = await submit(fal, fashn_body(), model=KOLORS)
    _, result = await settle(fal, fashn_names["request_id"], KOLORS.app_id)
    assert result.json()["detail"][0]["loc"] == ["body", "human_image_url"]
    small = {
        "human_image_url": data_uri(person_jpeg(size=(280, 420))),
        "garment_image_url": data_uri(garment_jpeg()),
    }
    _, result = await settle(fal, (await submit(fal, small, KOLORS))["request_id"], KOLORS.app_id)
    assert result.json()["detail"][0]["type"] == "image_too_small"
    small["human_image_url"] = data_uri(person_jpeg())
    _, result = await settle(fal, (await submit(fal, small, KOLORS))["request_id"], KOLORS.app_id)
    assert result.status_code == 200 and result.json()["image"]["url"]


async def test_image_urls_are_fetched_as_the_runner_would(fal: Fal, image_host: ImageHost) -> None:
    person = image_host.add("fal/person.jpg", person_jpeg())
    body = fashn_body(model_image=person, garment_image=f"{image_host.base_url}/fal/missing.jpg")
    _, result = await settle(fal, (await submit(fal, body))["request_id"])
    assert result.json()["detail"][0]["type"] == "file_download_error"


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"{not json", "application/json"), (b"[1, 2]", "application/json"), (b"{}", "text/plain")],
)
async def test_a_body_that_is_not_a_json_object_is_refused_at_once(
    fal: Fal, content: bytes, content_type: str
) -> None:
    answer = await fal.http.post(
        f"{fal.base_url}/{FASHN.model_id}",
        content=content,
        headers={
            "Authorization": f"Key {fal.key.get_secret_value()}",
            "Content-Type": content_type,
        },
    )
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body"]
    assert (await fal.provider_stats()).errors == {"422": 1}


async def test_ten_submissions_a_second_then_429_and_polls_are_not_counted(fal: Fal) -> None:
    ids = [(await submit(fal, fashn_body()))["request_id"] for _ in range(10)]
    for request_id in ids:  # polls in the same second: not counted
        assert (
            await fal.raw("GET", f"/{FASHN.app_id}/requests/{request_id}/status")
        ).status_code == 200
    over = await fal.raw("POST", f"/{FASHN.model_id}", body=fashn_body())
    assert over.status_code == 429 and "Rate limit" in over.json()["detail"]
    await fal.sleep(1.0)
    assert (await fal.raw("POST", f"/{FASHN.model_id}", body=fashn_body())).status_code == 200


async def test_credits_pay_for_successful_requests_only(fal: Fal) -> None:
    await fal.faults(credits=1)
    failing = await submit(fal, fashn_body(category="shoes"))  # will fail in the runner
    blocked = await fal.raw("POST", f"/{FASHN.model_id}", body=fashn_body())
    assert blocked.status_code == 403 and "Exhausted balance" in blocked.json()["detail"]
    await settle(fal, failing["request_id"])  # failed: its credit comes back
    ok = await submit(fal, fashn_body())
    _, result = await settle(fal, ok["request_id"])
    assert result.status_code == 200
    assert (await fal.raw("POST", f"/{FASHN.model_id}", body=fashn_body())).status_code == 403
    assert (await fal.control.set_faults("fal", latency_s=0.0))["fal"].credits == 0


async def test_async_failures_are_moderation_or_runner_errors(fal: Fal) -> None:
    await fal.faults(async_failure_rate=1.0)
    kinds = set()
    for _ in range(8):
        status, result = await settle(fal, (await submit(fal, fashn_body()))["request_id"])
        kinds.add(status["error_type"])
        if status["error_type"] == "runner_server_error":
            assert result.status_code == 500
            assert result.headers["x-fal-error-type"] == "runner_server_error"
            assert result.json()["error_type"] == "runner_server_error"
        else:
            assert result.status_code == 422
    assert kinds == {"content_policy_violation", "runner_server_error"}


async def test_results_expire(
    emulators: Emulators, http: httpx.AsyncClient, clock: FakeClock, image_host: ImageHost
) -> None:
    config = CONTRACT_CONFIG.model_copy(
        update={
            "result_ttl_s": 5.0,
            "faults": {"fal": FaultPlan(job_queued_s=0.1, job_running_s=0.1)},
        }
    )
    on = Fal(http, emulators.start(config), clock, image_host)
    _, result = await settle(on, (await submit(on, fashn_body()))["request_id"])
    url = result.json()["images"][0]["url"]
    assert (await http.get(url)).status_code == 200
    await on.sleep(5.0)
    assert (await http.get(url)).status_code == 404


async def test_forced_codes_answer_submissions_only(fal: Fal) -> None:
    request_id = (await submit(fal, fashn_body()))["request_id"]
    await fal.faults(forced_codes=[401, 500])
    status = await fal.raw("GET", f"/{FASHN.app_id}/requests/{request_id}/status")
    assert status.status_code == 200  # polls take none
    assert (await fal.raw("POST", f"/{FASHN.model_id}", body=fashn_body())).status_code == 401
    failed = await fal.raw("POST", f"/{FASHN.model_id}", body=fashn_body())
    assert failed.status_code == 500 and failed.json()["error_type"] == "internal_error"
