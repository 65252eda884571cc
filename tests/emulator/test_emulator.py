"""The emulator itself: determinism, stats, in-flight accounting, control endpoints, composites.

In-process (tests/contract.py) but for ``test_client_timeout_frees_the_in_flight_slot`` on
loopback: a client timeout and its hang-up need a real socket.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from pydantic import SecretStr

from emulator import AsyncEmulatorControl, EmulatorConfig, FaultPlan, build_app
from emulator.common import vendor_tag
from emulator.composite import (
    REGIONS,
    render_garment,
    render_prompt,
    synthetic_garment,
    synthetic_person,
)
from emulator.keys import accepted_key
from emulator.stats import CacheStats, ProviderStats
from providers.changeclothes.client import GARMENT_PATH, PROMPT_PATH, ChangeClothesClient
from tests.contract import Cc, Emulators, FakeClock, RawPost, bearer, garment_fields
from tests.images import (
    CATEGORY_BANDS,
    assert_dressed,
    band_diff,
    decode,
    garment_jpeg,
    garment_request,
    person_jpeg,
)

GARMENT_STATS_KEY = f"POST {GARMENT_PATH}"
CC = "changeclothes"


# -- composites ------------------------------------------------------------------------------


def test_composite_is_deterministic(person: bytes, garment: bytes) -> None:
    first = render_garment(person, garment, "dresses")
    second = render_garment(person, garment, "dresses")
    assert first == second
    assert render_prompt(person, "red coat") == render_prompt(person, "red coat")
    assert render_prompt(person, "red coat").result != render_prompt(person, "blue coat").result


@pytest.mark.parametrize("category", CATEGORY_BANDS)
def test_composite_changes_the_category_region_only(
    category: str, person: bytes, garment: bytes
) -> None:
    rendered = render_garment(person, garment, category)
    assert_dressed(decode(rendered.result), decode(person), category)
    mask = decode(rendered.mask)
    top, bottom = REGIONS[category][1], REGIONS[category][3]
    assert band_diff(mask, mask * 0, top + 0.02, bottom - 0.02) > 250  # white inside
    assert band_diff(mask, mask * 0, 0.0, top - 0.02) < 1  # black outside


def test_composite_rejects_undecodable_bytes(person: bytes) -> None:
    from emulator.composite import UndecodableImage

    with pytest.raises(UndecodableImage, match="garmentImg"):
        render_garment(person, b"GIF89a but no more", "upper_body")


async def test_same_inputs_give_identical_result_bytes(
    client: ChangeClothesClient, control: AsyncEmulatorControl, person: bytes, garment: bytes
) -> None:
    results = [await client.try_on(garment_request(person, garment)) for _ in range(2)]
    assert results[0].result_url != results[1].result_url  # each call gets its own file
    downloads = [await client.download(r.result_url) for r in results]
    assert downloads[0] == downloads[1]
    assert (await control.stats()).composite_cache == CacheStats(hits=1, misses=1)


# -- stats, in-flight, reset -----------------------------------------------------------------


async def test_stats_count_routes_outcomes_and_downloads(
    cc: Cc, person: bytes, garment: bytes
) -> None:
    client, control, raw_post = cc.client(), cc.control, cc.raw_post
    results = [await client.try_on(garment_request(person, garment)) for _ in range(3)]
    await client.download(results[0].result_url)
    await raw_post(GARMENT_PATH, garment_fields(person, garment, category="hats"))
    await raw_post(PROMPT_PATH, {"modelImg": ("p.jpg", person, "image/jpeg"), "prompt": "x"})

    stats = await control.stats()

    assert stats.requests == {
        GARMENT_STATS_KEY: 4,
        f"POST {PROMPT_PATH}": 1,
        "GET /files/{token}.webp": 1,
    }
    assert stats.posts() == 5 and stats.posts("GET ") == 1
    assert stats.provider(CC) == ProviderStats(
        requests=5, succeeded=4, in_flight=0, max_in_flight=1, errors={"10004": 1}
    )
    assert (stats.in_flight, stats.max_in_flight) == (0, 1)


async def test_max_in_flight_counts_concurrent_calls(
    client: ChangeClothesClient, control: AsyncEmulatorControl, person: bytes, garment: bytes
) -> None:
    await control.set_faults(CC, latency_s=0.4)
    n = 6
    await asyncio.gather(*(client.try_on(garment_request(person, garment)) for _ in range(n)))
    stats = await control.stats()
    assert stats.max_in_flight == stats.provider(CC).max_in_flight == n

    await control.reset()
    limit = asyncio.Semaphore(2)

    async def bounded() -> None:
        async with limit:
            await client.try_on(garment_request(person, garment))

    await asyncio.gather(*(bounded() for _ in range(n)))
    stats = await control.stats()
    assert stats.max_in_flight == 2
    assert stats.provider(CC).requests == n


async def test_reset_zeroes_stats_and_optionally_faults(
    client: ChangeClothesClient, control: AsyncEmulatorControl, person: bytes, garment: bytes
) -> None:
    await control.set_faults(CC, credits=1)
    await client.try_on(garment_request(person, garment))
    stats = await control.reset()
    assert stats == await control.stats()
    assert stats.requests == {}
    assert stats.provider(CC).requests == 0
    assert stats.max_in_flight == 0
    assert (await control.faults())[CC].credits == 0  # faults kept
    await control.reset(faults=True)
    assert (await control.faults())[CC].credits is None


async def test_client_timeout_frees_the_in_flight_slot(
    cc_loopback: Cc, person: bytes, garment: bytes
) -> None:
    await cc_loopback.faults(timeout_rate=1.0, timeout_s=60)
    client = cc_loopback.client(timeout=0.3)
    with pytest.raises(Exception, match="TIMEOUT"):
        await client.try_on(garment_request(person, garment))
    stats = await cc_loopback.control.wait_idle(timeout_s=3)
    assert stats.provider(CC).errors == {"timeout": 1}


# -- faults endpoint -------------------------------------------------------------------------


async def test_faults_endpoint_changes_behaviour_at_runtime(
    control: AsyncEmulatorControl, raw_post: RawPost, person: bytes, garment: bytes
) -> None:
    plans = await control.set_faults(CC, error_rate_429=1.0, retry_after_s=3)
    assert plans[CC].error_rate_429 == 1.0
    response = await raw_post(GARMENT_PATH, garment_fields(person, garment))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json() == {"code": 429, "msg": "Too Many Requests"}

    await control.set_faults(CC, error_rate_429=0.0, error_rate_5xx=1.0)
    response = await raw_post(GARMENT_PATH, garment_fields(person, garment))
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("text/html")

    await control.set_faults({CC: {"error_rate_5xx": 0.0, "forced_codes": [20001]}})
    response = await raw_post(GARMENT_PATH, garment_fields(person, garment))
    assert (response.status_code, response.json()["code"]) == (500, 20001)
    response = await raw_post(GARMENT_PATH, garment_fields(person, garment))
    assert response.status_code == 200

    for bad in ({CC: {"error_rate_429": 2}}, {CC: {"no_such_field": 1}}, {"nobody": {}}):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await control.set_faults(bad)
        assert refused.value.response.status_code == 422


async def test_fault_draws_are_deterministic_per_seed(
    emulators: Emulators, api_key: SecretStr, person: bytes, garment: bytes
) -> None:
    fields = garment_fields(person, garment)
    files = [(k, v if isinstance(v, tuple) else (None, v)) for k, v in fields.items()]
    headers = bearer(api_key)

    async def outcomes(seed: int) -> list[int]:
        plan = FaultPlan(error_rate_429=0.5)
        config = EmulatorConfig(seed=seed, faults={"changeclothes": plan}, fast_mode=True)
        url = emulators.start(config).base_url + GARMENT_PATH
        http = emulators.http
        return [(await http.post(url, files=files, headers=headers)).status_code for _ in range(12)]

    first, again, other = await outcomes(3), await outcomes(3), await outcomes(4)
    assert first == again
    assert set(first) == {200, 429}
    assert first != other


def test_config_rejects_faults_for_unknown_providers() -> None:
    with pytest.raises(ValueError, match="nobody"):
        build_app(EmulatorConfig(faults={"nobody": FaultPlan()}))


# -- wire protocol details -------------------------------------------------------------------


async def test_every_response_has_a_request_id(cc: Cc, person: bytes, garment: bytes) -> None:
    result = await cc.client().try_on(garment_request(person, garment))
    responses = [
        await cc.http.get(result.result_url),
        await cc.http.get(f"{cc.base_url}/files/nope.webp"),
        await cc.http.get(f"{cc.base_url}/_emulator/stats"),
        await cc.raw_post(GARMENT_PATH, garment_fields(person, garment), authorization=None),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids) and len(set(ids)) == len(ids)
    assert responses[1].status_code == 404


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"seed": "-1"}, "seed"),
        ({"seed": "2147483648"}, "seed"),
        ({"seed": "abc"}, "seed"),
        ({"randomize_seed": "yes"}, "randomize_seed"),
        ({"guidance_scale": "0"}, "guidance_scale"),
        ({"guidance_scale": "nan"}, "guidance_scale"),
        ({"num_inference_steps": "0"}, "num_inference_steps"),
        ({"num_inference_steps": "51"}, "num_inference_steps"),
        ({"prompt": ""}, "prompt"),
    ],
)
async def test_prompt_fields_are_validated(
    raw_post: RawPost, person: bytes, fields: dict[str, str], named: str
) -> None:
    form: dict[str, object] = {
        "modelImg": ("p.jpg", person, "image/jpeg"),
        "prompt": "a coat",
        **fields,
    }
    response = await raw_post(PROMPT_PATH, form)
    assert (response.status_code, response.json()["code"]) == (400, 10004)
    assert named in response.json()["msg"]


@pytest.mark.parametrize("missing", ["modelImg", "garmentImg", "category"])
async def test_garment_fields_are_required(
    raw_post: RawPost, person: bytes, garment: bytes, missing: str
) -> None:
    form = garment_fields(person, garment)
    del form[missing]
    response = await raw_post(GARMENT_PATH, form)
    assert response.json()["code"] == 10004
    assert missing in response.json()["msg"]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("data:image/jpeg;base64,@@not-base64@@", "base64"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("ftp://example.invalid/p.jpg", "URL"),
    ],
)
async def test_bad_image_strings_are_invalid_params(
    raw_post: RawPost, garment: bytes, value: str, fragment: str
) -> None:
    form = garment_fields(b"", garment)
    form["modelImg"] = value
    response = await raw_post(GARMENT_PATH, form)
    assert response.json()["code"] == 10004
    assert fragment in response.json()["msg"]


async def test_non_multipart_body_is_an_invalid_param(cc: Cc) -> None:
    response = await cc.http.post(
        cc.base_url + GARMENT_PATH,
        data={
            "modelImg": "https://x/p.jpg",
            "garmentImg": "https://x/g.jpg",
            "category": "dresses",
        },
        headers=bearer(cc.key),
    )
    assert (response.status_code, response.json()["code"]) == (400, 10004)
    assert "multipart/form-data" in response.json()["msg"]


async def test_failed_calls_do_not_use_credits(cc: Cc, person: bytes, garment: bytes) -> None:
    await cc.faults(credits=1)
    client, raw_post = cc.client(), cc.raw_post
    bad = await raw_post(GARMENT_PATH, garment_fields(person, garment, category="hats"))
    assert bad.json()["code"] == 10004
    assert (await client.try_on(garment_request(person, garment))).result_url
    exhausted = await raw_post(GARMENT_PATH, garment_fields(person, garment))
    assert (exhausted.status_code, exhausted.json()["code"]) == (402, 10003)


async def test_fast_mode_returns_prerendered_results(
    emulators: Emulators, api_key: SecretStr, garment: bytes
) -> None:
    server = emulators.start(EmulatorConfig(fast_mode=True))
    client = ChangeClothesClient(http=emulators.http, api_key=api_key, base_url=server.base_url)
    first = await client.try_on(garment_request(person_jpeg(), garment))
    second = await client.try_on(garment_request(person_jpeg((0, 90, 0)), garment_jpeg()))
    one, two = [await client.download(r.result_url) for r in (first, second)]
    assert one == two  # inputs are not decoded in fast mode
    assert decode(one).shape[0] > 0
    expected = render_garment(
        synthetic_person(), synthetic_garment(), "upper_body", tag=vendor_tag("changeclothes")
    )
    assert one == expected.result
    with pytest.raises(Exception, match="INVALID_PARAM"):
        await client.try_on(garment_request(b"plain text, not an image", garment))


# -- call log and job resubmissions (for the reliability suite) -----------------------------


async def test_call_log_records_status_fault_and_timing(
    cc: Cc, clock: FakeClock, person: bytes, garment: bytes
) -> None:
    control, raw_post = cc.control, cc.raw_post
    await cc.client().try_on(garment_request(person, garment))
    await clock.sleep(0.25)  # the log's times are the emulator's clock
    await control.set_faults(CC, error_rate_429=1.0, retry_after_s=0)
    assert (await raw_post(GARMENT_PATH, garment_fields(person, garment))).status_code == 429
    await clock.sleep(0.25)
    await control.set_faults(CC, error_rate_429=0.0, credits=0)
    assert (await raw_post(GARMENT_PATH, garment_fields(person, garment))).status_code == 402

    log = await control.calls()
    calls = log.calls
    assert log.now_s >= calls[-1].answered_s
    assert abs(log.clock0_unix + log.now_s - time.time()) < 5  # the log's zero in Unix time
    assert [(c.seq, c.route, c.status, c.fault) for c in calls] == [
        (0, GARMENT_STATS_KEY, 200, None),
        (1, GARMENT_STATS_KEY, 429, "429"),
        (2, GARMENT_STATS_KEY, 402, None),
    ]
    assert {c.provider for c in calls} == {CC}
    assert all(c.arrived_s <= c.answered_s for c in calls)
    assert calls[0].answered_s <= calls[1].arrived_s <= calls[2].arrived_s
    assert [c.arrived_s for c in calls] == pytest.approx([0.0, 0.25, 0.5], abs=1e-3)
    assert [c.seq for c in (await control.calls(since=1)).calls] == [2]
    assert (await control.calls(since=2)).calls == []
    assert await control.clock_s() >= log.now_s
    assert (await control.stats()).calls_logged == 3
    await control.reset()
    assert (await control.calls()).calls == []


async def test_job_contents_count_resubmissions_of_accepted_and_failed_jobs(
    emulators: Emulators, person: bytes, garment: bytes
) -> None:
    import base64

    from emulator.hidream import SUBMIT_PATH

    plan = FaultPlan(job_queued_s=0.0, job_running_s=0.0)
    server = emulators.start(EmulatorConfig(faults={"hidream": plan}))
    control, http = server.control, emulators.http
    headers = bearer(SecretStr(accepted_key("HIDREAM_API_KEY")))

    async def submit(garment_bytes: bytes, request_id: str) -> None:
        body = {
            "person": base64.b64encode(person).decode(),
            "upper_clothes": base64.b64encode(garment_bytes).decode(),
            "request_id": request_id,  # ids differ: not part of the content
        }
        response = await http.post(server.base_url + SUBMIT_PATH, json=body, headers=headers)
        assert response.json()["code"] == 0, response.text

    await submit(garment, "a")
    await submit(garment, "b")  # the first job is done: accepted work asked for again
    await submit(garment_jpeg((0, 0, 200)), "c")  # other content: not a resubmission
    jobs = (await control.stats()).job_contents
    assert jobs.submissions == 3
    assert jobs.distinct_contents == 2
    assert jobs.max_submissions_per_content == 2
    assert (jobs.resubmitted_accepted, jobs.resubmitted_after_failure) == (1, 0)

    await control.set_faults("hidream", async_failure_rate=1.0)
    other = garment_jpeg((0, 150, 0))
    await submit(other, "d")  # fails at once (no queued/running time)
    await submit(other, "e")  # a new try after a failed job: not paid twice
    jobs = (await control.stats()).job_contents
    assert (jobs.resubmitted_accepted, jobs.resubmitted_after_failure) == (1, 1)
    assert jobs.failing == 2


# -- knobs for hostile-provider tests --------------------------------------------------------


async def test_echo_credentials_quotes_a_rejected_key_and_the_client_redacts_it(
    emulators: Emulators, person: bytes, garment: bytes
) -> None:
    wrong = "wrong-key-0123456789"
    fields = garment_fields(person, garment)
    files = {k: v for k, v in fields.items() if isinstance(v, tuple)}
    data = {k: v for k, v in fields.items() if not isinstance(v, tuple)}
    http = emulators.http
    for echo in (False, True):
        server = emulators.start(EmulatorConfig(echo_credentials=echo))
        raw = await http.post(
            server.base_url + GARMENT_PATH, headers=bearer(SecretStr(wrong)), files=files, data=data
        )
        assert raw.json()["code"] == 30001
        assert (wrong in raw.text) is echo  # the vendor's error text quotes the key
        client = ChangeClothesClient(http=http, api_key=SecretStr(wrong), base_url=server.base_url)
        with pytest.raises(Exception, match="INVALID_API_KEY") as caught:
            await client.try_on(garment_request(person, garment))
        assert wrong not in str(caught.value) and wrong not in repr(caught.value)


async def test_result_name_prefix_hands_out_hostile_file_names(
    emulators: Emulators, api_key: SecretStr, person: bytes, garment: bytes
) -> None:
    server = emulators.start(EmulatorConfig(result_name_prefix="..%2F..%2Fescape-"))
    http = emulators.http
    client = ChangeClothesClient(http=http, api_key=api_key, base_url=server.base_url)
    result = await client.try_on(garment_request(person, garment))
    assert result.result_url is not None
    assert "/files/..%2F..%2Fescape-" in result.result_url
    response = await http.get(result.result_url)
    assert response.status_code == 200
    assert 'filename="../../escape-' in response.headers["content-disposition"]
    assert await client.download(result.result_url) == response.content
    assert decode(response.content).shape[0] > 0
