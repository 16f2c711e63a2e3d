"""The Azure OpenAI adapter: OpenAI's format at per-deployment URLs with an
``api-key`` header, against the mock upstream (which serves Azure's paths)."""

from __future__ import annotations

import asyncio

import msgspec
import orjson
import pytest

from gandalf.domain import (
    ChatCall,
    ChatRequest,
    EmbeddingsCall,
    EmbeddingsRequest,
    ProviderConfig,
    Target,
)
from gandalf.errors import UpstreamClientError
from gandalf.provider.azure import DEFAULT_API_VERSION, AzureOpenAIProvider
from tests.upstream import MockUpstream

SECRET = "azure-secret"


def _chat(body: dict[str, object], deployment: str) -> ChatCall:
    raw = orjson.dumps(body)
    return ChatCall(
        body=raw,
        request=msgspec.json.decode(raw, type=ChatRequest),
        alias="alias",
        target=Target(provider="az", model=deployment),
        request_id="r",
    )


def test_chat_stream_and_embeddings_at_deployment_urls(upstream: MockUpstream) -> None:
    root = f"http://127.0.0.1:{upstream.port}"
    provider = AzureOpenAIProvider(
        ProviderConfig(name="az", type="azure", base_url=root + "/", api_key=SECRET)
    )
    emb_body = b'{"model":"alias","input":"x"}'
    emb = EmbeddingsCall(
        body=emb_body,
        request=msgspec.json.decode(emb_body, type=EmbeddingsRequest),
        alias="alias",
        target=Target(provider="az", model="ok-model"),
        request_id="r",
    )

    async def main() -> None:
        await provider.start()
        try:
            reply = await provider.chat(
                _chat({"model": "alias", "messages": [{"role": "user", "content": "hi"}]}, "ok-1")
            )
            assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "hi"
            assert reply.usage.total_tokens > 0
            stream = await provider.stream(
                _chat(
                    {
                        "model": "alias",
                        "stream": True,
                        "messages": [{"role": "user", "content": "s"}],
                    },
                    "stream-2",
                )
            )
            raw = b"".join([chunk async for chunk in stream])
            assert raw.endswith(b"data: [DONE]\n\n") and b'"usage"' not in raw
            assert stream.usage is not None  # asked upstream, dropped for the client
            assert len(orjson.loads((await provider.embeddings(emb)).body)["data"]) == 1
            with pytest.raises(UpstreamClientError) as caught:
                await provider.chat(
                    _chat(
                        {"model": "a", "messages": [{"role": "user", "content": "x"}]}, "status-429"
                    )
                )
            assert caught.value.status == 429
        finally:
            await provider.close()

    upstream.received.clear()
    asyncio.run(main())
    version = f"?api-version={DEFAULT_API_VERSION}"
    assert [r.path for r in upstream.received] == [
        f"/openai/deployments/ok-1/chat/completions{version}",
        f"/openai/deployments/stream-2/chat/completions{version}",
        f"/openai/deployments/ok-model/embeddings{version}",
        f"/openai/deployments/status-429/chat/completions{version}",
    ]
    for seen in upstream.received:
        assert seen.headers["api-key"] == SECRET and "Authorization" not in seen.headers


def test_api_version_from_config() -> None:
    provider = AzureOpenAIProvider(
        ProviderConfig(
            name="az", type="azure", base_url="https://r.openai.azure.com", api_version="2025-01-01"
        )
    )
    assert provider.url("my deploy", "chat/completions") == (
        "https://r.openai.azure.com/openai/deployments/my%20deploy/chat/completions"
        "?api-version=2025-01-01"
    )
