"""The deployment's parameter form: the JSON schema Prefect builds from ``BatchParams``.

Prefect's UI draws the form from it, ``enforce_parameter_schema`` checks runs against it, and
API users read it: choices where there are choices, defaults instead of optional "None" types,
titles and help written for users.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from flows.batch import tryon_batch
from flows.params import BatchParams, ProviderLimits, run_name
from flows.sharded import tryon_sharded
from providers.registry import PROVIDERS
from tests.flows.conftest import REPO

# Phrases of code comments and docstrings, not of help for a form's user.
CODE_PHRASES = ("``", "renders them", "TODO", "see flows/", ".py", "None")


@pytest.fixture(autouse=True)
def _on_the_session_prefect_server() -> None:
    """No Prefect server: these tests only build schemas and models."""


def deployment_schema(flow: Any = tryon_batch) -> dict[str, Any]:
    """The parameter schema as ``prefect deploy`` sends it to the server."""
    from prefect.utilities.callables import parameter_schema

    schema: dict[str, Any] = parameter_schema(flow).model_dump_for_openapi()
    return schema


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in node:
        return node
    target = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def user_fields(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property a user sees in the form, nested models included, resolved."""
    todo = [(name, resolve(schema, node)) for name, node in schema["properties"].items()]
    while todo:
        path, node = todo.pop()
        yield path, node
        for name, child in node.get("properties", {}).items():
            todo.append((f"{path}.{name}", resolve(schema, child)))


def test_provider_is_a_choice_of_the_registered_providers() -> None:
    schema = deployment_schema()
    provider = schema["definitions"]["BatchParams"]["properties"]["provider"]
    assert provider["enum"] == sorted(PROVIDERS)
    assert provider["default"] in provider["enum"]
    assert provider["type"] == "string"


def test_no_field_is_an_optional_none_type() -> None:
    """The UI draws ``anyOf [X, null]`` as a type toggle ("Property is type 'None'")."""
    for flow in (tryon_batch, tryon_sharded):
        schema = deployment_schema(flow)
        for path, node in user_fields(schema):
            variants = node.get("anyOf", []) + node.get("oneOf", [])
            assert not variants, f"{flow.name}: {path} is a union: {variants}"
            assert node.get("type") != "null", path
            assert node.get("default", 0) is not None, f"{path} defaults to null"


def test_titles_and_descriptions_read_as_help() -> None:
    for flow in (tryon_batch, tryon_sharded):
        schema = deployment_schema(flow)
        texts = [("params", schema["definitions"]["BatchParams"])]
        texts += [("limits", schema["definitions"]["ProviderLimits"])]
        texts += list(user_fields(schema))
        for path, node in texts:
            assert node.get("title"), f"{path} has no title"
            description = node.get("description", "")
            assert description, f"{path} has no description"
            # Markdown in the UI eats anything in angle brackets as HTML.
            assert "<" not in description and ">" not in description, (path, description)
            assert "\n" not in description, (path, description)
            for phrase in CODE_PHRASES:
                assert phrase not in description, (path, phrase, description)
        assert flow.description and "<" not in flow.description and "`" not in flow.description


def test_field_titles_are_words_not_identifiers() -> None:
    schema = deployment_schema()
    titles = {path: node["title"] for path, node in user_fields(schema)}
    assert titles["params.fetch_timeout_s"] == "Image fetch timeout (seconds)"
    assert titles["params.limits.max_in_flight"] == "Calls in flight"
    assert schema["definitions"]["BatchParams"]["title"] == "Try-on batch"


def test_the_form_defaults_are_valid_parameters() -> None:
    """What the form submits untouched (every default, a manifest typed in) is a valid run."""
    schema = deployment_schema()
    submitted = {
        name: node["default"]
        for name, node in user_fields(schema)
        if "default" in node and name.count(".") == 1
    }
    params = BatchParams.model_validate(
        {k.split(".", 1)[1]: v for k, v in submitted.items()} | {"manifest": "m.csv"}
    )
    assert params.limits == ProviderLimits()
    assert params.gender_for_refiner is None


