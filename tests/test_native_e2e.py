"""End to end: native clients through ``gandalf serve``. The official
``anthropic`` SDK, and raw HTTP for Gemini, Azure OpenAI and Ollama, against
mock upstreams; what the mocks received proves the caller's key was replaced
with the provider's and the routed model was put in place."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from gandalf.auth.apikey import generate_key
from tests.mock_anthropic import MockAnthropic
from tests.mock_gemini import MockGemini
from tests.serve import NATIVE_ROUTES, GandalfServer, native_providers, route, wait_until
from tests.upstream import MockUpstream, running_upstream

KEY = generate_key()
LIMITED = generate_key()  # may use "gemini" only
ANTHROPIC_SECRET = "sk-ant-native-secret"
GEMINI_SECRET = "gemini-native-secret"
AZURE_SECRET = "azure-native-secret"


@pytest.fixture(scope="module")
def openai_mock() -> Iterator[MockUpstream]:
    """Serves Azure's deployment paths and Ollama's native API."""
    with running_upstream() as mock:
        yield mock


@pytest.fixture(scope="module")
def gateway(
    anthropic_mock: MockAnthropic,
    gemini_mock: MockGemini,
    openai_mock: MockUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GandalfServer]:
    root = f"http://127.0.0.1:{openai_mock.port}"
    config = {
        "server": {"access_log": False},
        "providers": [
            *native_providers(
                anthropic_mock.base_url,
                gemini_mock.base_url,
                root,
                (ANTHROPIC_SECRET, GEMINI_SECRET, AZURE_SECRET),
            ),
            {"name": "fake", "type": "fake"},
        ],
        "routes": [
            *NATIVE_ROUTES,
            route("claude-tools", "claude", "claude-tools"),
            route("claude-429", "claude", "claude-status-429"),
            route("fake-model", "fake", "fake-1"),
        ],
        "keys": [
            {"name": "app", "key": KEY, "role": "member"},
            {"name": "limited", "key": LIMITED, "role": "member", "allowed_models": ["gemini"]},
        ],
    }
    with GandalfServer(tmp_path_factory.mktemp("native"), config) as server:
        yield server


@pytest.fixture(scope="module")
def claude(gateway: GandalfServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def http(gateway: GandalfServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30.0) as client:
        yield client


def _db(gateway: GandalfServer) -> Path:
    return Path(gateway.tmp) / "gandalf.db"


def last_id(gateway: GandalfServer) -> int:
    """The id of the newest usage row (0 if none), to wait for rows after it."""
    with sqlite3.connect(_db(gateway)) as conn:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM usage_records").fetchone()[0])


def usage_row(gateway: GandalfServer, endpoint: str, after: int) -> tuple[Any, ...]:
    """The first usage row of ``endpoint`` written after row ``after`` (waiting
    for the writer's batch)."""
    query = (
        "SELECT model_alias, provider, target_model, prompt_tokens, completion_tokens, status "
        "FROM usage_records WHERE endpoint = ? AND id > ? ORDER BY id LIMIT 1"
    )
    row: tuple[Any, ...] | None = None

    def ready() -> bool:
        nonlocal row
        with sqlite3.connect(_db(gateway)) as conn:
            row = conn.execute(query, (endpoint, after)).fetchone()
        return row is not None

    wait_until(ready, 10, f"a usage row for {endpoint}")
    assert row is not None
    return row


# ---------------------------------------------------------------------------- anthropic


def test_anthropic_sdk_messages(
    claude: anthropic.Anthropic, gateway: GandalfServer, anthropic_mock: MockAnthropic
) -> None:
    before = last_id(gateway)
    raw = claude.messages.with_raw_response.create(
        model="claude",
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello through Gandalf"}],
    )
    message = raw.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello through Gandalf"
    assert message.stop_reason == "end_turn" and message.id.startswith("msg_mock_")
    assert raw.headers["request-id"].startswith("req_mock_")  # the provider's header kept
    assert raw.headers["x-request-id"]  # and Gandalf's own
    seen = anthropic_mock.received[-1]
    assert seen.headers["x-api-key"] == ANTHROPIC_SECRET
    assert seen.headers["anthropic-version"]  # the SDK's own, relayed
    assert KEY not in json.dumps(seen.headers)
    assert json.loads(seen.body)["model"] == "claude-ok"
    usage = message.usage
    prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0)
    row = usage_row(gateway, "anthropic.messages", before)
    assert row == ("claude", "claude", "claude-ok", prompt, usage.output_tokens, 200)


