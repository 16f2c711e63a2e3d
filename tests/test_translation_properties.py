"""Property tests: random valid OpenAI conversations translate without
crashing and keep their text; random answers and streams (cut into random
reads) come back with their text and tool calls intact.

Derandomized (same examples every run) and without an example database, so
the suite stays deterministic.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gandalf.errors import InvalidRequest
from gandalf.provider._openai_chat import ChunkWriter, StreamTranslator, decode_chat
from gandalf.provider.anthropic import AnthropicStreamTranslator, from_anthropic, to_anthropic
from gandalf.provider.gemini import GeminiStreamTranslator, from_gemini, to_gemini
from gandalf.provider.sse import EventParser
from tests.conversations import (
    arguments,
    conversations,
    names,
    system_texts,
    texts,
    tool_arguments,
    user_visible_texts,
)

SETTINGS = settings(derandomize=True, database=None, max_examples=150, deadline=None)


def _ids() -> Any:
    counter = iter(range(1_000_000))
    return lambda: f"call_{next(counter)}"


# ---------------------------------------------------------------------------- requests


def _anthropic_texts(payload: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for message in payload["messages"]:
        for block in message["content"]:
            if block["type"] == "text":
                out.append(block["text"])
            elif block["type"] == "tool_result":
                content = block.get("content")
                if isinstance(content, str):
                    out.append(content)
                elif isinstance(content, list):
                    out.extend(part["text"] for part in content if part["type"] == "text")
    return [text for text in out if text.strip()]


@given(conversations())
@SETTINGS
def test_any_conversation_translates_to_anthropic_keeping_its_text(request: dict[str, Any]) -> None:
    payload = to_anthropic(decode_chat(orjson.dumps(request)), "claude-x", max_tokens=64)
    orjson.dumps(payload)  # JSON-encodable as is
    assert _anthropic_texts(payload) == user_visible_texts(request)
    assert payload.get("system", "") == "\n\n".join(system_texts(request))
    roles = [message["role"] for message in payload["messages"]]
    assert all(a != b for a, b in itertools.pairwise(roles))  # alternating
    uses = [
        (block["id"], block["name"], block["input"])
        for message in payload["messages"]
        for block in message["content"]
        if block["type"] == "tool_use"
    ]
    assert uses == tool_arguments(request)
    results = [
        block["tool_use_id"]
        for message in payload["messages"]
        for block in message["content"]
        if block["type"] == "tool_result"
    ]
    assert results == [call_id for call_id, _, _ in tool_arguments(request)]


@given(conversations())
@SETTINGS
def test_any_conversation_translates_to_gemini_keeping_its_text(request: dict[str, Any]) -> None:
    said: list[str] = []  # user and assistant texts; tool results become functionResponses
    for message in request["messages"]:
        if message["role"] not in ("user", "assistant"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            said.append(content)
        elif isinstance(content, list):
            said.extend(part["text"] for part in content if part["type"] == "text")
    try:
        payload = to_gemini(decode_chat(orjson.dumps(request)))
    except InvalidRequest as exc:
        # The one refusal a valid conversation can meet: nothing to send at all.
        assert exc.param == "messages"
        assert not any(said) and not tool_arguments(request)
        return
    orjson.dumps(payload)
    spoken = [
        part["text"]
        for content in payload["contents"]
        for part in content["parts"]
        if "text" in part
    ]
    assert spoken == [text for text in said if text]
    system = "\n\n".join(
        m["content"]
        for m in request["messages"]
        if m["role"] in ("system", "developer") and m["content"]
    )
    assert payload.get("systemInstruction", {"parts": [{"text": ""}]})["parts"][0]["text"] == system
    roles = [content["role"] for content in payload["contents"]]
    assert all(a != b for a, b in itertools.pairwise(roles))
    calls = [
        (part["functionCall"]["name"], part["functionCall"]["args"])
        for content in payload["contents"]
        for part in content["parts"]
        if "functionCall" in part
    ]
    assert calls == [(name, args) for _, name, args in tool_arguments(request)]
    responses = [
        (part["functionResponse"]["name"], part["functionResponse"]["response"])
        for content in payload["contents"]
        for part in content["parts"]
        if "functionResponse" in part
    ]
    results = [m["content"] for m in request["messages"] if m["role"] == "tool"]
    assert responses == [
        (name, _as_response(result))
        for (_, name, _), result in zip(tool_arguments(request), results, strict=True)
    ]


def _as_response(text: str) -> Any:
    """What a tool result becomes for Gemini: its JSON object, else {"content": text}."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) and text.lstrip().startswith("{") else {"content": text}


# ---------------------------------------------------------------------------- answers

tool_calls = st.lists(st.tuples(names, arguments), max_size=3)


@given(texts, tool_calls)
@SETTINGS
def test_anthropic_answers_come_back_whole(text: str, calls: list[tuple[str, Any]]) -> None:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    content += [
        {"type": "tool_use", "id": f"toolu_{i}", "name": name, "input": args}
        for i, (name, args) in enumerate(calls)
    ]
    body = orjson.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": content,
            "stop_reason": "tool_use" if calls else "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 4},
        }
    )
    out, usage = from_anthropic(body, created=1, response_tool=None)
    message = orjson.loads(out)["choices"][0]["message"]
    assert (message["content"] or "") == text
    got = [
        (c["function"]["name"], orjson.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls", [])
    ]
    assert got == calls
    assert usage.total_tokens == 7


@given(texts, tool_calls)
@SETTINGS
def test_gemini_answers_come_back_whole(text: str, calls: list[tuple[str, Any]]) -> None:
    parts: list[dict[str, Any]] = [{"text": text}] if text else []
    parts += [{"functionCall": {"name": name, "args": args}} for name, args in calls]
    body = orjson.dumps(
        {
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4},
        }
    )
    out, usage = from_gemini(body, model="g", created=1, completion_id="c", new_call_id=_ids())
    choice = orjson.loads(out)["choices"][0]
    assert (choice["message"]["content"] or "") == text
    got = [
        (c["function"]["name"], orjson.loads(c["function"]["arguments"]))
        for c in choice["message"].get("tool_calls", [])
    ]
    assert got == calls
    assert choice["finish_reason"] == ("tool_calls" if calls else "stop")
    assert usage.total_tokens == 7


