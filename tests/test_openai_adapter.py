"""The openai adapter against a local mock upstream."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import orjson
import pytest

from gandalf.domain import ChatCall, ChatRequest, ProviderConfig, Target
from gandalf.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamClientError,
    UpstreamError,
    UpstreamTotalTimeout,
)
from gandalf.provider.openai import OpenAIProvider, extract_usage, replace_model
from tests.upstream import MockUpstream

_decoder = msgspec.json.Decoder(ChatRequest)


def chat_call(body: bytes, target_model: str) -> ChatCall:
    request = _decoder.decode(body)
    return ChatCall(
        body=body,
        request=request,
        alias=request.model,
        target=Target(provider="up", model=target_model),
        request_id="rid",
    )


def run_call(base_url: str, call: ChatCall, timeout_ms: int = 5000) -> object:
    async def main() -> object:
        provider = OpenAIProvider(
            ProviderConfig(
                name="up",
                type="openai",
                base_url=base_url,
                api_key="sk-provider-secret",
                timeout_ms=timeout_ms,
            )
        )
        await provider.start()
        try:
            return await provider.chat(call)
        except GatewayError as exc:
            return exc
        finally:
            await provider.close()

    return asyncio.run(main())


def test_replace_model_keeps_every_other_byte() -> None:
    body = b'{"model":"alias","n":1.50,"x":{"deep":[1e400,"\\u00e9"]},"unknown_field":true}'
    out = replace_model(body, "real-model")
    assert out.startswith(b'{"model":"real-model",')
    # values keep their exact spelling, even ones orjson could not round-trip
    assert b'"n":1.50' in out and b"1e400" in out and b'"\\u00e9"' in out
    assert b'"unknown_field":true' in out


def test_extract_usage_tolerates_missing_usage_and_flags_non_json() -> None:
    usage = extract_usage(b'{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}')
    assert usage is not None and usage.total_tokens == 7
    missing = extract_usage(b'{"id":"x"}')
    assert missing is not None and missing.total_tokens == 0
    assert extract_usage(b"not json") is None
    assert extract_usage(b"[1]") is None


def test_a_2xx_that_is_not_json_is_502(upstream: MockUpstream) -> None:
    body = orjson.dumps({"model": "a", "messages": [{"role": "user", "content": "x"}]})
    reply = run_call(upstream.base_url, chat_call(body, "badjson"))
    assert type(reply) is UpstreamError and reply.status == 502


def test_body_forwarded_as_sent_with_model_and_key_replaced(upstream: MockUpstream) -> None:
    upstream.clear()
    body = (
        b'{"model":"my-alias","messages":[{"role":"user","content":"hi"}],'
        b'"temperature":0.70,"brand_new_param":{"a":[1,2]}}'
    )
    reply = run_call(upstream.base_url, chat_call(body, "ok-model"))
    assert not isinstance(reply, Exception), reply
    seen = upstream.received[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == "Bearer sk-provider-secret"
    assert seen.json()["model"] == "ok-model"
    assert b'"temperature":0.70' in seen.body and b'"brand_new_param":{"a":[1,2]}' in seen.body
    assert reply.usage.total_tokens > 0  # type: ignore[attr-defined]


def test_same_model_forwards_the_identical_bytes(upstream: MockUpstream) -> None:
    upstream.clear()
    body = b'{"model": "ok-x",  "messages": [{"role": "user", "content": "hi"}]}'
    run_call(upstream.base_url, chat_call(body, "ok-x"))
    assert upstream.received[-1].body == body


@pytest.mark.parametrize(
    ("model", "error", "status"),
    [
        ("status-400", UpstreamClientError, 400),
        ("status-404", UpstreamClientError, 404),
        ("status-422", UpstreamClientError, 422),
        ("status-429", UpstreamClientError, 429),
        ("status-401", UpstreamAuthError, 502),
        ("status-403", UpstreamAuthError, 502),
        ("status-500", UpstreamError, 502),
        ("status-503", UpstreamError, 502),
        ("text-400", UpstreamClientError, 400),
        ("text-502", UpstreamError, 502),
    ],
)
def test_upstream_failures_map_to_the_contract(
    upstream: MockUpstream, model: str, error: type[GatewayError], status: int
) -> None:
    body = orjson.dumps({"model": "a", "messages": [{"role": "user", "content": "x"}]})
    reply = run_call(upstream.base_url, chat_call(body, model))
    assert type(reply) is error
    assert isinstance(reply, GatewayError)
    assert reply.status == status
    wire = orjson.loads(reply.body())
    assert set(wire["error"]) >= {"message", "type", "param", "code"}
    assert "sk-provider-secret" not in reply.body().decode()
    if model == "status-429":
        assert dict(reply.headers())[b"retry-after"] == b"7"
    if model.startswith("status-4") and status < 500:
        assert wire["error"]["code"] == model.replace("status-", "mock_")  # passed through


def test_connection_refused_is_502() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body = orjson.dumps({"model": "a", "messages": [{"role": "user", "content": "x"}]})
    reply = run_call(f"http://127.0.0.1:{port}/v1", chat_call(body, "ok"))
    assert type(reply) is UpstreamError and reply.status == 502
    assert "unreachable" in reply.message


def test_timeout_is_504(upstream: MockUpstream) -> None:
    body = orjson.dumps({"model": "a", "messages": [{"role": "user", "content": "x"}]})
    reply = run_call(upstream.base_url, chat_call(body, "hang"), timeout_ms=200)
    # The total ran out before the headers: maybe only a long answer (app/health.py).
    assert type(reply) is UpstreamTotalTimeout and reply.status == 504
    assert reply.code == "upstream_timeout"
