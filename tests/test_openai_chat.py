"""The shared OpenAI-format pieces translating adapters use: full request
decoding, chunk framing, and the SSE event parser."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gandalf.errors import InvalidRequest
from gandalf.provider._openai_chat import (
    ChunkWriter,
    ImagePart,
    TextPart,
    decode_chat,
    parse_arguments,
    parse_data_url,
    reject,
    usage_object,
)
from gandalf.provider.sse import EventParser
from tests.conversations import conversations


def test_decode_chat_reads_every_translated_field() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
            "max_completion_tokens": 5,
            "max_tokens": 9,
            "stop": "END",
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {}}},
            "stream_options": {"include_usage": True},
            "unknown_field": {"kept": "out of the way"},
        }
    )
    request = decode_chat(body)
    assert request.output_limit == 5
    assert request.stop_list == ["END"]
    assert request.wants_usage
    user = request.messages[1].content
    assert isinstance(user, list) and isinstance(user[0], TextPart)
    assert isinstance(user[1], ImagePart) and user[1].image_url.url == "https://x/y.png"
    calls = request.messages[2].tool_calls
    assert calls is not None and calls[0].function.name == "f"
    assert request.response_format is not None
    assert request.response_format.json_schema is not None
    assert request.response_format.json_schema.name == "r"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]},
            "messages[0].content[0].type",
        ),
        ({"temperature": "hot"}, "temperature"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ],
)
def test_decode_chat_names_the_bad_field(patch: dict[str, object], param: str) -> None:
    body = orjson.dumps({"model": "m", "messages": [], **patch})
    with pytest.raises(InvalidRequest) as caught:
        decode_chat(body)
    assert caught.value.param == param and caught.value.status == 400


def test_data_urls_and_arguments() -> None:
    assert parse_data_url("data:image/png;base64,aGk=", "p") == ("image/png", "aGk=")
    assert parse_data_url("https://example.com/cat.png", "p") is None
    for bad in ("data:image/png,aGk=", "data:;base64,aGk=", "data:image/png;base64,%%%"):
        with pytest.raises(InvalidRequest) as caught:
            parse_data_url(bad, "messages[0].content[1].image_url.url")
        assert caught.value.param == "messages[0].content[1].image_url.url"
    assert parse_arguments("", "p") == {} and parse_arguments(' {"a": [1]} ', "p") == {"a": [1]}
    for bad in ("{", "[1]", "3"):
        with pytest.raises(InvalidRequest):
            parse_arguments(bad, "p")
    error = reject("logit_bias", "anthropic", "it has no token biasing")
    assert error.param == "logit_bias" and "anthropic" in error.message


def _events(raw: bytes) -> list[object]:
    out: list[object] = []
    for block in raw.split(b"\n\n"):
        if block:
            assert block.startswith(b"data: ")
            payload = block[6:]
            out.append(payload if payload == b"[DONE]" else orjson.loads(payload))
    return out


def test_chunk_writer_frames_openai_chunks() -> None:
    w = ChunkWriter("msg_1", 'model "q"', 1700000000)
    raw = (
        w.role()
        + w.content('he said "hi"\n')
        + w.tool_start(0, "toolu_1", "get_weather")
        + w.tool_arguments(0, '{"city": ')
        + w.finish("tool_calls")
        + w.usage(usage_object(3, 4, cached=1))
    )
    head = {"id": "msg_1", "object": "chat.completion.chunk", "created": 1700000000}
    head["model"] = 'model "q"'

    def chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice]}

    assert _events(raw) == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": 'he said "hi"\n'}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({}, "tool_calls"),
        {
            **head,
            "choices": [],
            "usage": {
                "prompt_tokens": 3,
                "completion_tokens": 4,
                "total_tokens": 7,
                "prompt_tokens_details": {"cached_tokens": 1},
            },
        },
    ]


TRANSCRIPT = (
    b'event: message_start\r\ndata: {"a":1}\r\n\r\n'
    b": comment\n\n"
    b"event: ping\ndata: {}\n\n"
    b"id: 7\nretry: 10\ndata: line1\ndata:line2\n\n"
    b'event: message_stop\ndata: {"z":"\\n"}\n\n'
)
EXPECTED = [
    (b"message_start", b'{"a":1}'),
    (b"ping", b"{}"),
    (b"", b"line1\nline2"),
    (b"message_stop", b'{"z":"\\n"}'),
]


def test_event_parser_at_every_split_point() -> None:
    for cut in range(len(TRANSCRIPT) + 1):
        parser = EventParser()
        got = parser.feed(TRANSCRIPT[:cut]) + parser.feed(TRANSCRIPT[cut:]) + parser.finish()
        assert got == EXPECTED, cut


@given(st.lists(st.integers(1, 40), max_size=30))
@settings(derandomize=True, database=None, max_examples=200)
def test_event_parser_any_read_sizes(sizes: list[int]) -> None:
    parser = EventParser()
    got: list[tuple[bytes, bytes]] = []
    rest = TRANSCRIPT
    for size in sizes:
        got += parser.feed(rest[:size])
        rest = rest[size:]
    got += parser.feed(rest) + parser.finish()
    assert got == EXPECTED


def test_event_parser_keeps_an_unterminated_last_event() -> None:
    parser = EventParser()
    assert parser.feed(b'data: {"x":1}\n\ndata: {"y":2}') == [(b"", b'{"x":1}')]
    assert parser.finish() == [(b"", b'{"y":2}')]
    assert parser.finish() == []


@given(conversations())
@settings(derandomize=True, database=None, max_examples=100, deadline=None)
def test_random_conversations_decode(request: dict[str, object]) -> None:
    decoded = decode_chat(orjson.dumps(request))
    assert len(decoded.messages) == len(request["messages"])  # type: ignore[arg-type]
