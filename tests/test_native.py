"""Native passthrough, in process: Azure OpenAI and Ollama clients through the
ASGI app against the mock upstream (which speaks both), plus the per-format
usage readers and error shapes. The Anthropic and Gemini APIs, with their
official SDK and mocks, are in tests/test_native_e2e.py."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry
from gandalf.domain import ProviderConfig, Route, Target, Usage
from gandalf.errors import InvalidRequest, UpstreamOverloaded
from gandalf.provider.native import anthropic_usage, gemini_usage, ollama_usage, openai_usage
from gandalf.server.asgi import GandalfApp
from gandalf.server.native import anthropic_error, google_error, ollama_error
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.upstream import MockUpstream

KEY = "gnd_" + "n" * 40
LIMITED = "gnd_" + "l" * 40
VIEWER = "gnd_" + "v" * 40
# Keys with a TPM limit, one per native API: the governor's estimate shows in
# x-ratelimit-remaining-tokens (a fresh bucket of 1,000,000 minus the estimate).
TPM_KEYS = {api: "gnd_" + letter * 40 for api, letter in (("az", "a"), ("ol", "o"), ("gem", "g"))}
AZURE_SECRET = "azure-provider-secret"
OLLAMA_SECRET = "ollama-proxy-secret"
VERSION = "api-version=2024-10-21"


def _config(mock: MockUpstream, db: str) -> GandalfConfig:
    root = f"http://127.0.0.1:{mock.port}"
    return GandalfConfig(
        database=DatabaseConfig(dsn=db),
        providers=(
            ProviderConfig(name="az", type="azure", base_url=root, api_key=AZURE_SECRET),
            ProviderConfig(name="ol", type="ollama", base_url=root + "/v1", api_key=OLLAMA_SECRET),
            ProviderConfig(name="up", type="openai", base_url=root + "/v1", api_key="sk-up"),
            ProviderConfig(name="gem", type="gemini", base_url=root, api_key="gemini-secret"),
        ),
        routes=(
            Route(model_alias="az-chat", targets=(Target(provider="az", model="ok-model"),)),
            Route(model_alias="az-stream", targets=(Target(provider="az", model="stream-3"),)),
            # One attempt: these check how a failed answer is relayed.
            Route(
                model_alias="az-429",
                targets=(Target(provider="az", model="status-429"),),
                max_attempts=1,
            ),
            Route(model_alias="az-401", targets=(Target(provider="az", model="status-401"),)),
            Route(model_alias="ol-chat", targets=(Target(provider="ol", model="stream-3"),)),
            Route(model_alias="ol-echo", targets=(Target(provider="ol", model="echo"),)),
            Route(
                model_alias="ol-500",
                targets=(Target(provider="ol", model="status-500"),),
                max_attempts=1,
            ),
            # A failing first target, then a good one (native calls fail over too).
            Route(
                model_alias="ol-failover",
                targets=(
                    Target(provider="ol", model="status-500", priority=1),
                    Target(provider="ol", model="echo", priority=2),
                ),
                max_attempts=2,
            ),
            Route(
                model_alias="ol-all-fail",
                targets=(
                    Target(provider="ol", model="status-500", priority=1),
                    Target(provider="ol", model="status-503", priority=2),
                ),
                max_attempts=2,
            ),
            Route(model_alias="gpt", targets=(Target(provider="up", model="ok-model"),)),
            Route(model_alias="gem", targets=(Target(provider="gem", model="gemini-ok"),)),
        ),
        keys=(
            KeyEntry(name="admin", key=KEY, role="admin"),
            KeyEntry(name="limited", key=LIMITED, role="member", allowed_models=("gpt",)),
            KeyEntry(name="viewer", key=VIEWER, role="viewer"),
            *(
                KeyEntry(name=f"tpm-{api}", key=key, role="member", tpm=1_000_000)
                for api, key in TPM_KEYS.items()
            ),
        ),
    )


def run(
    mock: MockUpstream, scenario: Callable[[GandalfApp], Awaitable[None]], db: str = ":memory:"
) -> None:
    async def main() -> None:
        app = create_app(_config(mock, db), access_log=False)
        await app.startup()
        try:
            await scenario(app)
        finally:
            await app.shutdown()

    mock.received.clear()
    asyncio.run(main())


def _ndjson(body: bytes) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in body.splitlines() if line]


# ---------------------------------------------------------------------------- azure


def test_azure_chat_is_relayed_with_the_providers_key(upstream: MockUpstream) -> None:
    body = b'{"messages":[{"role":"user","content":"hello azure"}],"temperature":0.25}'

    async def scenario(app: GandalfApp) -> None:
        reply = await call(
            app,
            "POST",
            "/openai/deployments/az-chat/chat/completions",
            headers=[("api-key", KEY), ("content-type", "application/json")],
            body=body,
            query=VERSION,
        )
        assert reply.status == 200, reply.body
        assert reply.json()["choices"][0]["message"]["content"] == "hello azure"
        assert reply.header("x-request-id")
        seen = upstream.received[-1]
        assert seen.path == f"/openai/deployments/ok-model/chat/completions?{VERSION}"
        assert seen.headers["api-key"] == AZURE_SECRET
        assert KEY not in str(seen.headers)
        assert seen.body == body  # untouched

    run(upstream, scenario)


def test_azure_stream_and_embeddings(upstream: MockUpstream) -> None:
    async def scenario(app: GandalfApp) -> None:
        auth = [("authorization", f"Bearer {KEY}")]
        reply = await call(
            app,
            "POST",
            "/openai/deployments/az-stream/chat/completions",
            headers=auth,
            json={
                "messages": [{"role": "user", "content": "s"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            query=VERSION,
        )
        assert reply.status == 200
        assert (reply.header("content-type") or "").startswith("text/event-stream")
        assert reply.body.count(b"data: ") == 6 and reply.body.endswith(b"data: [DONE]\n\n")
        reply = await call(
            app,
            "POST",
            "/openai/deployments/az-chat/embeddings",
            headers=auth,
            json={"input": ["a", "b"]},
            query=VERSION,
        )
        assert reply.status == 200 and len(reply.json()["data"]) == 2

    run(upstream, scenario)


def test_azure_upstream_errors_pass_through_but_its_auth_failure_is_a_502(
    upstream: MockUpstream,
) -> None:
    async def scenario(app: GandalfApp) -> None:
        auth = [("api-key", KEY)]
        chat = {"messages": [{"role": "user", "content": "x"}]}
        path = "/openai/deployments/{}/chat/completions"
        reply = await call(
            app, "POST", path.format("az-429"), headers=auth, json=chat, query=VERSION
        )
        assert reply.status == 429 and reply.header("retry-after") == "7"
        assert reply.json()["error"]["code"] == "mock_429"  # the upstream body, untouched
        reply = await call(
            app, "POST", path.format("az-401"), headers=auth, json=chat, query=VERSION
        )
        assert reply.status == 502
        assert reply.json()["error"]["code"] == "upstream_auth_error"
        reply = await call(app, "POST", path.format("nope"), headers=auth, json=chat, query=VERSION)
        assert reply.status == 404 and reply.json()["error"]["code"] == "model_not_found"
        reply = await call(app, "POST", path.format("gpt"), headers=auth, json=chat, query=VERSION)
        assert reply.status == 400 and "type 'azure'" in reply.json()["error"]["message"]
        reply = await call(
            app, "POST", "/openai/deployments/az-chat/completions", headers=auth, json=chat
        )
        assert reply.status == 404

    run(upstream, scenario)


# ---------------------------------------------------------------------------- ollama


def test_ollama_chat_streams_ndjson_by_default(upstream: MockUpstream, tmp_path: Path) -> None:
    db = str(tmp_path / "g.db")

    async def scenario(app: GandalfApp) -> None:
        reply = await call(
            app,
            "POST",
            "/api/chat",
            headers=[("authorization", f"Bearer {KEY}")],
            json={"model": "ol-chat", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert reply.status == 200, reply.body
        assert reply.header("content-type") == "application/x-ndjson"
        lines = _ndjson(reply.body)
        assert [line["done"] for line in lines] == [False, False, False, True]
        assert b"keep-alive" not in reply.body
        seen = upstream.received[-1]
        assert seen.path == "/api/chat"
        assert orjson.loads(seen.body)["model"] == "stream-3"  # the route's target model
        assert seen.headers["Authorization"] == f"Bearer {OLLAMA_SECRET}"

    run(upstream, scenario, db)
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT model_alias, provider, prompt_tokens, completion_tokens, status, endpoint "
            "FROM usage_records"
        ).fetchall()
    assert len(rows) == 1
    alias, provider, prompt, completion, status, endpoint = rows[0]
    assert (alias, provider, status, endpoint) == ("ol-chat", "ol", 200, "ollama.chat")
    assert prompt > 0 and completion == 3


def test_ollama_generate_embed_and_tags(upstream: MockUpstream) -> None:
    async def scenario(app: GandalfApp) -> None:
        auth = [("authorization", f"Bearer {KEY}")]
        reply = await call(
            app,
            "POST",
            "/api/generate",
            headers=auth,
            json={"model": "ol-echo", "prompt": "say this", "stream": False},
        )
        assert reply.status == 200 and reply.json()["response"] == "say this"
        reply = await call(
            app, "POST", "/api/embed", headers=auth, json={"model": "ol-echo", "input": ["a"]}
        )
        assert reply.status == 200 and len(reply.json()["embeddings"]) == 1
        reply = await call(app, "GET", "/api/tags", headers=auth)
        names = [m["name"] for m in reply.json()["models"]]
        assert names == sorted(names) and {"ol-chat", "ol-echo", "llama3.2:1b"} <= set(names)
        assert "gpt" not in names and "az-chat" not in names

    run(upstream, scenario)


def test_ollama_errors_are_in_ollamas_shape(upstream: MockUpstream) -> None:
    async def scenario(app: GandalfApp) -> None:
        chat = {"model": "ol-echo", "messages": [], "stream": False}
        reply = await call(app, "POST", "/api/chat", json=chat)
        assert reply.status == 401 and set(reply.json()) == {"error"}
        limited = [("authorization", f"Bearer {LIMITED}")]
        reply = await call(app, "POST", "/api/chat", headers=limited, json=chat)
        assert reply.status == 403 and "not allowed" in reply.json()["error"]
        auth = [("authorization", f"Bearer {KEY}")]
        reply = await call(app, "POST", "/api/chat", headers=auth, json={**chat, "model": "x"})
        assert reply.status == 404 and reply.json() == {"error": "The model 'x' does not exist."}
        reply = await call(app, "POST", "/api/chat", headers=auth, body=b"{")
        assert reply.status == 400 and set(reply.json()) == {"error"}
        reply = await call(app, "POST", "/api/chat", headers=auth, json={"messages": []})
        assert reply.status == 400 and "model" in reply.json()["error"]
        reply = await call(app, "POST", "/api/chat", headers=auth, json={**chat, "model": "ol-500"})
        assert reply.status == 500 and reply.json() == {"error": "mock status 500"}  # relayed

    run(upstream, scenario)


def test_native_output_limits_count_in_the_governors_estimate(upstream: MockUpstream) -> None:
    """Each native API's own output-token limit (Azure max_completion_tokens,
    Ollama options.num_predict, Gemini generationConfig.maxOutputTokens) is
    charged up front with the prompt estimate (a quarter of the body's bytes),
    once per choice asked for (Azure's n, Gemini's candidateCount)."""

    def remaining(reply: Any) -> int:
        return int(reply.header("x-ratelimit-remaining-tokens"))

    async def scenario(app: GandalfApp) -> None:
        azure = orjson.dumps(
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 700, "n": 2}
        )
        reply = await call(
            app,
            "POST",
            "/openai/deployments/az-chat/chat/completions",
            headers=[("api-key", TPM_KEYS["az"])],
            body=azure,
            query=VERSION,
        )
        assert remaining(reply) == 1_000_000 - (len(azure) // 4 + 1400), reply.body
        ollama = orjson.dumps(
            {"model": "ol-echo", "messages": [], "stream": False, "options": {"num_predict": 900}}
        )
        reply = await call(
            app,
            "POST",
            "/api/chat",
            headers=[("authorization", f"Bearer {TPM_KEYS['ol']}")],
            body=ollama,
        )
        assert remaining(reply) == 1_000_000 - (len(ollama) // 4 + 900), reply.body
        gemini = orjson.dumps(
            {
                "contents": [{"parts": [{"text": "x"}]}],
                "generationConfig": {"maxOutputTokens": 300, "candidateCount": 3},
            }
        )
        reply = await call(
            app,
            "POST",
            "/v1beta/models/gem:generateContent",
            headers=[("x-goog-api-key", TPM_KEYS["gem"])],
            body=gemini,
        )
        assert remaining(reply) == 1_000_000 - (len(gemini) // 4 + 900), reply.body

    run(upstream, scenario)


def test_native_calls_fail_over_and_relay_the_last_failure(upstream: MockUpstream) -> None:
    """Failover.serve serves native calls too: a 5xx from the first target is tried
    on the next one; when every attempt failed, the last answer is relayed as is."""

    async def scenario(app: GandalfApp) -> None:
        auth = [("authorization", f"Bearer {KEY}")]
        chat = {"messages": [{"role": "user", "content": "hi"}], "stream": False}
        upstream.received.clear()
        reply = await call(
            app, "POST", "/api/chat", headers=auth, json={**chat, "model": "ol-failover"}
        )
        assert reply.status == 200, reply.body
        sent = [orjson.loads(r.body)["model"] for r in upstream.received]
        assert sent == ["status-500", "echo"]
        upstream.received.clear()
        reply = await call(
            app, "POST", "/api/chat", headers=auth, json={**chat, "model": "ol-all-fail"}
        )
        assert reply.status == 503 and reply.json() == {"error": "mock status 503"}
        sent = [orjson.loads(r.body)["model"] for r in upstream.received]
        assert sent == ["status-500", "status-503"]

    run(upstream, scenario)


def test_errors_before_the_handler_are_in_the_apis_shape_too(upstream: MockUpstream) -> None:
    async def scenario(app: GandalfApp) -> None:
        auth = [("authorization", f"Bearer {KEY}")]
        huge = b'{"model":"ol-echo","prompt":"' + b"x" * 4_200_000 + b'"}'
        reply = await call(app, "POST", "/api/generate", headers=auth, body=huge)
        assert reply.status == 413 and set(reply.json()) == {"error"}  # Ollama's shape
        reply = await call(app, "GET", "/api/chat", headers=auth)
        assert reply.status == 405 and set(reply.json()) == {"error"}
        assert reply.header("allow") == "POST"
        reply = await call(app, "POST", "/openai/deployments/az-chat/nothing", headers=auth)
        assert reply.status == 404 and reply.json()["error"]["code"] == "not_found"

    run(upstream, scenario)


def test_a_viewer_key_lists_models_on_every_api_but_calls_none(upstream: MockUpstream) -> None:
    """Listing models needs READ_MODELS everywhere, as on /v1/models (a viewer
    got 403 on Gemini's and Ollama's lists)."""

    async def scenario(app: GandalfApp) -> None:
        viewer = [("authorization", f"Bearer {VIEWER}")]
        reply = await call(app, "GET", "/v1/models", headers=viewer)
        assert reply.status == 200, reply.body
        reply = await call(app, "GET", "/v1beta/models", headers=[("x-goog-api-key", VIEWER)])
        assert reply.status == 200, reply.body
        assert "models/gem" in [m["name"] for m in reply.json()["models"]]
        reply = await call(app, "GET", "/v1beta/models/gem", headers=[("x-goog-api-key", VIEWER)])
        assert reply.status == 200 and reply.json()["name"] == "models/gem", reply.body
        reply = await call(app, "GET", "/api/tags", headers=viewer)
        assert reply.status == 200, reply.body
        assert "ol-chat" in [m["name"] for m in reply.json()["models"]]
        # Ollama's /api/show reads about a model, as the list does.
        reply = await call(app, "POST", "/api/show", headers=viewer, json={"model": "ol-chat"})
        assert reply.status == 200 and reply.json()["modelfile"] == "FROM stream-3", reply.body
        chat = {"model": "ol-echo", "messages": [], "stream": False}
        reply = await call(app, "POST", "/api/chat", headers=viewer, json=chat)
        assert reply.status == 403 and set(reply.json()) == {"error"}
        reply = await call(app, "POST", "/v1beta/models/gem:generateContent", headers=viewer)
        assert reply.status == 403 and reply.json()["error"]["status"] == "PERMISSION_DENIED"

    run(upstream, scenario)


def test_native_endpoints_check_the_key_before_the_body(upstream: MockUpstream) -> None:
    """A keyless (or badly keyed) bad body is a 401 in the API's shape, not a 400:
    the key is checked from the headers before the body is read."""

    async def scenario(app: GandalfApp) -> None:
        stranger = [("authorization", "Bearer gnd_" + "s" * 40)]
        for headers in ([], stranger, [("api-key", "gnd_" + "s" * 40)]):
            reply = await call(app, "POST", "/api/chat", headers=headers, body=b"{")
            assert reply.status == 401 and set(reply.json()) == {"error"}, reply.body
            reply = await call(
                app, "POST", "/openai/deployments/az-chat/chat/completions", headers=headers
            )
            assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        for query in ("", "key=gnd_" + "s" * 40):
            reply = await call(
                app, "POST", "/v1beta/models/gem:generateContent", body=b"{", query=query
            )
            assert reply.status == 401 and reply.json()["error"]["status"] == "UNAUTHENTICATED"

    run(upstream, scenario)


def test_unconfigured_apis_are_not_mounted_and_their_paths_say_why(upstream: MockUpstream) -> None:
    # No anthropic provider here: Claude Code pointed at Gandalf must learn why
    # /v1/messages is a 404, in the error shape it reads.
    async def scenario(app: GandalfApp) -> None:
        auth = [("authorization", f"Bearer {KEY}")]
        for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/messages/batches"):
            reply: Reply = await call(app, "POST", path, headers=auth, json={"model": "gpt"})
            assert reply.status == 404, reply.body
            body = reply.json()
            assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
            assert "no enabled provider of type 'anthropic'" in body["error"]["message"]
            assert reply.header("request-id") == reply.header("x-request-id")
        # Keyless too (as any unknown path): nothing about keys is told.
        reply = await call(app, "POST", "/v1/messages", json={"model": "gpt"})
        assert reply.status == 404

    run(upstream, scenario)


def test_every_native_api_without_a_provider_answers_404_in_its_shape() -> None:
    config = GandalfConfig(
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="f", type="fake"),),
        routes=(Route(model_alias="m", targets=(Target(provider="f", model="fake-model"),)),),
    )
    probes: dict[str, Callable[[Any], bool]] = {
        "/v1/messages": lambda b: b["error"]["type"] == "not_found_error",
        "/v1beta/models/g:generateContent": lambda b: b["error"]["status"] == "NOT_FOUND",
        "/openai/deployments/d/chat/completions": lambda b: b["error"]["code"] == "not_found",
        "/api/chat": lambda b: set(b) == {"error"} and isinstance(b["error"], str),
    }
    kinds = ["anthropic", "gemini", "azure", "ollama"]

    async def main() -> None:
        app = create_app(config, access_log=False)
        await app.startup()
        try:
            for (path, shaped), kind in zip(probes.items(), kinds, strict=True):
                reply = await call(app, "POST", path, json={"model": "m"})
                assert reply.status == 404, (path, reply.body)
                assert shaped(reply.json()), (path, reply.body)
                assert f"no enabled provider of type '{kind}'" in reply.body.decode(), path
            # OpenAI's own API is unchanged.
            reply = await call(app, "POST", "/v1/nothing", json={})
            assert reply.status == 404 and "provider of type" not in reply.body.decode()
        finally:
            await app.shutdown()

    asyncio.run(main())


# ---------------------------------------------------------------------------- usage readers


def test_anthropic_usage_from_body_and_stream() -> None:
    body = b'{"usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":7}}'
    assert anthropic_usage(body, b"", False) == Usage(
        prompt_tokens=15, completion_tokens=7, total_tokens=22, cached_prompt_tokens=5
    )
    head = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"input_tokens":3,"cache_creation_input_tokens":2,"output_tokens":1}}}\n\n'
    )
    tail = (
        b'ial":"x"}}\n\nevent: message_delta\ndata: {"type":"message_delta","usage":'
        b'{"output_tokens":4}}\n\nevent: message_delta\ndata: {"type":"message_delta",'
        b'"usage":{"output_tokens":9}}\n\nevent: message_stop\ndata: {}\n\n'
    )
    assert anthropic_usage(head, tail, True) == Usage(
        prompt_tokens=5, completion_tokens=9, total_tokens=14, cache_write_tokens=2
    )
    assert anthropic_usage(b"", b"", True) is None


def test_gemini_openai_and_ollama_usage() -> None:
    tail = (
        b'data: {"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":2}}\r\n\r\n'
        b'data: {"candidates":[{"content":{"parts":[{"text":"}"}]}}],"usageMetadata":'
        b'{"promptTokenCount":4,"candidatesTokenCount":6,"thoughtsTokenCount":3}}\r\n\r\n'
    )
    assert gemini_usage(b"", tail, True) == Usage(
        prompt_tokens=4, completion_tokens=9, total_tokens=13, reasoning_tokens=3
    )
    assert openai_usage(b'{"usage":{"prompt_tokens":2,"completion_tokens":3}}', b"", False) == (
        Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)
    )
    lines = b'{"done":false}\n{"done":true,"prompt_eval_count":8,"eval_count":2}\n'
    assert ollama_usage(b"", lines, True) == Usage(
        prompt_tokens=8, completion_tokens=2, total_tokens=10
    )
    assert ollama_usage(b'{"done":false}', b"", False) is None


def test_error_shapes() -> None:
    bad = InvalidRequest("no such thing")
    busy = UpstreamOverloaded("busy")
    assert orjson.loads(anthropic_error(bad)) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "no such thing"},
    }
    assert orjson.loads(anthropic_error(busy))["error"]["type"] == "overloaded_error"
    assert orjson.loads(google_error(bad)) == {
        "error": {"code": 400, "message": "no such thing", "status": "INVALID_ARGUMENT"}
    }
    assert orjson.loads(google_error(busy))["error"]["status"] == "UNAVAILABLE"
    assert orjson.loads(ollama_error(bad)) == {"error": "no such thing"}
