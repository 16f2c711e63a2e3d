"""The ollama adapter (OpenAI format under /v1, models from /api/tags) and the
routes Gandalf derives from the models providers offer."""

from __future__ import annotations

import asyncio

import msgspec
import orjson
import pytest

from gandalf.app.router import offered_routes
from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry
from gandalf.domain import (
    ChatCall,
    ChatRequest,
    EmbeddingsCall,
    EmbeddingsRequest,
    ProviderConfig,
    Route,
    Target,
)
from gandalf.errors import UpstreamError
from gandalf.provider.ollama import OllamaProvider, native_base, parse_tags
from gandalf.wiring import create_app
from tests.asgi_client import call
from tests.upstream import MockUpstream

KEY = "gnd_" + "o" * 40


def root_of(mock: MockUpstream) -> str:
    return f"http://127.0.0.1:{mock.port}"


@pytest.mark.parametrize(
    ("configured", "root"),
    [
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("http://127.0.0.1:11434/", "http://127.0.0.1:11434"),
        ("http://127.0.0.1:11434/v1", "http://127.0.0.1:11434"),
        ("http://host/ollama/v1/", "http://host/ollama"),
    ],
)
def test_native_base(configured: str, root: str) -> None:
    assert native_base(configured) == root


def test_parse_tags() -> None:
    body = b'{"models":[{"name":"llama3.2:1b","size":1},{"name":"qwen2.5:7b","details":{}}]}'
    assert parse_tags(body) == ["llama3.2:1b", "qwen2.5:7b"]
    assert parse_tags(b'{"models":[]}') == []
    with pytest.raises(UpstreamError):
        parse_tags(b"<html>")


def _provider(base_url: str, models: tuple[str, ...] = ()) -> OllamaProvider:
    return OllamaProvider(
        ProviderConfig(name="local", type="ollama", base_url=base_url, models=models)
    )


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_chat_stream_embeddings_and_tags_through_one_server(
    upstream: MockUpstream, suffix: str
) -> None:
    body = orjson.dumps({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})
    chat = ChatCall(
        body=body,
        request=msgspec.json.decode(body, type=ChatRequest),
        alias="llama3",
        target=Target(provider="local", model="ok-local"),
        request_id="r1",
    )
    stream_body = orjson.dumps(
        {"model": "ok-local", "stream": True, "messages": [{"role": "user", "content": "s"}]}
    )
    stream_call = ChatCall(
        body=stream_body,
        request=msgspec.json.decode(stream_body, type=ChatRequest),
        alias="ok-local",
        target=Target(provider="local", model="stream-3"),
        request_id="r2",
    )
    emb_body = b'{"model":"ok-local","input":["a","b"]}'
    emb = EmbeddingsCall(
        body=emb_body,
        request=msgspec.json.decode(emb_body, type=EmbeddingsRequest),
        alias="ok-local",
        target=Target(provider="local", model="ok-local"),
        request_id="r3",
    )

    async def main() -> None:
        provider = _provider(root_of(upstream) + suffix)
        await provider.start()
        try:
            reply = await provider.chat(chat)
            assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "hi"
            stream = await provider.stream(stream_call)
            text = b"".join([chunk async for chunk in stream])
            assert text.count(b"data: ") == 5 and text.endswith(b"data: [DONE]\n\n")
            assert stream.usage is not None and stream.usage.completion_tokens > 0
            vectors = orjson.loads((await provider.embeddings(emb)).body)["data"]
            assert len(vectors) == 2
            assert await provider.list_models() == upstream.tags
        finally:
            await provider.close()

    upstream.received.clear()
    asyncio.run(main())
    paths = [r.path for r in upstream.received]
    assert paths == ["/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings", "/api/tags"]


def test_offered_routes_from_models_and_discovery() -> None:
    explicit = [Route(model_alias="gpt-4o", targets=(Target(provider="a", model="gpt-4o"),))]
    providers = [
        ProviderConfig(name="b", type="openai", models=("m1", "gpt-4o"), priority=2),
        ProviderConfig(name="a", type="openai", models=("m1",), priority=1),
        ProviderConfig(name="local", type="ollama"),
    ]
    routes = offered_routes(explicit, providers, {"local": ["llama3", "m1"], "a": ["ignored"]})
    by_alias = {r.model_alias: r for r in routes}
    assert set(by_alias) == {"m1", "llama3"}  # gpt-4o has an explicit route; "a" lists models
    assert [t.provider for t in by_alias["m1"].targets] == ["a", "local", "b"]
    assert by_alias["llama3"].targets == (Target(provider="local", model="llama3", priority=1),)
    assert all(r.source == "provider" for r in routes)


def _config(base_url: str) -> GandalfConfig:
    return GandalfConfig(
        database=DatabaseConfig(dsn=":memory:"),
        providers=(
            ProviderConfig(name="local", type="ollama", base_url=base_url),
            ProviderConfig(name="fake", type="fake", models=("fake-listed",)),
        ),
        routes=(Route(model_alias="chat", targets=(Target(provider="local", model="ok-x"),)),),
        keys=(KeyEntry(name="admin", key=KEY, role="admin"),),
    )


def test_gateway_routes_what_ollama_has_pulled(upstream: MockUpstream) -> None:
    async def main() -> None:
        app = create_app(_config(root_of(upstream)), access_log=False)
        await app.startup()
        try:
            auth = [("authorization", f"Bearer {KEY}")]
            models = await call(app, "GET", "/v1/models", headers=auth)
            listed = {m["id"]: m["owned_by"] for m in models.json()["data"]}
            assert listed == {
                "chat": "local",
                "llama3.2:1b": "local",
                "ok-local": "local",
                "fake-listed": "fake",
            }
            reply = await call(
                app,
                "POST",
                "/v1/chat/completions",
                headers=auth,
                json={"model": "ok-local", "messages": [{"role": "user", "content": "pulled"}]},
            )
            assert reply.status == 200, reply.body
            assert reply.json()["choices"][0]["message"]["content"] == "pulled"
        finally:
            await app.shutdown()

    asyncio.run(main())


def test_an_unreachable_ollama_only_loses_discovery(upstream: MockUpstream) -> None:
    async def main() -> None:
        app = create_app(_config("http://127.0.0.1:9"), access_log=False)
        await app.startup()
        try:
            auth = [("authorization", f"Bearer {KEY}")]
            models = await call(app, "GET", "/v1/models", headers=auth)
            assert {m["id"] for m in models.json()["data"]} == {"chat", "fake-listed"}
        finally:
            await app.shutdown()

    asyncio.run(main())