# ---------------------------------------------------------------------------- streams


def _cuts(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces: list[bytes] = []
    rest = data
    for size in sizes:
        if not rest:
            break
        pieces.append(rest[:size])
        rest = rest[size:]
    return [*pieces, rest] if rest else pieces


def _fragments(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _assemble(raw: bytes) -> tuple[str, list[tuple[str, str, str]], str | None]:
    text: list[str] = []
    calls: dict[int, list[str]] = {}
    finish = None
    assert raw.endswith(b"data: [DONE]\n\n")
    for block in raw.split(b"\n\n"):
        if not block or block == b"data: [DONE]":
            continue
        chunk = orjson.loads(block[6:])
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                text.append(delta["content"])
            for call in delta.get("tool_calls", []):
                slot = calls.setdefault(call["index"], ["", "", ""])
                if "id" in call:
                    slot[0] = call["id"]
                slot[1] += call["function"].get("name", "")
                slot[2] += call["function"].get("arguments", "")
            if choice["finish_reason"] is not None:
                finish = choice["finish_reason"]
    return "".join(text), [(a, b, c) for a, b, c in (calls[i] for i in sorted(calls))], finish


def _run(translator: StreamTranslator, transcript: bytes, reads: list[int]) -> bytes:
    parser = EventParser()
    out = b""
    for piece in _cuts(transcript, reads):
        for name, data in parser.feed(piece):
            out += translator.feed(name, data)
    for name, data in parser.finish():
        out += translator.feed(name, data)
    return out + translator.finish()


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


@given(
    texts,
    tool_calls,
    st.lists(st.integers(0, 200), max_size=8),
    st.lists(st.integers(1, 64), max_size=40),
)
@SETTINGS
def test_anthropic_streams_reassemble_exactly(
    text: str, calls: list[tuple[str, Any]], cuts: list[int], reads: list[int]
) -> None:
    events = [
        _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "model": "claude-x",
                    "role": "assistant",
                    "content": [],
                    "usage": {"input_tokens": 2, "output_tokens": 1},
                },
            },
        )
    ]
    index = 0
    if text:
        events.append(
            _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        )
        for piece in _fragments(text, cuts):
            delta = {"type": "text_delta", "text": piece}
            events.append(
                _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            )
        events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        index = 1
    expected_calls = []
    for i, (name, args) in enumerate(calls):
        block = {"type": "tool_use", "id": f"toolu_{i}", "name": name, "input": {}}
        events.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
        encoded = orjson.dumps(args).decode()
        for piece in _fragments(encoded, cuts):
            delta = {"type": "input_json_delta", "partial_json": piece}
            events.append(
                _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        expected_calls.append((f"toolu_{i}", name, args))
        index += 1
    stop = "tool_use" if calls else "end_turn"
    events.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop},
                "usage": {"output_tokens": 9},
            },
        )
    )
    events.append(_sse("message_stop", {"type": "message_stop"}))
    translator = AnthropicStreamTranslator("p", created=1, include_usage=False)
    got_text, got_calls, finish = _assemble(_run(translator, b"".join(events), reads))
    assert got_text == text
    assert [(i, n, orjson.loads(a)) for i, n, a in got_calls] == expected_calls
    assert finish == ("tool_calls" if calls else "stop")
    assert translator.usage is not None and translator.usage.completion_tokens == 9


@given(
    texts,
    tool_calls,
    st.lists(st.integers(0, 200), max_size=8),
    st.lists(st.integers(1, 64), max_size=40),
)
@SETTINGS
def test_gemini_streams_reassemble_exactly(
    text: str, calls: list[tuple[str, Any]], cuts: list[int], reads: list[int]
) -> None:
    chunks: list[dict[str, Any]] = []
    pieces = _fragments(text, cuts)
    for n, piece in enumerate(pieces, 1):
        chunks.append(
            {
                "candidates": [{"content": {"role": "model", "parts": [{"text": piece}]}}],
                "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": n},
            }
        )
    last_parts = [{"functionCall": {"name": name, "args": args}} for name, args in calls]
    chunks.append(
        {
            "candidates": [
                {"content": {"role": "model", "parts": last_parts}, "finishReason": "STOP"}
            ],
            "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": len(pieces) + 1},
        }
    )
    transcript = b"".join(b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks)
    translator = GeminiStreamTranslator(
        model="g", created=1, completion_id="c", include_usage=False, new_call_id=_ids()
    )
    got_text, got_calls, finish = _assemble(_run(translator, transcript, reads))
    assert got_text == text
    assert [(n, orjson.loads(a)) for _, n, a in got_calls] == calls
    assert len({i for i, _, _ in got_calls}) == len(calls)
    assert finish == ("tool_calls" if calls else "stop")
    # Cumulative usage: the last report, never the sum.
    assert translator.usage is not None and translator.usage.completion_tokens == len(pieces) + 1


def test_chunk_writer_round_trips_any_text() -> None:
    writer = ChunkWriter("id", "m", 1)
    for text in ("", "plain", 'quote " and \\ and \n newline', "emoji \U0001f600", "\u2028"):
        raw = writer.content(text)
        assert orjson.loads(raw[6:])["choices"][0]["delta"]["content"] == text