def test_anthropic_sdk_stream_and_tools(
    claude: anthropic.Anthropic, gateway: GandalfServer
) -> None:
    before = last_id(gateway)
    with claude.messages.stream(
        model="claude", max_tokens=100, messages=[{"role": "user", "content": "stream me please"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "stream me please" and final.usage.output_tokens > 0
    row = usage_row(gateway, "anthropic.messages", before)
    assert row[4] == final.usage.output_tokens and row[5] == 200
    tools: list[Any] = [
        {
            "name": "get_weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    reply = claude.messages.create(
        model="claude-tools",
        max_tokens=100,
        tools=tools,
        messages=[{"role": "user", "content": "weather?"}],
    )
    uses = [(b.id, b.name, b.input) for b in reply.content if b.type == "tool_use"]
    assert uses == [
        ("toolu_mock_weather", "get_weather", {"city": "Paris", "unit": "celsius"}),
        ("toolu_mock_time", "get_time", {"timezone": "Europe/Paris"}),
    ]
    assert reply.stop_reason == "tool_use"
    count = claude.messages.count_tokens(
        model="claude", messages=[{"role": "user", "content": "count these"}]
    )
    assert count.input_tokens > 0


def test_anthropic_headers_relayed_raw(http: httpx.Client, anthropic_mock: MockAnthropic) -> None:
    body = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "h"}]}
    versioned = {"x-api-key": KEY, "anthropic-version": "2023-01-01", "anthropic-beta": "b-1"}
    reply = http.post("/v1/messages", json=body, headers={**versioned, "cookie": "c=1"})
    assert reply.status_code == 200, reply.text
    seen = anthropic_mock.received[-1].headers
    assert (seen["anthropic-version"], seen["anthropic-beta"]) == ("2023-01-01", "b-1")
    assert "cookie" not in seen and seen["x-api-key"] == ANTHROPIC_SECRET
    reply = http.post(
        "/v1/messages",
        params={"beta": "true"},
        json=body,
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert reply.status_code == 200, reply.text  # as Claude Code calls it (ANTHROPIC_AUTH_TOKEN)
    assert anthropic_mock.received[-1].path == "/v1/messages?beta=true"
    assert anthropic_mock.received[-1].headers["anthropic-version"] == "2023-06-01"  # defaulted


def test_anthropic_errors_are_in_anthropics_shape(
    claude: anthropic.Anthropic, gateway: GandalfServer
) -> None:
    chat: list[Any] = [{"role": "user", "content": "x"}]
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="nope", max_tokens=5, messages=chat)
    assert missing.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model 'nope' does not exist."},
    }
    with pytest.raises(anthropic.BadRequestError) as other_api:
        claude.messages.create(model="gemini", max_tokens=5, messages=chat)
    assert "type 'anthropic'" in str(other_api.value.body)
    with pytest.raises(anthropic.RateLimitError) as limited:
        claude.messages.create(model="claude-429", max_tokens=5, messages=chat)
    assert limited.value.response.headers["retry-after"] == "7"  # the upstream's answer, relayed
    other = anthropic.Anthropic(base_url=gateway.url, api_key=LIMITED, max_retries=0)
    with other, pytest.raises(anthropic.PermissionDeniedError) as denied:
        other.messages.create(model="claude", max_tokens=5, messages=chat)
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    bad = anthropic.Anthropic(base_url=gateway.url, api_key="gnd_" + "x" * 43, max_retries=0)
    with bad, pytest.raises(anthropic.AuthenticationError) as unknown:
        bad.messages.create(model="claude", max_tokens=5, messages=chat)
    assert unknown.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_anthropic_sdk_models_and_request_ids(
    claude: anthropic.Anthropic, gateway: GandalfServer
) -> None:
    """Through a real server: the SDK's models.list / models.retrieve in
    Anthropic's shape, and ``e.request_id`` on the errors Gandalf writes."""
    models = list(claude.models.list())
    assert "claude" in [m.id for m in models]
    assert all(m.type == "model" and m.display_name == m.id for m in models)
    assert claude.models.retrieve("claude").id == "claude"
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.models.retrieve("nope")
    assert missing.value.request_id == missing.value.response.headers["x-request-id"]
    chat: list[Any] = [{"role": "user", "content": "x"}]
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="nope", max_tokens=5, messages=chat)
    assert unknown.value.request_id == unknown.value.response.headers["x-request-id"]


# ---------------------------------------------------------------------------- gemini


