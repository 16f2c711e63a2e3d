"""The official SDKs against Gandalf in process (issue 13): what they call and
read, with Gandalf's ASGI app behind ``httpx.ASGITransport`` and the mock
upstreams on 127.0.0.1.

- ``client.models.retrieve`` / ``models.list`` in the openai and anthropic
  SDKs, Gemini's model get and Ollama's ``/api/show`` and ``/api/version``;
- ``x-should-retry: false`` once Gandalf spent its attempts: the SDK's own
  retries do not multiply them;
- upstream headers relayed on ``/v1/chat/completions``; the fake provider's
  reply in the OpenAPI document's shape; 404s in each API's shape;
  ``request-id`` on Anthropic paths.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx2 as httpx  # the SDKs here are built on httpx2 (an httpx fork)
import openai
import pytest

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry
from gandalf.domain import ProviderConfig, Resilience, Route, Target
from gandalf.server.asgi import GandalfApp
from gandalf.wiring import create_app
from tests.mock_anthropic import MockAnthropic
from tests.mock_gemini import MockGemini
from tests.upstream import MockUpstream, running_upstream

KEY = "gnd_" + "s" * 40
GOVERNED = "gnd_" + "l" * 40  # rpm 100: the gateway's own x-ratelimit-* headers
LIMITED = "gnd_" + "t" * 40  # may use "gpt" only


@pytest.fixture(scope="module")
def openai_mock() -> Iterator[MockUpstream]:
    with running_upstream() as mock:
        yield mock


def _config(mock: MockUpstream, claude: MockAnthropic, gemini: MockGemini) -> GandalfConfig:
    root = f"http://127.0.0.1:{mock.port}"
    return GandalfConfig(
        database=DatabaseConfig(dsn=":memory:"),
        providers=(
            ProviderConfig(name="up", type="openai", base_url=root + "/v1", api_key="sk-up"),
            ProviderConfig(name="fake", type="fake"),
            ProviderConfig(
                name="claude", type="anthropic", base_url=claude.base_url, api_key="sk-ant"
            ),
            ProviderConfig(name="gem", type="gemini", base_url=gemini.base_url, api_key="g"),
            ProviderConfig(name="ol", type="ollama", base_url=root + "/v1", models=("unused",)),
        ),
        routes=(
            Route(model_alias="gpt", targets=(Target(provider="up", model="ok-model"),)),
            Route(
                model_alias="gpt-headers", targets=(Target(provider="up", model="with-headers"),)
            ),
            Route(model_alias="busy", targets=(Target(provider="up", model="busy"),)),
            Route(
                model_alias="busy-once",
                targets=(Target(provider="up", model="busy"),),
                max_attempts=1,
            ),
            Route(model_alias="fake-model", targets=(Target(provider="fake", model="fake-1"),)),
            Route(model_alias="claude", targets=(Target(provider="claude", model="claude-ok"),)),
            Route(
                model_alias="claude-refusal",
                targets=(Target(provider="claude", model="claude-refusal"),),
            ),
            Route(
                model_alias="claude-json", targets=(Target(provider="claude", model="claude-json"),)
            ),
            Route(model_alias="gemini", targets=(Target(provider="gem", model="gemini-ok"),)),
            Route(model_alias="llama", targets=(Target(provider="ol", model="llama3.2:1b"),)),
        ),
        keys=(
            KeyEntry(name="app", key=KEY, role="member"),
            KeyEntry(name="governed", key=GOVERNED, role="member", rpm=100),
            KeyEntry(name="limited", key=LIMITED, role="member", allowed_models=("gpt",)),
        ),
        # Quick retries so a test sees every attempt without waiting.
        resilience=Resilience(max_attempts=3, backoff_base=0.001, backoff_cap=0.01),
    )


Scenario = Callable[[GandalfApp, httpx.AsyncClient], Awaitable[None]]


@pytest.fixture
def run(
    openai_mock: MockUpstream, anthropic_mock: MockAnthropic, gemini_mock: MockGemini
) -> Callable[[Scenario], None]:
    """``run(scenario)``: start the app, give the scenario it and an httpx
    client on it, stop the app."""

    def runner(scenario: Scenario) -> None:
        async def main() -> None:
            app = create_app(_config(openai_mock, anthropic_mock, gemini_mock), access_log=False)
            await app.startup()
            try:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://gandalf"
                ) as http:
                    await scenario(app, http)
            finally:
                await app.shutdown()

        openai_mock.clear()
        asyncio.run(main())

    return runner


@asynccontextmanager
async def openai_client(
    http: httpx.AsyncClient, key: str = KEY, **options: Any
) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url="http://gandalf/v1", api_key=key, http_client=http, **options
    )
    yield client


def anthropic_client(http: httpx.AsyncClient, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url="http://gandalf", api_key=key, http_client=http)


def upstream_calls(mock: MockUpstream, model: str) -> int:
    return sum(1 for r in mock.received if r.json().get("model") == model)


# ---------------------------------------------------------------------------- retries


def test_the_sdk_does_not_multiply_gandalfs_retries(
    run: Callable[[Scenario], None], openai_mock: MockUpstream
) -> None:
    """A default openai client (max_retries=2) against an upstream that always
    answers 429: Gandalf makes its 3 attempts, says ``x-should-retry: false``,
    and the SDK does not send the request again (9 upstream calls before)."""

    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        async with openai_client(http) as client:
            assert client.max_retries == 2
            with pytest.raises(openai.RateLimitError) as raised:
                await client.chat.completions.create(
                    model="busy", messages=[{"role": "user", "content": "hi"}]
                )
        response = raised.value.response
        assert response.headers["x-should-retry"] == "false"
        assert response.headers["x-gandalf-attempts"] == "3"
        # The upstream's rate limits come along: what a client paces itself on.
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert response.headers["x-ratelimit-reset-requests"] == "20ms"

    run(scenario)
    assert upstream_calls(openai_mock, "busy") == 3


def test_one_attempt_leaves_the_retry_to_the_sdk(
    run: Callable[[Scenario], None], openai_mock: MockUpstream
) -> None:
    """``max_attempts: 1``: Gandalf does not retry, so the SDK's retry is the
    only one there is, and nothing forbids it."""

    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        async with openai_client(http, max_retries=1) as client:
            with pytest.raises(openai.RateLimitError) as raised:
                await client.chat.completions.create(
                    model="busy-once", messages=[{"role": "user", "content": "hi"}]
                )
        assert "x-should-retry" not in raised.value.response.headers
        assert raised.value.response.headers["x-ratelimit-remaining-requests"] == "0"

    run(scenario)
    assert upstream_calls(openai_mock, "busy") == 2


# ---------------------------------------------------------------------------- model lookup


def test_openai_sdk_retrieves_a_model(run: Callable[[Scenario], None]) -> None:
    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        async with openai_client(http, max_retries=0) as client:
            model = await client.models.retrieve("gpt")
            assert (model.id, model.object, model.owned_by) == ("gpt", "model", "up")
            assert isinstance(model.created, int)
            with pytest.raises(openai.NotFoundError) as raised:
                await client.models.retrieve("no-such-model")
            assert raised.value.code == "model_not_found"
        async with openai_client(http, LIMITED, max_retries=0) as limited:
            assert (await limited.models.retrieve("gpt")).id == "gpt"
            # A model the key may not use is not told apart from one that does not exist.
            with pytest.raises(openai.NotFoundError) as hidden:
                await limited.models.retrieve("claude")
            assert hidden.value.code == "model_not_found"
            assert hidden.value.message == raised.value.message.replace("no-such-model", "claude")

    run(scenario)


def test_anthropic_sdk_lists_and_retrieves_models_in_anthropics_shape(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        client = anthropic_client(http)
        models = [m async for m in client.models.list()]
        ids = [m.id for m in models]
        assert "claude" in ids and "gpt" in ids
        for model in models:
            assert model.type == "model" and model.display_name == model.id
            assert model.created_at.year >= 2024
        page = await client.models.list()
        assert page.has_more is False
        assert (page.first_id, page.last_id) == (ids[0], ids[-1])
        model = await client.models.retrieve("claude")
        assert (model.id, model.type, model.display_name) == ("claude", "model", "claude")
        with pytest.raises(anthropic.NotFoundError) as raised:
            await client.models.retrieve("no-such-model")
        body = raised.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        assert body["error"]["type"] == "not_found_error"
        limited = anthropic_client(http, LIMITED)
        assert [m.id async for m in limited.models.list()] == ["gpt"]

    run(scenario)


def test_openai_shaped_clients_keep_openais_shapes(run: Callable[[Scenario], None]) -> None:
    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        # Gandalf takes x-api-key on OpenAI's paths too: only anthropic-version
        # (which Anthropic's API requires of every client) says "Anthropic".
        for auth in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
            reply = await http.get("/v1/models", headers=auth)
            assert reply.json()["object"] == "list"
            assert {"id", "object", "created", "owned_by"} == set(reply.json()["data"][0])
            one = await http.get("/v1/models/gpt", headers=auth)
            assert one.json()["object"] == "model"
        bearer_anthropic = await http.get(
            "/v1/models",
            headers={"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"},
        )
        assert bearer_anthropic.json()["has_more"] is False  # as Claude Code calls it

    run(scenario)


def test_gemini_model_get(run: Callable[[Scenario], None]) -> None:
    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        key = {"x-goog-api-key": KEY}
        reply = await http.get("/v1beta/models/gemini", headers=key)
        assert reply.status_code == 200, reply.text
        model = reply.json()
        assert model["name"] == "models/gemini" and model["displayName"] == "gemini"
        assert "generateContent" in model["supportedGenerationMethods"]
        listed = (await http.get("/v1beta/models", headers=key)).json()["models"]
        assert model in listed
        for path in ("/v1beta/models/no-such-model", "/v1beta/models/gpt"):
            missing = await http.get(path, headers=key)
            assert missing.status_code == 404
            assert missing.json()["error"]["status"] == "NOT_FOUND"

    run(scenario)


def test_ollama_show_and_version(
    run: Callable[[Scenario], None], openai_mock: MockUpstream
) -> None:
    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        auth = {"authorization": f"Bearer {KEY}"}
        shown = await http.post("/api/show", json={"model": "llama"}, headers=auth)
        assert shown.status_code == 200, shown.text
        # Relayed from the provider, for the route's target model.
        assert shown.json()["modelfile"] == "FROM llama3.2:1b"
        assert shown.json()["capabilities"] == ["completion", "tools"]
        missing = await http.post("/api/show", json={"model": "nope"}, headers=auth)
        assert missing.status_code == 404 and set(missing.json()) == {"error"}
        version = await http.get("/api/version")
        assert version.status_code == 200 and isinstance(version.json()["version"], str)

    run(scenario)


# ---------------------------------------------------------------------------- error shapes


def test_unknown_sub_paths_answer_in_their_apis_shape(run: Callable[[Scenario], None]) -> None:
    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        anthropic_404 = await http.post("/v1/messages/batches", json={})
        assert anthropic_404.status_code == 404
        assert anthropic_404.json()["type"] == "error"
        assert anthropic_404.json()["error"]["type"] == "not_found_error"
        assert anthropic_404.headers["request-id"] == anthropic_404.headers["x-request-id"]
        ollama_404 = await http.get("/api/ps")
        assert ollama_404.status_code == 404 and set(ollama_404.json()) == {"error"}
        gemini_404 = await http.get("/v1beta/cachedContents")
        assert gemini_404.status_code == 404
        assert gemini_404.json()["error"]["status"] == "NOT_FOUND"
        azure_404 = await http.get("/openai/models")
        assert azure_404.status_code == 404
        assert set(azure_404.json()["error"]) == {"message", "type", "param", "code"}
        elsewhere = await http.get("/v2/nothing")
        assert set(elsewhere.json()["error"]) == {"message", "type", "param", "code"}

    run(scenario)


def test_anthropic_errors_gandalf_writes_carry_request_id(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        client = anthropic_client(http, LIMITED).with_options(max_retries=0)
        with pytest.raises(anthropic.PermissionDeniedError) as denied:
            await client.messages.create(
                model="claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        headers = denied.value.response.headers
        assert denied.value.request_id == headers["x-request-id"]
        stranger = anthropic_client(http, "gnd_" + "x" * 40).with_options(max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await stranger.messages.create(
                model="claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        assert refused.value.request_id == refused.value.response.headers["x-request-id"]

    run(scenario)


# ---------------------------------------------------------------------------- the fake provider


def test_the_fake_providers_reply_follows_openais_document(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
        auth = {"authorization": f"Bearer {KEY}"}
        reply = (await http.post("/v1/chat/completions", json=body, headers=auth)).json()
        message = reply["choices"][0]["message"]
        assert "refusal" in message and message["refusal"] is None
        assert isinstance(reply["system_fingerprint"], str) and reply["system_fingerprint"]
        async with openai_client(http, max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "hello"}], stream=True
            )
            chunks = [chunk async for chunk in stream]
        assert all(c.system_fingerprint == reply["system_fingerprint"] for c in chunks)
        assert chunks[0].choices[0].delta.refusal is None
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"

    run(scenario)


# ---------------------------------------------------------------------------- upstream headers

RELAYED = {
    "x-upstream-request-id": "req_upstream_123",
    "openai-processing-ms": "42",
    "openai-version": "2020-10-01",
    "openai-organization": "org-mock",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-tokens": "6ms",
}


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_rate_limit_headers_are_relayed(
    run: Callable[[Scenario], None], stream: bool
) -> None:
    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        async with openai_client(http, max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-headers",
                messages=[{"role": "user", "content": "hi"}],
                stream=stream,
            )
            if stream:
                parsed: Any = raw.parse()
                async for _ in parsed:
                    pass
        headers = raw.headers
        for name, value in RELAYED.items():
            assert headers.get(name) == value, (name, dict(headers))
        assert "x-internal-route" not in headers
        # x-request-id stays Gandalf's own: the SDK's request id finds the access log line.
        assert raw.request_id == headers["x-request-id"] != "req_upstream_123"
        assert headers.get_list("x-request-id") == [raw.request_id]

    run(scenario)


@pytest.mark.parametrize("stream", [False, True])
def test_the_gateways_rate_limit_headers_replace_the_upstreams(
    run: Callable[[Scenario], None], stream: bool
) -> None:
    """A caller the gateway limits reads its own limits: the upstream's
    x-ratelimit-* (the gateway's account with the provider) are not relayed
    beside them, where a client would see two values for one header."""

    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        async with openai_client(http, key=GOVERNED, max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-headers",
                messages=[{"role": "user", "content": "hi"}],
                stream=stream,
            )
            if stream:
                parsed: Any = raw.parse()
                async for _ in parsed:
                    pass
        headers = raw.headers
        assert headers.get_list("x-ratelimit-limit-requests") == ["100"]
        assert headers.get_list("x-ratelimit-remaining-requests") == ["99"]
        assert "x-ratelimit-reset-tokens" not in headers  # the upstream's, dropped
        assert headers.get("openai-processing-ms") == "42"  # the rest still relayed

    run(scenario)


@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_answer_carries_the_gateways_rate_limits_not_the_upstreams(
    run: Callable[[Scenario], None], stream: bool
) -> None:
    """The same on the Responses API (relayed to the upstream's /v1/responses):
    the limited caller reads the gateway's x-ratelimit-* once, the upstream's
    are dropped and its other headers relayed."""

    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        async with openai_client(http, key=GOVERNED, max_retries=0) as client:
            raw = await client.responses.with_raw_response.create(
                model="gpt-headers", input="hi", stream=stream
            )
            if stream:
                parsed: Any = raw.parse()
                async for _ in parsed:
                    pass
        headers = raw.headers
        assert raw.http_response.status_code == 200
        assert headers.get_list("x-ratelimit-limit-requests") == ["100"]
        assert headers.get_list("x-ratelimit-remaining-requests") == ["99"]
        assert "x-ratelimit-reset-tokens" not in headers  # the upstream's, dropped
        assert headers.get("openai-processing-ms") == "42"  # the rest still relayed
        assert headers.get("x-upstream-request-id") == "req_upstream_123"

    run(scenario)


# ---------------------------------------------------------------------------- json_schema streams

SCHEMA: Any = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {"type": "object", "properties": {"echo": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("model", ["claude-refusal", "claude-json"])
def test_a_json_schema_answer_streams_as_it_answers_whole(
    run: Callable[[Scenario], None], model: str
) -> None:
    """Anthropic has no JSON mode: a forced tool carries the answer. When the
    model does not call it (a refusal), its text is the answer, streamed or
    not; when it does, the tool's JSON is, streamed or not."""

    async def scenario(app: GandalfApp, http: httpx.AsyncClient) -> None:
        messages: Any = [{"role": "user", "content": "hello"}]
        async with openai_client(http, max_retries=0) as client:
            whole = await client.chat.completions.create(
                model=model, messages=messages, response_format=SCHEMA
            )
            stream = await client.chat.completions.create(
                model=model, messages=messages, response_format=SCHEMA, stream=True
            )
            chunks = [chunk async for chunk in stream]
        expected = whole.choices[0].message.content
        assert expected
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        if model == "claude-json":  # the same JSON (fragments keep the upstream's spacing)
            assert json.loads(streamed) == json.loads(expected)
        else:
            assert streamed == expected
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == whole.choices[0].finish_reason

    run(scenario)
