"""End to end: the official OpenAI SDK against ``gandalf serve`` routing to
mock Anthropic, Gemini and Ollama upstreams (started here, on 127.0.0.1).

One gateway serves the module. What is checked is what an app switching a
route from OpenAI to another provider relies on: text, multi-turn tool calls
and their results, JSON mode, streaming (text and tool calls, assembled from
deltas as the SDK's users do), usage (in the answer and in the usage table),
the provider's credentials upstream (never the caller's), and errors.
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

from gandalf.auth.apikey import generate_key
from tests.mock_anthropic import MockAnthropic
from tests.mock_gemini import SIGNATURE, MockGemini
from tests.serve import GandalfServer, route, wait_until
from tests.upstream import MockUpstream, running_upstream

KEY = generate_key()
ANTHROPIC_SECRET = "sk-ant-provider-secret"
GEMINI_SECRET = "gemini-provider-secret"

WEATHER_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
        },
    },
]


@pytest.fixture(scope="module")
def ollama_mock() -> Iterator[MockUpstream]:
    with running_upstream() as mock:
        yield mock


@pytest.fixture(scope="module")
def gateway(
    anthropic_mock: MockAnthropic,
    gemini_mock: MockGemini,
    ollama_mock: MockUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GandalfServer]:
    config = {
        "server": {"access_log": False},
        "providers": [
            {
                "name": "claude",
                "type": "anthropic",
                "base_url": anthropic_mock.base_url,
                "api_key": ANTHROPIC_SECRET,
                "max_tokens": 1000,
            },
            {
                "name": "gem",
                "type": "gemini",
                "base_url": gemini_mock.base_url,
                "api_key": GEMINI_SECRET,
            },
            {"name": "local", "type": "ollama", "base_url": f"http://127.0.0.1:{ollama_mock.port}"},
        ],
        "routes": [
            route("claude", "claude", "claude-ok"),
            route("claude-tools", "claude", "claude-tools"),
            route("claude-json", "claude", "claude-json"),
            route("claude-overloaded", "claude", "claude-overloaded"),
            route("claude-400", "claude", "claude-status-400"),
            route("claude-stream-error", "claude", "claude-stream-error"),
            route("gemini", "gem", "gemini-ok"),
            route("gemini-thinking", "gem", "gemini-thinking"),
            route("gemini-tools", "gem", "gemini-tools"),
            route("gemini-json", "gem", "gemini-json"),
            route("gemini-unavailable", "gem", "gemini-unavailable"),
            route("gemini-embed", "gem", "text-embedding-004"),
            {
                "model_alias": "claude-else-gemini",
                "targets": [
                    {"provider": "claude", "model": "claude-overloaded", "priority": 1},
                    {"provider": "gem", "model": "gemini-ok", "priority": 2},
                ],
            },
        ],
        "keys": [{"name": "app", "key": KEY, "role": "member"}],
    }
    tmp = tmp_path_factory.mktemp("providers")
    with GandalfServer(tmp, config) as server:
        yield server


@pytest.fixture(scope="module")
def client(gateway: GandalfServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0, timeout=30.0) as sdk:
        yield sdk


def usage_rows(gateway: GandalfServer, alias: str, count: int) -> list[tuple[Any, ...]]:
    """The usage rows of ``alias`` once there are ``count`` of them."""
    db = Path(gateway.tmp) / "gandalf.db"
    query = (
        "SELECT provider, target_model, prompt_tokens, completion_tokens, total_tokens, status "
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


def assemble(stream: Any) -> tuple[str, list[dict[str, str]], str | None, Any]:
    """(content, tool calls, finish reason, usage) from SDK stream chunks, the
    way OpenAI's docs tell apps to assemble them (by tool call index)."""
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish = usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                text.append(delta.content)
            for call in delta.tool_calls or ():
                slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                if call.id:
                    slot["id"] = call.id
                if call.function is not None:
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    return "".join(text), [calls[i] for i in sorted(calls)], finish, usage


# ---------------------------------------------------------------------------- anthropic


