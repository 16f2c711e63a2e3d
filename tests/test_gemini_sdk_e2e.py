"""End to end with the official ``google-genai`` SDK through ``gandalf serve``,
against the Gemini mock (and the Anthropic mock for cut streams): the
README's example as written (the SDK's default API version is ``v1``),
``batchEmbedContents``, no keep-alive comment inside a Gemini stream, and
streams cut by the upstream ended with an error in the caller's own format.
Also the ``openai`` SDK's tool conversation with Gemini: ids every provider
accepts, and the thought signature still given back to Gemini.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors

from gandalf.auth.apikey import generate_key
from tests.mock_anthropic import MockAnthropic
from tests.mock_gemini import DEFAULT_DIMENSIONS, SIGNATURE, MockGemini, mock_vector
from tests.serve import GandalfServer, route
from tests.test_native_e2e import last_id, usage_row

KEY = generate_key()
GEMINI_SECRET = "gemini-sdk-secret"
KEEPALIVE_S = 0.2


@pytest.fixture(scope="module")
def gateway(
    anthropic_mock: MockAnthropic,
    gemini_mock: MockGemini,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GandalfServer]:
    gemini_mock.pause = KEEPALIVE_S * 5  # several keep-alive intervals of silence
    anthropic_mock.pause = KEEPALIVE_S * 5
    config = {
        # A tiny keep-alive interval: a silent stream would get comments at once.
        "server": {"access_log": False, "stream_keepalive": KEEPALIVE_S},
        "providers": [
            {
                "name": "gem",
                "type": "gemini",
                "base_url": gemini_mock.base_url,
                "api_key": GEMINI_SECRET,
            },
            {
                "name": "claude",
                "type": "anthropic",
                "base_url": anthropic_mock.base_url,
                "api_key": "sk-ant-sdk-secret",
            },
        ],
        "routes": [
            route("fast", "gem", "gemini-ok"),
            route("pause", "gem", "gemini-pause"),
            route("dies", "gem", "gemini-stream-dies"),
            route("claude-dies", "claude", "claude-stream-dies"),
            route("tools", "gem", "gemini-tools"),
            route("claude-pause", "claude", "claude-pause"),
        ],
        "keys": [{"name": "app", "key": KEY, "role": "member"}],
    }
    with GandalfServer(tmp_path_factory.mktemp("gemini-sdk"), config) as server:
        yield server


def _client(gateway: GandalfServer, version: str | None = None) -> genai.Client:
    options: dict[str, object] = {"base_url": gateway.url}
    if version is not None:
        options["api_version"] = version
    return genai.Client(api_key=KEY, http_options=options)  # type: ignore[arg-type]


def test_readme_google_genai_example(gateway: GandalfServer, gemini_mock: MockGemini) -> None:
    """The README's snippet, as written (the SDK's default version, v1), plus
    a stream, embeddings and the model list."""
    before = last_id(gateway)
    gemini = genai.Client(api_key=KEY, http_options={"base_url": gateway.url})
    reply = gemini.models.generate_content(model="fast", contents="Hi")
    assert reply.text == "Hi"
    seen = gemini_mock.received[-1]
    assert seen.path == "/v1/models/gemini-ok:generateContent"  # the client's version relayed
    assert seen.headers["x-goog-api-key"] == GEMINI_SECRET
    assert usage_row(gateway, "gemini.generateContent", before)[:3] == (
        "fast",
        "gem",
        "gemini-ok",
    )

    pieces = [c.text for c in gemini.models.generate_content_stream(model="fast", contents="a b c")]
    assert "".join(p or "" for p in pieces) == "a b c" and len(pieces) == 3

    before = last_id(gateway)
    embedded = gemini.models.embed_content(model="fast", contents=["one", "three"])
    assert embedded.embeddings is not None
    assert [e.values for e in embedded.embeddings] == [
        mock_vector("one", DEFAULT_DIMENSIONS),
        mock_vector("three", DEFAULT_DIMENSIONS),
    ]
    assert gemini_mock.received[-1].path == "/v1/models/gemini-ok:batchEmbedContents"
    assert usage_row(gateway, "gemini.batchEmbedContents", before)[5] == 200

    names = [m.name for m in gemini.models.list()]
    assert "models/fast" in names and "models/pause" in names
    assert gemini.models.get(model="fast").name == "models/fast"


def test_batch_embed_contents_v1beta(gateway: GandalfServer, gemini_mock: MockGemini) -> None:
    gemini = _client(gateway, "v1beta")
    embedded = gemini.models.embed_content(model="fast", contents="hello")
    assert embedded.embeddings is not None
    assert embedded.embeddings[0].values == mock_vector("hello", DEFAULT_DIMENSIONS)
    assert gemini_mock.received[-1].path == "/v1beta/models/gemini-ok:batchEmbedContents"


def test_v1_models_is_still_openai_without_googles_key(gateway: GandalfServer) -> None:
    """``/v1/models`` is OpenAI's list for OpenAI clients, Gemini's with x-goog-api-key."""
    with httpx.Client(base_url=gateway.url, timeout=30.0) as http:
        openai_list = http.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert openai_list.status_code == 200
        assert openai_list.json()["object"] == "list"
        google = http.get("/v1/models", headers={"x-goog-api-key": KEY})
        assert google.status_code == 200 and "models" in google.json()
        by_query = http.get("/v1/models", params={"key": KEY})
        assert by_query.json() == google.json()
        missing = http.post(
            "/v1/models/nope:generateContent",
            headers={"x-goog-api-key": KEY},
            json={"contents": [{"role": "user", "parts": [{"text": "x"}]}]},
        )
        error = missing.json()["error"]
        assert missing.status_code == 404 and set(error) == {"code", "message", "status"}
        unknown = http.get("/v1/models/nope", headers={"x-goog-api-key": KEY})
        assert unknown.status_code == 404 and unknown.json()["error"]["status"] == "NOT_FOUND"
        openai_get = http.get("/v1/models/fast", headers={"authorization": f"Bearer {KEY}"})
        assert openai_get.status_code in (200, 404)  # OpenAI's model retrieve, when there is one
        assert "object" in openai_get.json() or "type" in openai_get.json()["error"]
        bad_key = http.post(
            "/v1/models/fast:generateContent", headers={"x-goog-api-key": "gnd_nope"}, json={}
        )
        assert bad_key.status_code == 401
        assert bad_key.json()["error"]["status"] == "UNAUTHENTICATED"


def test_silent_gemini_stream_has_no_keepalive_comment(gateway: GandalfServer) -> None:
    """A Gemini stream silent for longer than ``stream_keepalive`` reaches
    google-genai whole: no ``: keep-alive`` line it would try to read as JSON."""
    gemini = _client(gateway, "v1beta")  # fails on the keep-alive alone, not the version
    pieces = [c.text for c in gemini.models.generate_content_stream(model="pause", contents="x y")]
    assert "".join(p or "" for p in pieces) == "x y"
    with httpx.Client(base_url=gateway.url, timeout=30.0) as http:
        body = {"contents": [{"role": "user", "parts": [{"text": "p q"}]}]}
        raw = http.post(
            "/v1beta/models/pause:streamGenerateContent?alt=sse",
            headers={"x-goog-api-key": KEY},
            json=body,
        )
    assert raw.status_code == 200 and b"keep-alive" not in raw.content
    assert raw.content.count(b"data: ") == 2


def test_silent_anthropic_stream_gets_pings_between_events(gateway: GandalfServer) -> None:
    """Anthropic's keep-alive is its own ``ping`` event, and only ever between
    two events: the upstream fell silent in the middle of one first."""
    body = {
        "model": "claude-pause",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "wait for it"}],
    }
    with httpx.Client(base_url=gateway.url, timeout=30.0) as http:
        raw = http.post("/v1/messages", headers={"x-api-key": KEY}, json=body)
    assert raw.status_code == 200
    events = raw.content.split(b"\n\n")
    assert b"keep-alive" not in raw.content
    pings = [e for e in events if e.startswith(b"event: ping")]
    assert len(pings) >= 2  # the upstream's own, and Gandalf's while it was silent
    names = [e.split(b"\n", 1)[0] for e in events if e]
    assert all(n.startswith(b"event: ") for n in names), names  # no event cut by a ping
    with (
        anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0) as claude,
        claude.messages.stream(
            model="claude-pause", max_tokens=100, messages=[{"role": "user", "content": "x y"}]
        ) as stream,
    ):
        assert "".join(stream.text_stream) == "x y"


def test_gemini_stream_cut_by_the_upstream_ends_with_an_error(gateway: GandalfServer) -> None:
    """An upstream stream that frames by closing the connection and dies
    before its finishReason: google-genai raises on Gandalf's in-band error."""
    before = last_id(gateway)
    gemini = _client(gateway, "v1beta")
    received: list[str | None] = []
    with pytest.raises(genai_errors.APIError) as caught:
        for chunk in gemini.models.generate_content_stream(model="dies", contents="one two"):
            received.append(chunk.text)
    assert received == ["one "]
    assert caught.value.code == 502
    assert usage_row(gateway, "gemini.streamGenerateContent", before)[5] == 502


