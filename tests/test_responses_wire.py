"""app/responses_wire.py: Responses requests as chat bodies, chat answers and
streams as Responses (checked with the openai SDK's own types)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gandalf.app.responses_wire import (
    EventWriter,
    chat_body,
    decode_request,
    encode,
    from_completion,
    input_items,
)
from gandalf.domain import Usage
from gandalf.errors import InvalidRequest

_events: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


def _request(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "input": "hi", **fields}).encode()


def _chat(body: dict[str, Any], reasoning: bool = False) -> dict[str, Any]:
    request = decode_request(_request(**body))
    result: dict[str, Any] = json.loads(
        chat_body(request, input_items(request), reasoning=reasoning)
    )
    return result


def test_items_become_chat_messages() -> None:
    sent = _chat(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Use metric units."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": "data:image/png;base64,AA"},
                    ],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Let me look."}],
                },
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"a":1}'},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": "two"},
            ],
        }
    )
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use metric units."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"a":1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]


def test_options_become_chat_options() -> None:
    sent = _chat(
        {
            "stream": True,
            "max_output_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "parallel_tool_calls": False,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "E", "schema": {"type": "object"}}},
            "reasoning": {"effort": "low"},
        },
        reasoning=True,
    )
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["max_completion_tokens"], sent["temperature"], sent["top_p"]) == (50, 0.2, 0.9)
    assert sent["parallel_tool_calls"] is False
    assert sent["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "E", "schema": {"type": "object"}},
    }
    assert sent["reasoning_effort"] == "low"
    assert _chat({"text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"
    }


def test_what_a_chat_target_cannot_honour_is_a_400_naming_it() -> None:
    with pytest.raises(InvalidRequest) as caught:
        _chat({"reasoning": {"effort": "high"}})
    assert caught.value.param == "reasoning.effort"
    with pytest.raises(InvalidRequest) as caught:
        _chat({"prompt": {"id": "pmpt_1"}})
    assert caught.value.param == "prompt"


def test_a_completion_becomes_a_response() -> None:
    request = decode_request(
        _request(tools=[{"type": "function", "name": "f"}], metadata={"a": "b"})
    )
    completion = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    usage = Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8, reasoning_tokens=1)
    response = from_completion(request, "resp_1", json.dumps(completion).encode(), usage)
    parsed = Response.model_validate_json(encode(response))
    assert parsed.id == "resp_1" and parsed.status == "completed" and parsed.model == "m"
    assert parsed.output_text == "Checking."
    call = parsed.output[1]
    assert call.type == "function_call" and call.call_id == "call_1" and call.name == "f"
    assert parsed.usage is not None and parsed.usage.total_tokens == 8
    assert parsed.usage.output_tokens_details.reasoning_tokens == 1
    assert parsed.metadata == {"a": "b"} and parsed.tools[0].type == "function"


def test_a_completion_cut_at_the_limit_is_incomplete() -> None:
    request = decode_request(_request())
    completion = {"choices": [{"message": {"content": "abc"}, "finish_reason": "length"}]}
    response = from_completion(request, "resp_1", json.dumps(completion).encode(), Usage())
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _parse_events(data: bytes) -> list[Any]:
    events = []
    for block in data.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                events.append(_events.validate_json(line[6:]))
    return events


def test_a_chat_stream_becomes_the_typed_events_even_cut_anywhere() -> None:
    stream = (
        _chunk({"role": "assistant", "content": "Hel"})
        + _chunk({"content": "lo"})
        + _chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}
                ]
            }
        )
        + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]})
        + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})
        + _chunk({}, "tool_calls")
        + b"data: [DONE]\n\n"
    )
    for cut in (1, 7, 40, len(stream)):
        writer = EventWriter(decode_request(_request()), "resp_1")
        out = writer.start()
        for i in range(0, len(stream), cut):
            out += writer.feed(stream[i : i + cut])
        out += writer.finish(Usage(prompt_tokens=2, completion_tokens=4, total_tokens=6))
        events = _parse_events(out)
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert [e.type for e in events] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        final = events[-1].response
        assert final.output_text == "Hello" and final.output[1].arguments == '{"a":1}'
        assert final.output[1].call_id == "call_1" and final.usage.total_tokens == 6
        assert events[9].output_index == 1 and events[12].arguments == '{"a":1}'


def test_a_stream_cut_at_the_limit_ends_incomplete() -> None:
    writer = EventWriter(decode_request(_request()), "resp_1")
    out = writer.start() + writer.feed(_chunk({"content": "abc"}, "length"))
    events = _parse_events(out + writer.finish(None))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": []}, "input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0]"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"model": 5}, "model"),
    ],
)
def test_decode_refuses_with_the_param(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_request(_request(**fields))
    assert caught.value.param == param, caught.value.message
    assert caught.value.status == 400


def test_decode_keeps_the_input_items_raw() -> None:
    items = [{"role": "user", "content": "a", "unknown": {"kept": True}}]
    request = decode_request(_request(input=items))
    assert [json.loads(bytes(i)) for i in input_items(request)] == items
    string = decode_request(_request(input="plain"))
    assert msgspec.json.decode(bytes(input_items(string)[0])) == {
        "role": "user",
        "content": "plain",
    }