def test_anthropic_chat(
    client: OpenAI, gateway: GandalfServer, anthropic_mock: MockAnthropic
) -> None:
    reply = client.chat.completions.create(
        model="claude",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello Claude"},
        ],
    )
    choice = reply.choices[0]
    assert choice.message.content == "Hello Claude"
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    seen = anthropic_mock.received[-1]
    assert seen.headers["x-api-key"] == ANTHROPIC_SECRET
    assert seen.headers["anthropic-version"]
    assert KEY not in json.dumps(dict(seen.headers))
    sent = json.loads(seen.body)
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 1000
    assert sent["model"] == "claude-ok"
    rows = usage_rows(gateway, "claude", 1)
    assert rows[-1] == (
        "claude",
        "claude-ok",
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        200,
    )


def test_anthropic_stream_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "a somewhat longer sentence to stream"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, calls, finish, usage = assemble(stream)
    assert text == "a somewhat longer sentence to stream"
    assert calls == [] and finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


def test_anthropic_tools_round_trip_plain_and_streamed(client: OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]
    reply = client.chat.completions.create(
        model="claude-tools", messages=messages, tools=WEATHER_TOOLS
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    got = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls]  # type: ignore[union-attr]
    assert got == [
        ("toolu_mock_weather", "get_weather", {"city": "Paris", "unit": "celsius"}),
        ("toolu_mock_time", "get_time", {"timezone": "Europe/Paris"}),
    ]
    text, streamed, finish, _ = assemble(
        client.chat.completions.create(
            model="claude-tools", messages=messages, tools=WEATHER_TOOLS, stream=True
        )
    )
    assert finish == "tool_calls" and text == (choice.message.content or "")
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in streamed] == got
    follow_up = [
        *messages,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "toolu_mock_weather", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "toolu_mock_time", "content": "14:05"},
    ]
    answer = client.chat.completions.create(
        model="claude-tools", messages=follow_up, tools=WEATHER_TOOLS
    )
    assert answer.choices[0].message.content == "Results: 18C, sunny; 14:05"
    assert answer.choices[0].finish_reason == "stop"


def test_anthropic_json_schema(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="claude-json",
        messages=[{"role": "user", "content": "json please"}],
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "echo",
                "schema": {"type": "object", "properties": {"echo": {"type": "string"}}},
            },
        },
    )
    assert json.loads(reply.choices[0].message.content or "") == {"echo": "json please"}
    assert reply.choices[0].finish_reason == "stop"
    assert not reply.choices[0].message.tool_calls


def test_anthropic_errors(client: OpenAI) -> None:
    chat: list[Any] = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.APIStatusError) as overloaded:
        client.chat.completions.create(model="claude-overloaded", messages=chat)
    assert overloaded.value.status_code == 503
    assert overloaded.value.body["code"] == "upstream_overloaded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="claude-400", messages=chat)
    assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="claude", messages=chat, n=2)
    assert refused.value.body["param"] == "n"  # type: ignore[index]
    assert "anthropic" in refused.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.APIError) as mid_stream:
        assemble(
            client.chat.completions.create(model="claude-stream-error", messages=chat, stream=True)
        )
    assert "overloaded" in str(mid_stream.value.message)


# ---------------------------------------------------------------------------- gemini


