"""End to end: the official OpenAI SDK's Responses API (``client.responses``)
against ``gandalf serve``, for every provider type.

Relayed: an OpenAI-compatible upstream that serves ``/v1/responses`` (the mock
upstream, tests/mock_responses.py). Translated through chat: the same mock
with ``responses: false`` (its chat API), the Anthropic and Gemini mocks, and
the fake provider. Checked: text, streams (the SDK's typed events, assembled
as its users do), function calling round trips, structured output with
``responses.parse``, ``previous_response_id`` across providers, retrieve and
delete, one usage row per request (endpoint ``responses``), and bad input.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from gandalf.auth.apikey import generate_key
from tests.mock_anthropic import MockAnthropic
from tests.mock_gemini import MockGemini
from tests.serve import GandalfServer, route, wait_until
from tests.upstream import MockUpstream

KEY = generate_key()
OTHER = generate_key()
ROOT = "http://127.0.0.1:{}"

# family -> (text route, tools route or None, json route or None)
FAMILIES: dict[str, tuple[str, str | None, str | None]] = {
    "relayed": ("up-text", "up-tools", "up-json"),
    "openai-chat": ("upchat-text", None, None),
    "anthropic": ("claude-text", "claude-tools", "claude-json"),
    "gemini": ("gemini-text", "gemini-tools", "gemini-json"),
    "fake": ("fake-text", None, None),
    "azure": ("az-text", None, None),
    "ollama": ("ol-text", None, None),
}
TEXT = [(family, routes[0]) for family, routes in FAMILIES.items()]
TOOLS = [(f, r[1]) for f, r in FAMILIES.items() if r[1] is not None]
JSON = [(f, r[2]) for f, r in FAMILIES.items() if r[2] is not None]

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}
TIME: Any = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
}


class Echo(BaseModel):
    echo: str


@pytest.fixture(scope="module")
def gateway(
    upstream: MockUpstream,
    anthropic_mock: MockAnthropic,
    gemini_mock: MockGemini,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GandalfServer]:
    config = {
        "server": {"access_log": False},
        "providers": [
            {"name": "up", "type": "openai", "base_url": upstream.base_url, "api_key": "sk-up"},
            {
                "name": "upchat",
                "type": "openai",
                "base_url": upstream.base_url,
                "api_key": "sk-up",
                "responses": False,
            },
            {
                "name": "claude",
                "type": "anthropic",
                "base_url": anthropic_mock.base_url,
                "api_key": "sk-ant",
                "max_tokens": 1000,
            },
            {"name": "gem", "type": "gemini", "base_url": gemini_mock.base_url, "api_key": "g"},
            {"name": "fake", "type": "fake"},
            {
                "name": "az",
                "type": "azure",
                "base_url": ROOT.format(upstream.port),
                "api_key": "az",
            },
            {
                "name": "local",
                "type": "ollama",
                "base_url": ROOT.format(upstream.port),
                "models": ["x"],
            },
        ],
        "routes": [
            route("up-text", "up", "echo-model"),
            route("up-tools", "up", "resp-tools"),
            route("up-json", "up", "resp-json"),
            route("up-missing", "up", "status-404"),
            route("upchat-text", "upchat", "ok-chat"),
            route("claude-text", "claude", "claude-ok"),
            route("claude-tools", "claude", "claude-tools"),
            route("claude-json", "claude", "claude-json"),
            route("gemini-text", "gem", "gemini-ok"),
            route("gemini-tools", "gem", "gemini-tools"),
            route("gemini-json", "gem", "gemini-json"),
            route("fake-text", "fake", "fake-model"),
            route("az-text", "az", "ok-azure"),
            route("ol-text", "local", "ok-ollama"),
        ],
        "keys": [
            {"name": "app", "key": KEY, "role": "member"},
            {"name": "other", "key": OTHER, "role": "member"},
        ],
    }
    with GandalfServer(tmp_path_factory.mktemp("responses"), config) as server:
        yield server


@pytest.fixture(scope="module")
def client(gateway: GandalfServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0, timeout=30.0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def other(gateway: GandalfServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=gateway.base_url, api_key=OTHER, max_retries=0, timeout=30.0) as sdk:
        yield sdk


def usage_rows(gateway: GandalfServer, alias: str, count: int) -> list[tuple[Any, ...]]:
    db = Path(gateway.tmp) / "gandalf.db"
    query = (
        "SELECT endpoint, provider, prompt_tokens, completion_tokens, status "
        "FROM usage_records WHERE model_alias = ? ORDER BY id"
    )
    rows: list[tuple[Any, ...]] = []

    def ready() -> bool:
        nonlocal rows
        with sqlite3.connect(db) as conn:
            rows = conn.execute(query, (alias,)).fetchall()
        return len(rows) >= count

    wait_until(ready, 10, f"{count} usage rows for {alias}")
    return rows


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(("family", "model"), TEXT)
def test_create_answers_text_on_every_provider(client: OpenAI, family: str, model: str) -> None:
    raw = client.responses.with_raw_response.create(
        model=model, input="hello there", instructions="Be brief.", store=False
    )
    response = raw.parse()
    assert response.object == "response" and response.status == "completed"
    assert "hello there" in response.output_text
    assert response.usage is not None and response.usage.total_tokens > 0
    assert response.output[0].type == "message"
    assert raw.headers["x-gandalf-provider"] in (
        "up",
        "upchat",
        "claude",
        "gem",
        "fake",
        "az",
        "local",
    )


@pytest.mark.parametrize(("family", "model"), TEXT)
def test_stream_gives_the_typed_events_on_every_provider(
    client: OpenAI, family: str, model: str
) -> None:
    deltas: list[str] = []
    kinds: list[str] = []
    numbers: list[int] = []
    with client.responses.stream(model=model, input="stream me please", store=False) as stream:
        for event in stream:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert kind in kinds, (kind, kinds)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert "".join(deltas) == final.output_text
    assert "stream me please" in final.output_text
    assert final.usage is not None and final.usage.output_tokens > 0


# --------------------------------------------------------------------------- tools


def _outputs(response: Any) -> list[Any]:
    return [
        {"type": "function_call_output", "call_id": item.call_id, "output": f"sunny ({item.name})"}
        for item in response.output
        if item.type == "function_call"
    ]


@pytest.mark.parametrize(("family", "model"), TOOLS)
def test_function_calling_round_trip(client: OpenAI, family: str, model: str) -> None:
    first_input: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.responses.create(
        model=model, input=first_input, tools=[WEATHER, TIME], store=False
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["city"] == "Paris"
    second = client.responses.create(
        model=model,
        input=[*first_input, *first.output, *_outputs(first)],  # type: ignore[list-item]
        tools=[WEATHER, TIME],
        store=False,
    )
    assert "sunny" in second.output_text.lower()


@pytest.mark.parametrize(("family", "model"), TOOLS)
def test_streamed_function_call(client: OpenAI, family: str, model: str) -> None:
    arguments: list[str] = []
    with client.responses.stream(
        model=model, input="Weather in Paris?", tools=[WEATHER, TIME], store=False
    ) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                arguments.append(event.delta)
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    assert json.loads(calls[0].arguments)["city"] == "Paris"
    assert "".join(arguments) == "".join(c.arguments for c in calls)


@pytest.mark.parametrize(("family", "model"), TOOLS)
def test_continuation_carries_the_tool_calls(client: OpenAI, family: str, model: str) -> None:
    first = client.responses.create(model=model, input="Weather in Paris?", tools=[WEATHER, TIME])
    second = client.responses.create(
        model=model,
        previous_response_id=first.id,
        input=_outputs(first),
        tools=[WEATHER, TIME],
    )
    assert "sunny" in second.output_text.lower()


# --------------------------------------------------------------------------- structured output


@pytest.mark.parametrize(("family", "model"), JSON)
def test_parse_with_a_pydantic_model(client: OpenAI, family: str, model: str) -> None:
    parsed = client.responses.parse(model=model, input="hi there", text_format=Echo, store=False)
    assert parsed.output_parsed is not None
    assert "hi there" in parsed.output_parsed.echo


# --------------------------------------------------------------------------- stored responses


@pytest.mark.parametrize(
    ("first_model", "then_model"),
    [
        ("up-text", "up-text"),
        ("claude-text", "claude-text"),
        ("up-text", "claude-text"),
        ("gemini-text", "up-text"),
        ("fake-text", "gemini-text"),
    ],
)
def test_previous_response_id_continues_on_any_provider(
    client: OpenAI,
    upstream: MockUpstream,
    anthropic_mock: MockAnthropic,
    gemini_mock: MockGemini,
    first_model: str,
    then_model: str,
) -> None:
    first = client.responses.create(model=first_model, input="My name is Gandalf.")
    second = client.responses.create(
        model=then_model, input="What is my name?", previous_response_id=first.id
    )
    assert "What is my name?" in second.output_text
    mock: Any = {"up": upstream, "claude": anthropic_mock, "gemini": gemini_mock}[
        then_model.split("-")[0]
    ]
    sent = mock.received[-1].json()
    assert "previous_response_id" not in sent  # resolved by Gandalf, never relayed
    assert "My name is Gandalf." in json.dumps(sent)
    assert first.output_text in json.dumps(sent)  # the answer is in the history too
    if "input" in sent:  # relayed: the history's items without another provider's ids
        assert [item.get("id") for item in sent["input"]] == [None] * len(sent["input"])


def test_retrieve_and_delete(client: OpenAI) -> None:
    made = client.responses.create(model="claude-text", input="keep me", metadata={"k": "v"})
    got = client.responses.retrieve(made.id)
    assert got.id == made.id and got.output_text == made.output_text
    assert got.metadata == {"k": "v"}
    relayed = client.responses.create(model="up-text", input="keep me too")
    assert client.responses.retrieve(relayed.id).output_text == relayed.output_text
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(made.id)


def test_store_false_keeps_nothing(client: OpenAI) -> None:
    made = client.responses.create(model="fake-text", input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


def test_a_key_cannot_reach_another_keys_response(client: OpenAI, other: OpenAI) -> None:
    made = client.responses.create(model="fake-text", input="mine")
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError) as caught:
        other.responses.create(model="fake-text", input="go on", previous_response_id=made.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert client.responses.retrieve(made.id).id == made.id  # still there for its owner


def test_unknown_previous_response_id_is_a_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model="up-text", input="go on", previous_response_id="resp_nosuchthing"
        )


# --------------------------------------------------------------------------- accounting


def test_one_usage_row_per_request_with_endpoint_responses(
    client: OpenAI, gateway: GandalfServer
) -> None:
    client.responses.create(model="up-json", input="count me", store=False)
    with client.responses.stream(model="up-json", input="count me", store=False) as stream:
        stream.get_final_response()
    rows = usage_rows(gateway, "up-json", 2)
    assert [(r[0], r[1], r[4]) for r in rows[-2:]] == [("responses", "up", 200)] * 2
    assert all(r[2] > 0 and r[3] > 0 for r in rows[-2:])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"type": "message", "role": "user"}]}, "input[0].content"),
        ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0].type"),
        ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, None),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
        ({"input": [42]}, None),
        ({"input": ""}, "input"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "max_output_tokens": 0}, None),
    ],
)
def test_bad_input_is_a_400_naming_it(
    client: OpenAI, body: dict[str, Any], param: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/responses", body={"model": "claude-text", **body}, cast_to=dict[str, Any])
    error: Any = caught.value.body
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if param == "tools[0].type":
        assert "web_search" in error["message"]


def test_reasoning_effort_on_a_provider_without_it_is_a_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="claude-text", input="hi", reasoning={"effort": "low"})
    assert "reasoning.effort" in str(caught.value)


def test_upstream_errors_keep_their_status(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="up-missing", input="hi")


def test_unknown_subpaths_are_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.get("/responses/resp_x/input_items", cast_to=dict[str, Any])
