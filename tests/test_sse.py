"""Stream plumbing without a server: EventRelay framing, rewrite_body, the fake provider."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from typing import Any

import msgspec
import pytest

from gandalf.domain import (
    ChatCall,
    ChatRequest,
    EmbeddingsCall,
    EmbeddingsRequest,
    ProviderConfig,
    Target,
    Usage,
)
from gandalf.provider.fake import FakeProvider, FakeStream
from gandalf.provider.openai import rewrite_body
from gandalf.provider.sse import EventRelay

# ---------------------------------------------------------------------------- sample streams


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
USAGE_ONLY = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "m",
    "choices": [],
    "usage": USAGE,
}
CONTENT = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo \u00e9\u4e16 \\n\n"}),  # non-ASCII, an escaped and a real newline
    chunk({"content": "!"}),
    chunk({}, "stop"),
]


def event(payload: Any, newline: bytes = b"\n", spaced: bool = False) -> bytes:
    separators = (", ", ": ") if spaced else (",", ":")
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=separators)
    return b"data: " + data.encode() + newline + newline


def stream(newline: bytes = b"\n", usage: bool = True, spaced: bool = False) -> list[bytes]:
    events = [event(c, newline, spaced) for c in CONTENT]
    if usage:
        events.append(event(USAGE_ONLY, newline, spaced))
    events.append(event("[DONE]", newline))
    return events


def run(relay: EventRelay, reads: list[bytes]) -> bytes:
    out = b"".join(relay.feed(read) for read in reads)
    return out + relay.finish()


def one_read(events: list[bytes], drop_usage: bool) -> tuple[bytes, EventRelay]:
    relay = EventRelay(drop_usage=drop_usage)
    return run(relay, [b"".join(events)]), relay


def data_events(raw: bytes) -> list[bytes]:
    sep = b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n"
    return [e for e in raw.split(sep) if e]


# ---------------------------------------------------------------------------- EventRelay


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("drop_usage", [False, True], ids=["keep", "drop"])
def test_every_split_point_forwards_the_same_bytes(newline: bytes, drop_usage: bool) -> None:
    events = stream(newline)
    whole = b"".join(events)
    expected, reference = one_read(events, drop_usage)
    for cut in range(len(whole) + 1):
        relay = EventRelay(drop_usage=drop_usage)
        out = relay.feed(whole[:cut])
        assert expected.startswith(out) and len(out) <= cut, cut  # never more than arrived
        assert out.endswith(newline * 2) or out == b"", cut  # only whole events
        out += relay.feed(whole[cut:]) + relay.finish()
        assert out == expected, cut
        assert (relay.usage, relay.events, relay.done) == (
            reference.usage,
            reference.events,
            reference.done,
        ), cut


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("drop_usage", [False, True], ids=["keep", "drop"])
def test_byte_by_byte_and_two_cuts_forward_the_same_bytes(newline: bytes, drop_usage: bool) -> None:
    events = stream(newline)
    whole = b"".join(events)
    expected, _ = one_read(events, drop_usage)
    relay = EventRelay(drop_usage=drop_usage)
    assert run(relay, [whole[i : i + 1] for i in range(len(whole))]) == expected
    assert relay.done and relay.usage == Usage(**USAGE)
    step = 7  # every pair of cut points on a grid: three reads per stream
    for first in range(0, len(whole), step):
        for second in range(first, len(whole), step):
            relay = EventRelay(drop_usage=drop_usage)
            reads = [whole[:first], whole[first:second], whole[second:]]
            assert run(relay, reads) == expected, (first, second)


def test_whole_events_pass_through_untouched() -> None:
    events = stream()
    out, relay = one_read(events, drop_usage=False)
    assert out == b"".join(events)
    assert relay.done


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
def test_usage_is_extracted_and_the_usage_only_event_dropped(newline: bytes, spaced: bool) -> None:
    events = stream(newline, spaced=spaced)
    kept, keeper = one_read(events, drop_usage=False)
    dropped, dropper = one_read(events, drop_usage=True)
    assert keeper.usage == dropper.usage == Usage(**USAGE)
    assert kept == b"".join(events)
    assert dropped == b"".join(e for e in events if e != event(USAGE_ONLY, newline, spaced))
    assert b'"usage"' not in dropped and dropped.endswith(b"data: [DONE]" + newline * 2)
    assert dropper.events == keeper.events - 1


def test_a_content_chunk_carrying_usage_is_never_dropped() -> None:
    """Some upstreams report running usage on every chunk: those are content, not usage-only."""
    with_usage = [
        event(chunk({"content": "a"}, usage={**USAGE, "completion_tokens": 1})),
        event(chunk({"content": "b"}, "stop", usage=USAGE)),
        event("[DONE]"),
    ]
    out, relay = one_read(with_usage, drop_usage=True)
    assert out == b"".join(with_usage)
    assert relay.usage == Usage(**USAGE)  # the last one reported wins
    assert relay.events == 3


def test_usage_null_and_malformed_usage_events_are_forwarded() -> None:
    events = [
        event(chunk({"content": "a"}, usage=None)),
        b'data: {"choices":[],"usage":{"prompt_tokens":"lots"}}\n\n',  # not a usage object
        b'data: {"choices":[],"usage":{\n\n',  # not JSON at all
        event("[DONE]"),
    ]
    out, relay = one_read(events, drop_usage=True)
    assert out == b"".join(events)
    assert relay.usage is None


def test_done_is_detected_only_once_it_arrived() -> None:
    relay = EventRelay(drop_usage=True)
    relay.feed(event(chunk({"content": "x"})))
    assert not relay.done
    relay.feed(b"data: [DO")
    assert not relay.done
    assert relay.feed(b"NE]\n\n") == b"data: [DONE]\n\n"
    assert relay.done


def test_finish_flushes_an_unterminated_tail() -> None:
    relay = EventRelay(drop_usage=True)
    first = event(chunk({"content": "x"}))
    assert relay.feed(first + b"data: [DONE]") == first
    assert not relay.done
    assert relay.finish() == b"data: [DONE]"
    assert relay.done and relay.events == 2
    assert relay.finish() == b""  # nothing left twice

    cut = EventRelay(drop_usage=True)
    assert cut.feed(b'data: {"choices":[{"delta":{"content":"hal') == b""
    assert cut.finish() == b'data: {"choices":[{"delta":{"content":"hal'
    assert not cut.done and cut.events == 1


def test_events_count_the_data_events_forwarded() -> None:
    events = stream()
    for drop_usage in (False, True):
        out, relay = one_read(events, drop_usage)
        assert relay.events == len(data_events(out)), drop_usage
    relay = EventRelay(drop_usage=False)
    relay.feed(b": keep-alive comment\n\n")
    relay.feed(b"event: ping\n\n")
    assert relay.events == 0
    relay.feed(event(chunk({"content": "x"})) * 3)
    assert relay.events == 3


def test_text_that_mentions_sse_framing_is_only_content() -> None:
    """A model writing about SSE itself (``data: [DONE]`` inside a delta's text) must not
    mark the stream done (an upstream dying right after would then end it silently),
    nor count as extra events."""
    quoting = [
        event(chunk({"content": "end your stream with data: [DONE]"})),
        event(chunk({"content": "each line starts with data: then JSON; data: again"})),
    ]
    relay = EventRelay(drop_usage=True)
    assert run(relay, quoting) == b"".join(quoting)
    assert not relay.done
    assert relay.events == 2


def test_nothing_is_forwarded_before_an_event_is_complete() -> None:
    relay = EventRelay(drop_usage=True)
    whole = event(chunk({"content": "abc"}))
    assert relay.feed(whole[:-1]) == b""
    assert relay.feed(whole[-1:]) == whole


# ---------------------------------------------------------------------------- rewrite_body


def fields(body: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(body)
    return decoded


def test_include_usage_is_added_when_there_are_no_stream_options() -> None:
    body = (
        b'{"model":"a","stream":true,"temperature":1.50,'
        b'"messages":[{"role":"user","content":"\\u00e9"}]}'
    )
    out = rewrite_body(body, include_usage=True)
    assert fields(out)["stream_options"] == {"include_usage": True}
    assert out.startswith(
        b'{"model":"a","stream":true,"temperature":1.50,'
        b'"messages":[{"role":"user","content":"\\u00e9"}],'
    )


def test_include_usage_is_merged_into_existing_stream_options() -> None:
    body = (
        b'{"model":"a","stream_options":{"include_usage":false,"x_custom":1.50,'
        b'"nested":{"k":[1e2,"\\u00e9"]}},"stream":true,"messages":[]}'
    )
    out = rewrite_body(body, include_usage=True)
    options = fields(out)["stream_options"]
    assert options == {"include_usage": True, "x_custom": 1.5, "nested": {"k": [100.0, "é"]}}
    assert b'"x_custom":1.50' in out and b'"nested":{"k":[1e2,"\\u00e9"]}' in out
    assert b'"model":"a"' in out and out.endswith(b'"stream":true,"messages":[]}')


def test_stream_options_null_becomes_include_usage() -> None:
    out = rewrite_body(b'{"model":"a","stream":true,"stream_options":null}', include_usage=True)
    assert fields(out) == {"model": "a", "stream": True, "stream_options": {"include_usage": True}}


def test_model_replaced_with_and_without_include_usage() -> None:
    body = b'{"model":"alias","n":1.0e0,"stream":true,"stream_options":{"include_usage":true}}'
    only_model = rewrite_body(body, model="real/\u00e9-model")
    assert fields(only_model)["model"] == "real/\u00e9-model"
    assert b'"n":1.0e0' in only_model
    assert b'"stream_options":{"include_usage":true}' in only_model
    both = rewrite_body(b'{"model":"alias","stream":true}', model="m2", include_usage=True)
    assert fields(both) == {
        "model": "m2",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# ---------------------------------------------------------------------------- the fake provider


_chat = msgspec.json.Decoder(ChatRequest)
_embed = msgspec.json.Decoder(EmbeddingsRequest)
FAKE = ProviderConfig(name="fake", type="fake")


def chat_call(payload: dict[str, Any]) -> ChatCall:
    body = json.dumps(payload).encode()
    request = _chat.decode(body)
    return ChatCall(
        body=body,
        request=request,
        alias=request.model,
        target=Target(provider="fake", model="fake-1"),
        request_id="0190aaaa-bbbb-7ccc-8ddd-eeeeeeeeeeee",
    )


def fake_stream(payload: dict[str, Any]) -> tuple[FakeStream, list[bytes]]:
    async def main() -> tuple[FakeStream, list[bytes]]:
        stream = await FakeProvider(FAKE).stream(chat_call(payload))
        return stream, [piece async for piece in stream]

    return asyncio.run(main())


def parsed_events(pieces: list[bytes]) -> list[Any]:
    raw = b"".join(pieces)
    assert raw.endswith(b"data: [DONE]\n\n")
    out = []
    for item in data_events(raw):
        assert item.startswith(b"data: ")
        out.append(item[6:] if item == b"data: [DONE]" else json.loads(item[6:]))
    return out


@pytest.mark.parametrize(
    "text", ["Hello, streaming world! \u00e9\u4e16\U0001f600", "x", "", "a" * 41]
)
def test_fake_stream_pieces_concatenate_to_the_echo(text: str) -> None:
    stream, pieces = fake_stream(
        {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": text}]}
    )
    events = parsed_events(pieces)
    assert events[-1] == b"[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake-1" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("usage" in c for c in chunks)
    assert stream.usage is not None and stream.usage.completion_tokens == (len(text) + 3) // 4
    assert stream.events == (len(text) + 3) // 4  # one per content piece


def test_fake_stream_honours_include_usage() -> None:
    payload: dict[str, Any] = {
        "model": "fake-model",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    }
    stream, pieces = fake_stream(payload)
    chunks = parsed_events(pieces)[:-1]
    usage_events = [c for c in chunks if "usage" in c]
    assert len(usage_events) == 1 and usage_events[0] is chunks[-1]
    assert usage_events[0]["choices"] == []
    assert stream.usage is not None
    assert usage_events[0]["usage"] == {
        "prompt_tokens": stream.usage.prompt_tokens,
        "completion_tokens": stream.usage.completion_tokens,
        "total_tokens": stream.usage.total_tokens,
    }
    assert stream.usage.total_tokens == stream.usage.prompt_tokens + 1 > 1


def fake_embeddings(payload: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps(payload).encode()
    request = _embed.decode(body)
    call = EmbeddingsCall(
        body=body,
        request=request,
        alias=request.model,
        target=Target(provider="fake", model="fake-embed-1"),
        request_id="rid",
    )
    reply = asyncio.run(FakeProvider(FAKE).embeddings(call))
    decoded: dict[str, Any] = json.loads(reply.body)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == decoded["usage"]["total_tokens"]
    return decoded


@pytest.mark.parametrize("dimensions", [1, 3, 16, 1536])
def test_fake_embeddings_are_deterministic_unit_vectors(dimensions: int) -> None:
    payload = {"model": "e", "input": ["alpha", "beta", "alpha"], "dimensions": dimensions}
    first = fake_embeddings(payload)
    assert first["object"] == "list" and first["model"] == "fake-embed-1"
    vectors = [item["embedding"] for item in first["data"]]
    assert [item["index"] for item in first["data"]] == [0, 1, 2]
    for vector in vectors:
        assert len(vector) == dimensions
        assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-9)
    assert vectors[0] == vectors[2]  # same input, same vector
    if dimensions > 1:
        assert vectors[0] != vectors[1]
    assert fake_embeddings(payload) == first  # and across calls


def test_fake_embeddings_default_dimensions_and_single_string() -> None:
    reply = fake_embeddings({"model": "e", "input": "just one"})
    [item] = reply["data"]
    assert len(item["embedding"]) == 1536


def test_fake_embeddings_base64_is_the_float32_vector() -> None:
    payload: dict[str, Any] = {"model": "e", "input": ["one", "two"], "dimensions": 12}
    floats = fake_embeddings(payload)
    encoded = fake_embeddings({**payload, "encoding_format": "base64"})
    for plain, packed in zip(floats["data"], encoded["data"], strict=True):
        assert isinstance(packed["embedding"], str)
        raw = base64.b64decode(packed["embedding"], validate=True)
        assert len(raw) == 4 * 12
        assert raw == struct.pack("<12f", *plain["embedding"])