def test_unknown_provider_is_refused_by_the_model_with_the_choices() -> None:
    with pytest.raises(ValidationError) as caught:
        BatchParams(manifest="m.csv", provider="nope")
    message = caught.value.errors()[0]["msg"]
    assert "unknown provider 'nope'" in message
    assert all(name in message for name in PROVIDERS)


def test_callers_passing_none_for_a_default_keep_working() -> None:
    """The CLI and callers written when limits and the refiner's gender were optional."""
    params = BatchParams.model_validate(
        {
            "manifest": "m.csv",
            "limits": {"max_in_flight": None, "requests_per_second": None},
            "refine_limits": {"global_max_in_flight": None},
            "refine_gender": None,
        }
    )
    assert params.limits.max_in_flight == 0 and params.limits.requests_per_second == 0
    assert params.refine_limits.global_max_in_flight == 0
    assert params.refine_gender == "unset" and params.gender_for_refiner is None
    assert BatchParams(manifest="m.csv", refine_gender="man").gender_for_refiner == "man"
    assert params.chunk_settings().refine_gender is None


def test_limits_refuse_negative_values() -> None:
    with pytest.raises(ValidationError):
        ProviderLimits(max_in_flight=-1)
    with pytest.raises(ValidationError):
        ProviderLimits(requests_per_second=-0.5)


def test_run_names_say_what_ran_and_when() -> None:
    at = datetime(2025, 6, 1, 14, 3, 22, tzinfo=UTC)
    params = BatchParams(manifest="sample/manifest.csv", provider="hidream")
    assert run_name(params, at=at) == "manifest-hidream-20250601T140322Z"
    s3 = BatchParams(manifest="s3://b/in/Spring drop (v2).parquet", refine=True)
    assert run_name(s3, at=at, kind="3-shards") == (
        "Spring-drop-v2-changeclothes+refine-3-shards-20250601T140322Z"
    )
    assert run_name(BatchParams(manifest="s3://b/"), at=at).startswith("manifest-")


def test_provider_choices_include_plugins(tmp_path: Path) -> None:
    """A provider another distribution registers (entry points) is in the form's choices of a
    deployment made where it is installed."""
    from tests.providers.test_out_of_tree import install

    site = tmp_path / "site"
    install(site)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), PREFECT_HOME=str(tmp_path))
    code = (
        "import json; from prefect.utilities.callables import parameter_schema; "
        "from flows.batch import tryon_batch; "
        "s = parameter_schema(tryon_batch).model_dump_for_openapi(); "
        "print(json.dumps(s['definitions']['BatchParams']['properties']['provider']['enum']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == sorted([*PROVIDERS, "acme"])


def test_route_fallback_and_compare_are_checked_against_providers_and_categories() -> None:
    params = BatchParams(
        manifest="m.csv",
        route={"dresses": "hidream"},
        fallback=["hidream", "tencent", "hidream"],
        compare=["ailab"],
    )
    assert params.route == {"dresses": "hidream"}
    assert params.fallback == ["hidream", "tencent"]  # a provider is tried once
    with pytest.raises(ValidationError, match="unknown category 'dress'"):
        BatchParams(manifest="m.csv", route={"dress": "hidream"})
    with pytest.raises(ValidationError, match="unknown provider 'acme'"):
        BatchParams(manifest="m.csv", route={"dresses": "acme"})
    for field in ("fallback", "compare"):
        with pytest.raises(ValidationError, match="unknown provider 'acme'"):
            BatchParams.model_validate({"manifest": "m.csv", field: ["acme"]})


def test_the_form_offers_providers_as_choices_for_fallback_and_compare() -> None:
    properties = deployment_schema()["definitions"]["BatchParams"]["properties"]
    for field in ("fallback", "compare"):
        assert properties[field]["items"]["enum"] == sorted(PROVIDERS)
        assert properties[field]["type"] == "array"


def test_a_comparing_run_is_named_after_its_providers() -> None:
    at = datetime(2025, 6, 1, 14, 3, 22, tzinfo=UTC)
    params = BatchParams(manifest="m.csv", compare=["hidream", "tencent"])
    assert run_name(params, at=at) == "m-changeclothes-vs-hidream-tencent-20250601T140322Z"
