"""The openai adapter against a local mock upstream."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import orjson
import pytest

from gandalf.domain import ChatCall, ChatRequest, LastChunk, ProviderConfig, Target
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


# ------------------------------------------------- a stream's last chunk (LastChunk)

_EVENTS = (
    b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
)
_USAGE_EVENT = (
    b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\n\n'
)
_DONE = b"data: [DONE]\n\n"


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)


async def _raw_upstream(
    gate: asyncio.Event, *, split: bool, connections: list[int]
) -> asyncio.Server:
    """An upstream answering every request on a connection with the same event
    stream: in one write (head, events, the chunked body's end), or (``split``)
    everything but the body's end, which waits for ``gate``."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    body = _chunked(_EVENTS, _USAGE_EVENT, _DONE)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                request_head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in request_head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                if split:
                    writer.write(head + body)
                    await writer.drain()
                    await gate.wait()
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(head + body + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _stream_chunks(*, split: bool, streams: int = 1) -> tuple[list[list[bytes]], int, int]:
    """Open ``streams`` streams one after another; their chunks, the upstream
    connections made, and the total tokens of the last usage."""

    async def main() -> tuple[list[list[bytes]], int, int]:
        gate = asyncio.Event()
        connections: list[int] = []
        server = await _raw_upstream(gate, split=split, connections=connections)
        port = server.sockets[0].getsockname()[1]
        provider = OpenAIProvider(
            ProviderConfig(name="up", type="openai", base_url=f"http://127.0.0.1:{port}/v1")
        )
        await provider.start()
        body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}'
        seen: list[list[bytes]] = []
        total = 0
        try:
            for _ in range(streams):
                gate.clear()
                stream = await provider.stream(chat_call(body, "m"))
                chunks: list[bytes] = []
                async for chunk in stream:
                    chunks.append(chunk)
                    if split and _DONE in chunk:
                        gate.set()  # the body ends only now, in a read of its own
                await stream.aclose()
                seen.append(chunks)
                assert stream.usage is not None
                total = stream.usage.total_tokens
        finally:
            await provider.close()
            server.close()
            await server.wait_closed()
        return seen, len(connections), total

    return asyncio.run(main())


def test_a_stream_whose_body_ends_in_the_read_with_done_ends_with_a_last_chunk() -> None:
    (chunks,), _, total = _stream_chunks(split=False)
    # One read brought everything: one chunk, marked as the last, the
    # usage-only event dropped (the client did not ask for it).
    assert chunks == [_EVENTS + _DONE]
    assert type(chunks[0]) is LastChunk
    assert total == 3


def test_a_last_chunk_still_returns_the_connection_to_the_pool() -> None:
    seen, connections, _ = _stream_chunks(split=False, streams=3)
    assert all(type(chunks[-1]) is LastChunk for chunks in seen)
    assert connections == 1  # each stream released it for the next


def test_a_body_that_ends_after_done_in_a_later_read_ends_as_before() -> None:
    seen, connections, total = _stream_chunks(split=True, streams=2)
    for chunks in seen:
        assert b"".join(chunks) == _EVENTS + _DONE
        assert all(type(chunk) is bytes for chunk in chunks)  # the end came on its own
    assert connections == 1 and total == 3