def test_gemini_chat_and_stream(
    client: OpenAI, gateway: GandalfServer, gemini_mock: MockGemini
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello gemini from the sdk"},
    ]
    reply = client.chat.completions.create(model="gemini", messages=messages, temperature=0)
    assert reply.choices[0].message.content == "hello gemini from the sdk"
    assert reply.choices[0].finish_reason == "stop"
    seen = gemini_mock.received[-1]
    assert seen.headers["x-goog-api-key"] == GEMINI_SECRET and "key=" not in seen.query
    assert KEY not in json.dumps(dict(seen.headers))
    assert json.loads(seen.body)["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    text, calls, finish, usage = assemble(
        client.chat.completions.create(
            model="gemini",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert text == "hello gemini from the sdk" and finish == "stop" and calls == []
    # usageMetadata is cumulative: the last one counts (5 words), never the sum.
    assert usage is not None and usage.completion_tokens == 5
    assert reply.usage is not None and usage.prompt_tokens == reply.usage.prompt_tokens
    rows = usage_rows(gateway, "gemini", 2)
    assert [row[3] for row in rows[-2:]] == [5, 5]


def test_gemini_thinking_usage(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gemini-thinking", messages=[{"role": "user", "content": "think"}]
    )
    usage = reply.usage
    assert usage is not None and reply.choices[0].message.content == "think"
    assert usage.completion_tokens == 1 + 5  # the answer's words + thinking tokens
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 5
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_tools_round_trip_keeps_the_thought_signature(client: OpenAI, stream: bool) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]
    if stream:
        _, calls, finish, _ = assemble(
            client.chat.completions.create(
                model="gemini-tools", messages=messages, tools=WEATHER_TOOLS, stream=True
            )
        )
    else:
        reply = client.chat.completions.create(
            model="gemini-tools", messages=messages, tools=WEATHER_TOOLS
        )
        finish = reply.choices[0].finish_reason
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}  # type: ignore[union-attr]
            for c in reply.choices[0].message.tool_calls or []
        ]
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "Europe/Paris"}),
    ]
    assert len({c["id"] for c in calls}) == 2
    follow_up = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls
            ],
        },
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temp": 18}'},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "14:05"},
    ]
    # The mock answers 400 (as Gemini 3 does) unless the signature came back.
    answer = client.chat.completions.create(
        model="gemini-tools", messages=follow_up, tools=WEATHER_TOOLS
    )
    content = answer.choices[0].message.content or ""
    assert content.startswith("results: ")
    assert json.loads(content[len("results: ") :]) == {
        "get_weather": {"temp": 18},
        "get_time": {"content": "14:05"},
    }
    assert SIGNATURE  # the mock's check above is what proves the round trip


def test_gemini_json_errors_and_embeddings(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gemini-json",
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_object"},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"echo": "hi"}
    with pytest.raises(openai.APIStatusError) as unavailable:
        client.chat.completions.create(
            model="gemini-unavailable", messages=[{"role": "user", "content": "x"}]
        )
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="gemini", messages=[{"role": "user", "content": "x"}], logit_bias={"1": 5}
        )
    assert refused.value.body["param"] == "logit_bias"  # type: ignore[index]
    vectors = client.embeddings.create(
        model="gemini-embed", input=["one", "two"], dimensions=4, encoding_format="float"
    )
    assert [len(item.embedding) for item in vectors.data] == [4, 4]
    assert [item.index for item in vectors.data] == [0, 1]
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    as_base64 = client.embeddings.create(model="gemini-embed", input="one", dimensions=4)
    assert as_base64.data[0].embedding == pytest.approx(vectors.data[0].embedding, rel=1e-6)


# ---------------------------------------------------------------------------- across providers


@pytest.mark.parametrize("stream", [False, True])
def test_failover_from_an_overloaded_anthropic_to_gemini(
    client: OpenAI, gateway: GandalfServer, stream: bool
) -> None:
    messages: list[Any] = [{"role": "user", "content": "anyone there"}]
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="claude-else-gemini", messages=messages, stream=True
        ) as raw:
            headers = raw.headers
            text, _, finish, _ = assemble(raw.parse())
    else:
        raw_reply = client.chat.completions.with_raw_response.create(
            model="claude-else-gemini", messages=messages
        )
        headers = raw_reply.headers
        reply = raw_reply.parse()
        text, finish = reply.choices[0].message.content or "", reply.choices[0].finish_reason
    assert (text, finish) == ("anyone there", "stop")  # Gemini's answer, in OpenAI's format
    assert headers["x-gandalf-provider"] == "gem" and headers["x-gandalf-attempts"] == "2"


# ---------------------------------------------------------------------------- ollama


def test_ollama_models_are_discovered_and_served(client: OpenAI, ollama_mock: MockUpstream) -> None:
    listed = {model.id: model.owned_by for model in client.models.list()}
    assert listed["ok-local"] == "local" and listed["llama3.2:1b"] == "local"
    reply = client.chat.completions.create(
        model="ok-local", messages=[{"role": "user", "content": "local hello"}]
    )
    assert reply.choices[0].message.content == "local hello"
    text, _, finish, usage = assemble(
        client.chat.completions.create(
            model="ok-local",
            messages=[{"role": "user", "content": "streamed locally"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert text == "streamed locally" and finish == "stop" and usage is not None
    assert ollama_mock.received[-1].path == "/v1/chat/completions"