def test_gemini_generate_stream_embed_count_and_list(
    http: httpx.Client, gateway: GandalfServer, gemini_mock: MockGemini
) -> None:
    before = last_id(gateway)
    body = {"contents": [{"role": "user", "parts": [{"text": "hi gemini"}]}]}
    headers = {"x-goog-api-key": KEY}
    reply = http.post("/v1beta/models/gemini:generateContent", json=body, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["candidates"][0]["content"]["parts"][0]["text"] == "hi gemini"
    seen = gemini_mock.received[-1]
    assert seen.path == "/v1beta/models/gemini-ok:generateContent"
    assert seen.headers["x-goog-api-key"] == GEMINI_SECRET and "key" not in seen.query
    assert usage_row(gateway, "gemini.generateContent", before)[:3] == (
        "gemini",
        "gem",
        "gemini-ok",
    )
    # The key as a query parameter, as some Gemini clients send it; never forwarded.
    streamed = http.post(
        "/v1beta/models/gemini:streamGenerateContent",
        params={"alt": "sse", "key": KEY},
        json={"contents": [{"role": "user", "parts": [{"text": "two words"}]}]},
    )
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith(
        "text/event-stream"
    )
    events = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")
    ]
    assert "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events) == "two words"
    assert dict(gemini_mock.received[-1].query) == {"alt": "sse"}
    row = usage_row(gateway, "gemini.streamGenerateContent", before)
    assert row[4] == events[-1]["usageMetadata"]["candidatesTokenCount"] and row[5] == 200
    embedded = http.post(
        "/v1beta/models/gemini:embedContent",
        json={"content": {"parts": [{"text": "x"}]}, "outputDimensionality": 4},
        headers=headers,
    )
    assert len(embedded.json()["embedding"]["values"]) == 4
    counted = http.post("/v1beta/models/gemini:countTokens", json=body, headers=headers)
    assert counted.json()["totalTokens"] > 0
    listed = http.get("/v1beta/models", headers={"x-goog-api-key": LIMITED})
    assert [m["name"] for m in listed.json()["models"]] == ["models/gemini"]


def test_gemini_errors_are_in_googles_shape(http: httpx.Client) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}
    reply = http.post(
        "/v1beta/models/nope:generateContent", json=body, headers={"x-goog-api-key": KEY}
    )
    assert reply.status_code == 404
    assert reply.json() == {
        "error": {"code": 404, "message": "The model 'nope' does not exist.", "status": "NOT_FOUND"}
    }
    reply = http.post("/v1beta/models/gemini:generateContent", json=body)
    assert reply.status_code == 401 and reply.json()["error"]["status"] == "UNAUTHENTICATED"
    reply = http.post(
        "/v1beta/models/gemini:frobnicate", json=body, headers={"x-goog-api-key": KEY}
    )
    assert reply.status_code == 404 and reply.json()["error"]["status"] == "NOT_FOUND"
    limited = {"x-goog-api-key": LIMITED}
    reply = http.post("/v1beta/models/claude:generateContent", json=body, headers=limited)
    assert reply.status_code == 403 and reply.json()["error"]["status"] == "PERMISSION_DENIED"
    reply = http.post(
        "/v1beta/models/claude:generateContent", json=body, headers={"x-goog-api-key": KEY}
    )
    assert reply.status_code == 400 and reply.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "type 'gemini'" in reply.json()["error"]["message"]


# ---------------------------------------------------------------------------- azure, ollama


def test_azure_client(
    http: httpx.Client, gateway: GandalfServer, openai_mock: MockUpstream
) -> None:
    before = last_id(gateway)
    reply = http.post(
        "/openai/deployments/az-chat/chat/completions",
        params={"api-version": "2024-10-21"},
        headers={"api-key": KEY},
        json={"messages": [{"role": "user", "content": "hello azure"}]},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "hello azure"
    seen = openai_mock.received[-1]
    assert seen.path == "/openai/deployments/ok-model/chat/completions?api-version=2024-10-21"
    assert seen.headers["api-key"] == AZURE_SECRET
    assert usage_row(gateway, "azure.chat", before)[:3] == ("az-chat", "az", "ok-model")
    denied = http.post(
        "/openai/deployments/az-chat/chat/completions",
        params={"api-version": "2024-10-21"},
        headers={"api-key": LIMITED},
        json={"messages": [{"role": "user", "content": "x"}]},
    )
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_denied"


def test_ollama_client(http: httpx.Client, gateway: GandalfServer) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    before = last_id(gateway)
    with http.stream(
        "POST",
        "/api/chat",
        headers=auth,
        json={"model": "ol-chat", "messages": [{"role": "user", "content": "x"}]},
    ) as streamed:
        lines = [json.loads(line) for line in streamed.iter_lines() if line]
    assert streamed.headers["content-type"] == "application/x-ndjson"
    assert "".join(line["message"]["content"] for line in lines) == "w0 w1 "
    assert lines[-1]["done"] is True
    row = usage_row(gateway, "ollama.chat", before)
    assert row[3] == lines[-1]["prompt_eval_count"] and row[4] == 2
    tags = http.get("/api/tags", headers=auth).json()
    assert {"ol-chat", "unused"} <= {m["name"] for m in tags["models"]}
