"""The emulator's bad outputs (``FaultPlan.bad_outputs``, ``bad_output_rate``) against the result
check: every provider's normal result passes ``check_output``, and each bad output, fetched
through the provider's real client, fails it with its own code, in normal and fast mode."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from emulator import EmulatorConfig, FaultPlan, composite
from emulator.config import BadOutput
from providers.base import ProviderError, RefineRequest, TryOnRequest, TryOnResult
from tasks.output_checks import check_output
from tests.contract import CONTRACT_CONFIG, Emulators, ImageHost
from tests.images import prepared
from tests.providers.sites import site, standard_request

# What each emulator route produces, by name: a provider and one of its endpoints.
CASES = ["changeclothes", "changeclothes-prompt", "ailab", "ailab-refiner", "hidream", "tencent"]
EXPECTED: dict[BadOutput, str] = {
    "blank": "OUTPUT_BLANK",
    "unchanged": "OUTPUT_UNCHANGED",
    "tiny": "OUTPUT_TOO_SMALL",
    "wide": "OUTPUT_BAD_ASPECT",
    "corrupt": "RESULT_NOT_AN_IMAGE",
}
QUICK_JOBS = {"job_queued_s": 0.0, "job_running_s": 0.05}


@dataclass
class Route:
    """One case's site on a fresh in-process emulator: ``run`` calls the real client."""

    case: str
    on: Any  # the provider's tests.contract.Site

    @property
    def provider(self) -> str:
        return self.on.provider

    async def faults(self, **fields: Any) -> None:
        await self.on.faults(**fields)

    async def run(self, person: bytes, garment: bytes) -> tuple[bytes, bytes]:
        """The result's bytes, as the client hands them over, and the person image sent."""
        if self.case == "ailab-refiner":
            coarse = composite.render_garment(person, garment, "upper_body").result
            request = RefineRequest(
                row_id="row-1",
                person=prepared(person),
                top_garment=prepared(garment),
                coarse=prepared(_jpeg(coarse)),
                gender="woman",
            )
            client: Any = self.on.refiner()
            result: TryOnResult = await client.refine(request)
        else:
            tryon = standard_request(self.on, person, garment)
            if self.case == "changeclothes-prompt":
                tryon = TryOnRequest(row_id="row-1", person=tryon.person, prompt="a red shirt")
            client = self.on.client()
            result = await client.try_on(tryon)
            request = tryon  # type: ignore[assignment]
        if result.result_data is not None:
            return result.result_data, request.person.data
        assert result.result_url is not None
        return await client.download(result.result_url), request.person.data


def _jpeg(webp: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(webp)).convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def start(
    case: str, emulators: Emulators, image_host: ImageHost, *, fast: bool = False, **plan: Any
) -> Route:
    provider = case.split("-")[0]
    faults = {provider: FaultPlan(**QUICK_JOBS, **plan)}
    config = CONTRACT_CONFIG.model_copy(update={"fast_mode": fast, "faults": faults})
    on = site(provider, emulators.http, emulators.start(config), emulators.clock, image_host)
    return Route(case, on)


def rejected(data: bytes, person: bytes) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        check_output(data, person=person)
    return info.value