def test_anthropic_stream_cut_by_the_upstream_ends_with_an_error(
    gateway: GandalfServer,
) -> None:
    before = last_id(gateway)
    with anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0) as claude:
        text: list[str] = []
        with (
            pytest.raises(anthropic.APIStatusError) as caught,
            claude.messages.stream(
                model="claude-dies",
                max_tokens=100,
                messages=[{"role": "user", "content": "a long enough answer"}],
            ) as stream,
        ):
            text.extend(stream.text_stream)
    assert text and "".join(text) != "a long enough answer"
    assert "ended the stream" in json.dumps(caught.value.body)
    assert usage_row(gateway, "anthropic.messages", before)[5] == 502


TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_sdk_tool_conversation_with_gemini(
    gateway: GandalfServer, gemini_mock: MockGemini, stream: bool
) -> None:
    """Tool call ids of at most 40 characters (OpenAI and Azure refuse longer
    ones), and the second turn still gives Gemini its thought signature (the
    mock refuses the turn without it, as Gemini 3 does)."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "weather and time?"}]
    if stream:
        calls: dict[int, dict[str, str]] = {}
        for chunk in client.chat.completions.create(
            model="tools",
            messages=messages,
            tools=TOOLS,
            stream=True,
        ):
            for delta in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
        tool_calls = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for _, c in sorted(calls.items())
        ]
    else:
        reply = client.chat.completions.create(
            model="tools",
            messages=messages,
            tools=TOOLS,
        )
        tool_calls = [c.model_dump() for c in reply.choices[0].message.tool_calls or ()]
    ids = [str(c["id"]) for c in tool_calls]
    assert len(ids) == 2 and all(0 < len(i) <= 40 for i in ids), ids
    messages.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
    messages += [
        {"role": "tool", "tool_call_id": i, "content": json.dumps({"n": n})}
        for n, i in enumerate(ids)
    ]
    second = client.chat.completions.create(
        model="tools",
        messages=messages,
        tools=TOOLS,
    )
    assert second.choices[0].message.content == (
        'results: {"get_time":{"n":1},"get_weather":{"n":0}}'
    )
    replayed = gemini_mock.received[-1].json()["contents"][1]["parts"]
    assert replayed[0]["thoughtSignature"] == SIGNATURE
    client.close()