@pytest.mark.parametrize("fast", [False, True], ids=["rendered", "fast"])
@pytest.mark.parametrize("case", CASES)
async def test_normal_results_pass_the_check(
    case: str,
    fast: bool,
    emulators: Emulators,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    route = start(case, emulators, image_host, fast=fast)
    data, sent = await route.run(person, garment)
    assert check_output(data, person=sent) == "webp"
    stats = await route.on.provider_stats()
    assert stats.bad_outputs == {}


@pytest.mark.parametrize("fast", [False, True], ids=["rendered", "fast"])
@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("case", CASES)
async def test_each_bad_output_is_caught_with_its_code(
    case: str,
    kind: BadOutput,
    fast: bool,
    emulators: Emulators,
    image_host: ImageHost,
    person: bytes,
    garment: bytes,
) -> None:
    route = start(case, emulators, image_host, fast=fast, bad_outputs=[kind])
    data, sent = await route.run(person, garment)
    error = rejected(data, sent)
    assert (error.code, error.provider) == (EXPECTED[kind], "result")
    assert (await route.on.provider_stats()).bad_outputs == {kind: 1}
    # The queue is spent: the next result is a good one again.
    again, sent = await route.run(person, garment)
    assert check_output(again, person=sent) == "webp"


async def test_unchanged_is_the_person_re_encoded_not_its_bytes(
    emulators: Emulators, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    route = start("changeclothes", emulators, image_host, bad_outputs=["unchanged"])
    data, sent = await route.run(person, garment)
    assert data != sent and data[8:12] == b"WEBP" and sent[:3] == b"\xff\xd8\xff"
    assert "of the picture changed" in rejected(data, sent).message


async def test_the_queue_comes_before_the_rate_and_is_visible_in_the_plan(
    emulators: Emulators, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    route = start("hidream", emulators, image_host)
    await route.faults(bad_outputs=["tiny", "corrupt"], bad_output_rate=1.0, bad_output="wide")
    plan = (await route.on.control.faults())["hidream"]
    assert (plan.bad_outputs, plan.bad_output_rate, plan.bad_output) == (
        ["tiny", "corrupt"],
        1.0,
        "wide",
    )
    codes = []
    for _ in range(3):
        data, sent = await route.run(person, garment)
        codes.append(rejected(data, sent).code)
    assert codes == ["OUTPUT_TOO_SMALL", "RESULT_NOT_AN_IMAGE", "OUTPUT_BAD_ASPECT"]
    assert (await route.on.control.faults())["hidream"].bad_outputs == []
    stats = await route.on.provider_stats()
    assert stats.bad_outputs == {"corrupt": 1, "tiny": 1, "wide": 1}
    assert stats.succeeded >= 3  # still successful calls, as far as the vendor is concerned


async def test_a_rate_replaces_about_that_share_of_results(
    emulators: Emulators, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    route = start("changeclothes", emulators, image_host, bad_output_rate=0.5)
    outcomes = []
    for _ in range(40):
        data, sent = await route.run(person, garment)
        try:
            check_output(data, person=sent)
            outcomes.append("ok")
        except ProviderError as exc:
            outcomes.append(exc.code)
    assert set(outcomes) == {"ok", "OUTPUT_BLANK"}  # bad_output defaults to blank
    assert 10 <= outcomes.count("OUTPUT_BLANK") <= 30
    assert (await route.on.provider_stats()).bad_outputs == {
        "blank": outcomes.count("OUTPUT_BLANK")
    }


async def test_failed_jobs_take_no_bad_output_from_the_queue(
    emulators: Emulators, image_host: ImageHost, person: bytes, garment: bytes
) -> None:
    route = start("ailab", emulators, image_host, async_failure_rate=1.0, bad_outputs=["blank"])
    with pytest.raises(ProviderError):
        await route.run(person, garment)
    await route.faults(async_failure_rate=0.0)
    data, sent = await route.run(person, garment)
    assert rejected(data, sent).code == "OUTPUT_BLANK"


async def test_the_control_endpoint_refuses_an_unknown_kind(
    emulators: Emulators, image_host: ImageHost
) -> None:
    route = start("tencent", emulators, image_host)
    for body in ({"bad_outputs": ["grey"]}, {"bad_output": "grey"}, {"bad_output_rate": 2}):
        answer = await emulators.http.post(
            f"{route.on.base_url}/_emulator/faults", json={"tencent": body}
        )
        assert answer.status_code == 422, body
    assert (await route.on.control.faults())["tencent"].bad_outputs == []


def test_reset_restores_the_configured_queue() -> None:
    from emulator.state import EmulatorState

    plan = FaultPlan(bad_outputs=["wide", "blank"])
    state = EmulatorState(EmulatorConfig(faults={"ailab": plan}), ["ailab"])
    ailab = state.provider("ailab")
    assert [ailab.next_bad_output(), ailab.next_bad_output(), ailab.next_bad_output()] == [
        "wide",
        "blank",
        None,
    ]
    state.reset_faults()
    assert ailab.current_plan().bad_outputs == ["wide", "blank"]


def test_bad_outputs_from_a_routes_render_fail_the_check(person: bytes, garment: bytes) -> None:
    result = composite.render_garment(person, garment, "upper_body").result
    for kind, code in EXPECTED.items():
        bad = composite.bad_output(kind, result, person)
        assert rejected(bad, person).code == code, kind
    with pytest.raises(ValueError, match="unknown bad output"):
        composite.bad_output("grey", result, person)  # type: ignore[arg-type]
