"""The gemini adapter: golden translations (tests/golden/gemini) and the provider
against the mock Gemini API (tests/mock_gemini.py)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gandalf.domain import (
    ChatCall,
    ChatRequest,
    EmbeddingsCall,
    EmbeddingsRequest,
    ProviderConfig,
    Target,
    Usage,
)
from gandalf.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamAuthError,
    UpstreamClientError,
    UpstreamError,
    UpstreamOverloaded,
)
from gandalf.provider._openai_chat import decode_chat, decode_embeddings
from gandalf.provider._signatures import Signatures
from gandalf.provider.gemini import (
    GeminiProvider,
    GeminiStreamTranslator,
    api_base,
    finish_reason,
    from_gemini,
    from_gemini_embeddings,
    gemini_error,
    join_call_id,
    model_path,
    split_call_id,
    to_gemini,
    to_gemini_embeddings,
)
from gandalf.provider.sse import EventParser
from tests.conversations import conversations, system_texts, tool_arguments
from tests.mock_gemini import SIGNATURE, SKIP_SIGNATURE, MockGemini, mock_vector, running_gemini

GOLDEN = Path(__file__).parent / "golden" / "gemini"
CREATED = 1700000000
COMPLETION_ID = "chatcmpl-golden"
PROVIDER = "gemini-golden"
KEY = "gk-provider-secret"


def golden(kind: str, suffix: str = ".json") -> list[str]:
    return sorted(p.name.removesuffix(suffix) for p in (GOLDEN / kind).glob("*" + suffix))


def load(kind: str, name: str) -> Any:
    return json.loads((GOLDEN / kind / f"{name}.json").read_text("utf-8"))


def minted_ids() -> Callable[[], str]:
    """Deterministic tool call ids: call_golden_0, call_golden_1, ..."""
    counter = itertools.count()
    return lambda: f"call_golden_{next(counter)}"


def request_of(body: dict[str, Any]) -> Any:
    return decode_chat(orjson.dumps(body))


def as_json(value: Any) -> Any:
    """``value`` as JSON sees it (floats and ints compare equal, tuples are lists)."""
    return json.loads(orjson.dumps(value))


# =========================================================================== requests


@pytest.mark.parametrize("name", golden("requests"))
def test_request_golden(name: str) -> None:
    fixture = load("requests", name)
    assert as_json(to_gemini(request_of(fixture["openai"]))) == fixture["gemini"]


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        (
            {"type": "function", "function": {"name": "f"}},
            {"mode": "ANY", "allowedFunctionNames": ["f"]},
        ),
    ],
)
def test_tool_choice(choice: Any, config: dict[str, Any]) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": TOOLS,
        "tool_choice": choice,
    }
    out = to_gemini(request_of(body))
    assert out["toolConfig"] == {"functionCallingConfig": config}
    assert out["tools"] == [
        {"functionDeclarations": [{"name": "f", "parametersJsonSchema": {"type": "object"}}]}
    ]


def test_no_tools_no_config_no_system() -> None:
    out = to_gemini(request_of({"model": "m", "messages": [{"role": "user", "content": "x"}]}))
    assert out == {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "none"}
    assert to_gemini(request_of(body)) == out


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ],
)
def test_meaning_changing_parameters_are_refused(patch: dict[str, Any], param: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **patch}
    with pytest.raises(InvalidRequest) as caught:
        to_gemini(request_of(body))
    assert caught.value.status == 400
    assert caught.value.param == param
    assert f"'{param}'" in caught.value.message and "gemini" in caught.value.message


@pytest.mark.parametrize(
    "patch",
    [
        {"logprobs": False},
        {"logit_bias": {}},
        {"modalities": ["text"]},
        {"user": "u", "parallel_tool_calls": True, "store": False, "metadata": {"a": "b"}},
        {"prediction": {"type": "content", "content": "x"}},
    ],
)
def test_harmless_parameters_are_ignored(patch: dict[str, Any]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **patch}
    assert to_gemini(request_of(body)) == {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    ],
                }
            ],
            "messages[0].content[1].image_url.url",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png,xx"}}],
                }
            ],
            "messages[0].content[0].image_url.url",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_2", "content": "r"},
            ],
            "messages[2].tool_call_id",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "call_1", "content": "r"},
                {"role": "assistant", "tool_calls": [CALL]},
            ],
            "messages[1].tool_call_id",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}],
            "messages[1].tool_call_id",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{oops"}}],
                },
            ],
            "messages[1].tool_calls[0].function.arguments",
        ),
        ([{"role": "function", "content": "x", "name": "f"}], "messages[0].role"),
        ([{"role": "system", "content": "only a system prompt"}], "messages"),
        ([{"role": "user", "content": ""}], "messages"),
    ],
)
def test_invalid_messages_name_the_parameter(messages: list[Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        to_gemini(request_of({"model": "m", "messages": messages}))
    assert caught.value.status == 400
    assert caught.value.param == param


def test_http_image_urls_say_to_send_data_urls() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
            }
        ],
    }
    with pytest.raises(InvalidRequest, match="data: URLs"):
        to_gemini(request_of(body))


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ],
)
def test_invalid_options_name_the_parameter(patch: dict[str, Any], param: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **patch}
    with pytest.raises(InvalidRequest) as caught:
        to_gemini(request_of(body))
    assert caught.value.param == param


def test_tool_results_json_objects_only_are_parsed() -> None:
    def response_for(content: str) -> Any:
        body = {
            "model": "m",
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": content},
            ],
        }
        return to_gemini(request_of(body))["contents"][-1]["parts"][0]["functionResponse"][
            "response"
        ]

    assert response_for(' {"a": [1, {"b": null}]} ') == {"a": [1, {"b": None}]}
    assert response_for('{"a": 1') == {"content": '{"a": 1'}  # not JSON: text
    assert response_for('"just a string"') == {"content": '"just a string"'}
    assert response_for("42") == {"content": "42"}
    assert response_for("") == {"content": ""}


# --------------------------------------------------------------------------- ids and signatures


@pytest.mark.parametrize(
    ("call_id", "base", "signature"),
    [
        ("call_abc", "call_abc", None),
        ("fc-1", "fc-1", None),
        ("call_abc__ts__c2lnbmF0dXJlLW9uZQ-_-w", "call_abc", SIGNATURE),
        ("fc-1__ts__AAAA", "fc-1", "AAAA"),
        ("fc-1__ts__AAA", "fc-1", "AAA="),
        ("call_x__ts__bad!", "call_x__ts__bad!", None),  # not base64url: a plain id
        ("call_x__ts__AAAAA", "call_x__ts__AAAAA", None),  # 4n+1 characters: never base64
        ("call_x__ts__", "call_x__ts__", None),
        ("__ts__AAAA", "__ts__AAAA", None),
    ],
)
def test_split_call_id(call_id: str, base: str, signature: str | None) -> None:
    assert split_call_id(call_id) == (base, signature)


@given(st.binary(min_size=1, max_size=300), st.sampled_from(["call_0a1b2c", "fc-1", "abc_"]))
@settings(derandomize=True, database=None, max_examples=300)
def test_any_signature_round_trips_through_the_id(raw: bytes, base: str) -> None:
    signature = base64.b64encode(raw).decode()
    call_id = join_call_id(base, signature)
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in call_id)
    assert split_call_id(call_id) == (base, signature)


def test_thought_signature_round_trip_through_an_openai_client() -> None:
    """Gemini's answer -> the OpenAI tool calls a client gets -> the next turn
    the client sends -> the functionCall parts Gemini gets back."""
    gemini_answer = load("responses", "tools")["gemini"]
    signatures = Signatures()
    body, _ = from_gemini(
        orjson.dumps(gemini_answer),
        model="g",
        created=CREATED,
        completion_id=COMPLETION_ID,
        new_call_id=minted_ids(),
        signatures=signatures,
    )
    message = orjson.loads(body)["choices"][0]["message"]
    assert all(len(call["id"]) <= 40 for call in message["tool_calls"])  # OpenAI's limit
    follow_up = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "Weather?"},
            message,
            *(
                {"role": "tool", "tool_call_id": call["id"], "content": f"result {i}"}
                for i, call in enumerate(message["tool_calls"])
            ),
        ],
    }
    contents = to_gemini(request_of(follow_up), signatures)["contents"]
    sent_back = gemini_answer["candidates"][0]["content"]["parts"]
    replayed = contents[1]["parts"]
    # Gemini gets its parts back as it wrote them (args re-encoded, `args: {}`
    # where it had none)
    assert replayed[0] == sent_back[0]
    assert replayed[1] == sent_back[1]  # the signature, byte for byte
    assert replayed[2] == sent_back[2]  # its own id fc-2
    assert replayed[3] == {"functionCall": {"name": "noop", "args": {}}}  # no minted id
    responses = [part["functionResponse"] for part in contents[2]["parts"]]
    assert responses == [
        {"name": "get_weather", "response": {"content": "result 0"}},
        {"id": "fc-2", "name": "get_time", "response": {"content": "result 1"}},
        {"name": "noop", "response": {"content": "result 2"}},
    ]


# --------------------------------------------------------------------------- random conversations


@given(conversations())
@settings(derandomize=True, database=None, max_examples=150, deadline=None)
def test_random_conversations_translate_faithfully(body: dict[str, Any]) -> None:
    try:
        out = to_gemini(request_of(body))
    except InvalidRequest as exc:
        # Only a conversation with nothing non-empty to send is refused.
        assert exc.param == "messages"
        return
    contents = out["contents"]
    assert contents and all(content["parts"] for content in contents)
    roles = [content["role"] for content in contents]
    assert all(a != b for a, b in itertools.pairwise(roles))  # merged
    parts = [part for content in contents for part in content["parts"]]
    assert all(part.get("text", "x") != "" for part in parts)
    texts = [part["text"] for content in contents for part in content["parts"] if "text" in part]
    expected_texts: list[str] = []
    for message in body["messages"]:
        if message["role"] not in ("user", "assistant"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            expected_texts.append(content)
        elif isinstance(content, list):
            expected_texts.extend(p["text"] for p in content if p["type"] == "text")
    assert texts == [t for t in expected_texts if t]
    calls = [part["functionCall"] for part in parts if "functionCall" in part]
    assert [(c["name"], c["args"]) for c in calls] == [
        (name, args) for _, name, args in tool_arguments(body)
    ]
    names = {call_id: name for call_id, name, _ in tool_arguments(body)}
    tool_messages = [m for m in body["messages"] if m["role"] == "tool"]
    responses = [part["functionResponse"] for part in parts if "functionResponse" in part]
    assert [r["name"] for r in responses] == [names[m["tool_call_id"]] for m in tool_messages]
    system = [t for t in system_texts(body) if t]
    if system:
        assert out["systemInstruction"] == {"parts": [{"text": "\n\n".join(system)}]}
    else:
        assert "systemInstruction" not in out


# =========================================================================== responses


@pytest.mark.parametrize("name", golden("responses"))
def test_response_golden(name: str) -> None:
    fixture = load("responses", name)
    body, usage = from_gemini(
        orjson.dumps(fixture["gemini"]),
        model=fixture["model"],
        created=CREATED,
        completion_id=COMPLETION_ID,
        new_call_id=minted_ids(),
    )
    assert orjson.loads(body) == fixture["openai"]
    assert usage == Usage(**fixture["usage"])


FINISH_REASONS = [
    ("STOP", "stop"),
    ("MAX_TOKENS", "length"),
    ("SAFETY", "content_filter"),
    ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"),
    ("PROHIBITED_CONTENT", "content_filter"),
    ("SPII", "content_filter"),
    ("IMAGE_SAFETY", "content_filter"),
    ("LANGUAGE", "stop"),
    ("OTHER", "stop"),
    ("MALFORMED_FUNCTION_CALL", "stop"),
    ("FINISH_REASON_UNSPECIFIED", "stop"),
    ("SOMETHING_NEW", "stop"),
]


@pytest.mark.parametrize(("gemini", "openai"), FINISH_REASONS)
def test_each_finish_reason(gemini: str, openai: str) -> None:
    answer = {
        "candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": gemini}],
    }
    body, _ = from_gemini(
        orjson.dumps(answer),
        model="g",
        created=CREATED,
        completion_id=COMPLETION_ID,
        new_call_id=minted_ids(),
    )
    assert orjson.loads(body)["choices"][0]["finish_reason"] == openai


def test_finish_reason_with_function_calls() -> None:
    assert finish_reason("STOP", True) == "tool_calls"
    assert finish_reason(None, True) == "tool_calls"
    assert finish_reason("MAX_TOKENS", True) == "length"
    assert finish_reason("SAFETY", True) == "content_filter"


def test_an_error_body_with_status_200_is_still_an_error() -> None:
    body = b'{"error": {"code": 503, "message": "busy", "status": "UNAVAILABLE"}}'
    with pytest.raises(UpstreamOverloaded):
        from_gemini(body, model="g", created=1, completion_id="c", new_call_id=minted_ids())


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"candidates": {"not": "a list"}}',
        b'{"candidates": [{"content": {"parts": [{"functionCall": {"args": {}}}]}}]}',
        b"{}",  # no candidate and no block reason: nothing to answer with
        b'{"candidates": []}',
    ],
)
def test_malformed_answers_are_502(body: bytes) -> None:
    with pytest.raises(UpstreamError) as caught:
        from_gemini(
            body, model="g", created=1, completion_id="c", new_call_id=minted_ids(), provider="gp"
        )
    assert type(caught.value) is UpstreamError and caught.value.status == 502
    assert "'gp'" in caught.value.message


# =========================================================================== streams


def transcript(name: str, newline: bytes = b"\n") -> bytes:
    data = (GOLDEN / "streams" / f"{name}.sse").read_bytes()
    return data.replace(b"\n", newline) if newline != b"\n" else data


def translator_for(fixture: dict[str, Any], include_usage: bool) -> GeminiStreamTranslator:
    return GeminiStreamTranslator(
        model=fixture["model"],
        created=CREATED,
        completion_id=COMPLETION_ID,
        include_usage=include_usage,
        new_call_id=minted_ids(),
        provider=PROVIDER,
    )


def run_stream(
    reads: list[bytes], translator: GeminiStreamTranslator
) -> tuple[list[bytes], GatewayError | None]:
    """What the translator returns for each upstream event (parsed from
    ``reads`` as TranslatedStream parses them) and for the end, and the error
    that ended the stream, if any."""
    parser = EventParser()
    sent: list[bytes] = []
    try:
        for read in reads:
            for name, data in parser.feed(read):
                sent.append(translator.feed(name, data))
        for name, data in parser.finish():
            sent.append(translator.feed(name, data))
        sent.append(translator.finish())
    except GatewayError as exc:
        return sent, exc
    return sent, None


def parse_events(out: bytes) -> list[Any]:
    """The data of each ``data: ...\\n\\n`` event, JSON decoded ([DONE] as is)."""
    assert out == b"" or out.endswith(b"\n\n")
    events = []
    for block in out.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ") and b"\n" not in block
        payload = block[6:]
        events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


def expected_chunks(fixture: dict[str, Any], include_usage: bool) -> list[Any]:
    head = {
        "id": fixture["id"],
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": fixture["chunk_model"],
    }
    out: list[Any] = []
    for item in fixture["chunks"]:
        if item == "[DONE]":
            out.append(item)
        elif isinstance(item, dict):
            if include_usage:
                out.append({**head, "choices": [], **item})
        else:
            index, delta, finish = item
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            out.append({**head, "choices": [choice]})
    return out


def check_outcome(
    fixture: dict[str, Any],
    translator: GeminiStreamTranslator,
    out: bytes,
    error: GatewayError | None,
    include_usage: bool,
) -> None:
    assert parse_events(out) == expected_chunks(fixture, include_usage)
    expected_error = fixture.get("error")
    if expected_error is None:
        assert error is None
    else:
        assert error is not None
        assert type(error).__name__ == expected_error["class"]
        assert (error.status, error.code) == (expected_error["status"], expected_error["code"])
        assert expected_error["message"] in error.message
    usage = fixture["usage"]
    assert translator.usage == (None if usage is None else Usage(**usage))
    assert translator.events == fixture["events"]


STREAMS = golden("streams", ".sse")


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("name", STREAMS)
def test_stream_golden(name: str, newline: bytes) -> None:
    fixture = load("streams", name)
    translator = translator_for(fixture, fixture["include_usage"])
    sent, error = run_stream([transcript(name, newline)], translator)
    check_outcome(fixture, translator, b"".join(sent), error, fixture["include_usage"])


@pytest.mark.parametrize("name", [n for n in STREAMS if load("streams", n)["include_usage"]])
def test_stream_without_include_usage_has_no_usage_chunk(name: str) -> None:
    fixture = load("streams", name)
    translator = translator_for(fixture, include_usage=False)
    sent, error = run_stream([transcript(name)], translator)
    check_outcome(fixture, translator, b"".join(sent), error, include_usage=False)
    assert not any(
        isinstance(event, dict) and "usage" in event for event in parse_events(b"".join(sent))
    )


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("name", STREAMS)
def test_stream_split_at_every_byte_boundary(name: str, newline: bytes) -> None:
    fixture = load("streams", name)
    include_usage = fixture["include_usage"]
    data = transcript(name, newline)
    whole, whole_error = run_stream([data], translator_for(fixture, include_usage))
    reference = b"".join(whole)
    for cut in range(1, len(data)):
        sent, error = run_stream([data[:cut], data[cut:]], translator_for(fixture, include_usage))
        assert b"".join(sent) == reference, cut
        assert repr(error) == repr(whole_error), cut
    translator = translator_for(fixture, include_usage)
    sent, error = run_stream([data[i : i + 1] for i in range(len(data))], translator)
    assert b"".join(sent) == reference
    check_outcome(fixture, translator, reference, error, include_usage)


def test_stream_output_goes_out_per_event() -> None:
    """Each upstream event is translated when it arrives, not at the end."""
    fixture = load("streams", "text")
    translator = translator_for(fixture, True)
    events = EventParser().feed(transcript("text"))
    assert len(events) == 3
    outputs = [parse_events(translator.feed(name, data)) for name, data in events]
    assert [len(out) for out in outputs] == [2, 1, 2]  # role+text, text, text+finish
    assert [chunk["choices"][0]["delta"].get("content") for chunk in outputs[0]] == ["", "Hel"]
    assert parse_events(translator.finish())[-1] == "[DONE]"


def test_stream_usage_is_the_last_report_not_a_sum() -> None:
    fixture = load("streams", "text")
    translator = translator_for(fixture, True)
    reports = []
    for name, data in EventParser().feed(transcript("text")):
        translator.feed(name, data)
        assert translator.usage is not None
        reports.append(translator.usage.completion_tokens)
    assert reports == [1, 3, 4]  # cumulative, as Gemini reports it
    assert translator.usage == Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11)
    usage_chunk = parse_events(translator.finish())[0]
    assert usage_chunk["usage"]["completion_tokens"] == 4  # not 1 + 3 + 4


def sse(*payloads: Any) -> bytes:
    return b"".join(b"data: " + orjson.dumps(p) + b"\r\n\r\n" for p in payloads)


@pytest.mark.parametrize(("gemini", "openai"), FINISH_REASONS)
def test_stream_finish_reasons(gemini: str, openai: str) -> None:
    data = sse({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": gemini}]})
    translator = translator_for({"model": "g"}, include_usage=False)
    sent, error = run_stream([data], translator)
    assert error is None
    events = parse_events(b"".join(sent))
    assert events[-2]["choices"][0]["finish_reason"] == openai
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("error", "expected", "status"),
    [
        ({"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}, UpstreamOverloaded, 503),
        ({"code": 500, "message": "boom", "status": "INTERNAL"}, UpstreamError, 502),
        ({"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}, UpstreamClientError, 400),
        ({"message": "no code", "status": "INTERNAL"}, UpstreamError, 502),
    ],
)
def test_stream_error_events(error: dict[str, Any], expected: type[Exception], status: int) -> None:
    data = sse({"candidates": [{"content": {"parts": [{"text": "x"}]}}]}, {"error": error})
    sent, raised = run_stream([data], translator_for({"model": "g"}, include_usage=True))
    assert type(raised) is expected and raised.status == status
    assert len(parse_events(b"".join(sent))) == 2  # role and "x" went out first


def test_stream_list_wrapped_error_and_garbage_events() -> None:
    error = {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}
    wrapped = b"data: " + orjson.dumps([{"error": error}]) + b"\n\n"
    _, raised = run_stream([wrapped], translator_for({"model": "g"}, True))
    assert type(raised) is UpstreamClientError and raised.status == 429
    _, raised = run_stream([b"data: {not json\n\n"], translator_for({"model": "g"}, True))
    assert type(raised) is UpstreamError and "not a Gemini" in raised.message
    _, raised = run_stream([b""], translator_for({"model": "g"}, True))
    assert type(raised) is UpstreamError and "before finishing" in raised.message


def test_stream_candidate_left_unfinished_is_an_error() -> None:
    data = sse(
        {
            "candidates": [
                {"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP"},
                {"content": {"parts": [{"text": "b"}]}, "index": 1},
            ]
        }
    )
    _, raised = run_stream([data], translator_for({"model": "g"}, False))
    assert type(raised) is UpstreamError and "before finishing" in raised.message


def test_stream_ignores_what_follows_a_finish() -> None:
    data = sse(
        {"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP"}]},
        {"candidates": [{"content": {"parts": [{"text": "late"}]}, "finishReason": "STOP"}]},
    )
    sent, raised = run_stream([data], translator_for({"model": "g"}, False))
    assert raised is None
    events = parse_events(b"".join(sent))
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
        {},
    ]


# =========================================================================== embeddings


@pytest.mark.parametrize("name", golden("embeddings"))
def test_embeddings_golden(name: str) -> None:
    fixture = load("embeddings", name)
    request = decode_embeddings(orjson.dumps(fixture["openai"]))
    assert to_gemini_embeddings(request, fixture["model"]) == fixture["gemini"]
    body, usage = from_gemini_embeddings(
        orjson.dumps(fixture["response"]),
        model=fixture["model"],
        encoding_format=request.encoding_format,
        expected=len(fixture["gemini"]["requests"]),
    )
    assert orjson.loads(body) == fixture["expected"]
    assert usage == Usage(**fixture["usage"])


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"input": [1, 2, 3]}, "input"),
        ({"input": [[1, 2], [3]]}, "input"),
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_embeddings_refusals(patch: dict[str, Any], param: str) -> None:
    request = decode_embeddings(orjson.dumps({"model": "m", **patch}))
    with pytest.raises(InvalidRequest) as caught:
        to_gemini_embeddings(request, "gemini-embedding-001")
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize(
    ("body", "expected"),
    [(b"nope", None), (b'{"embeddings": [{"values": "x"}]}', None), (b'{"embeddings": []}', 1)],
)
def test_malformed_embeddings_are_502(body: bytes, expected: int | None) -> None:
    with pytest.raises(UpstreamError) as caught:
        from_gemini_embeddings(body, model="m", encoding_format=None, expected=expected)
    assert caught.value.status == 502


# =========================================================================== errors


def google(status: int, name: str, message: str, **extra: Any) -> bytes:
    return orjson.dumps({"error": {"code": status, "message": message, "status": name, **extra}})


API_KEY_INVALID = google(
    400,
    "INVALID_ARGUMENT",
    "API key not valid. Please pass a valid API key.",
    details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
)


@pytest.mark.parametrize(
    ("status", "body", "error", "wire_status", "code"),
    [
        (400, google(400, "INVALID_ARGUMENT", "bad request"), UpstreamClientError, 400, None),
        (
            400,
            google(400, "FAILED_PRECONDITION", "User location is not supported for the API use."),
            UpstreamClientError,
            400,
            None,
        ),
        (400, API_KEY_INVALID, UpstreamAuthError, 502, "upstream_auth_error"),
        (
            400,
            google(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key."),
            UpstreamAuthError,
            502,
            "upstream_auth_error",
        ),
        (401, google(401, "UNAUTHENTICATED", "no"), UpstreamAuthError, 502, "upstream_auth_error"),
        (
            403,
            google(403, "PERMISSION_DENIED", "no"),
            UpstreamAuthError,
            502,
            "upstream_auth_error",
        ),
        (
            404,
            google(404, "NOT_FOUND", "models/gemini-9 is not found for API version v1beta"),
            UpstreamClientError,
            404,
            "model_not_found",
        ),
        (
            404,
            google(404, "NOT_FOUND", "Requested entity was not found."),
            UpstreamClientError,
            404,
            None,
        ),
        (
            429,
            google(429, "RESOURCE_EXHAUSTED", "quota"),
            UpstreamClientError,
            429,
            "rate_limit_exceeded",
        ),
        (500, google(500, "INTERNAL", "oops"), UpstreamError, 502, "upstream_error"),
        (
            503,
            google(503, "UNAVAILABLE", "The model is overloaded."),
            UpstreamOverloaded,
            503,
            "upstream_overloaded",
        ),
        (504, google(504, "DEADLINE_EXCEEDED", "slow"), UpstreamError, 502, "upstream_error"),
        (
            400,
            b"[" + google(400, "INVALID_ARGUMENT", "wrapped in a list") + b"]",
            UpstreamClientError,
            400,
            None,
        ),
        (400, b"plain text failure", UpstreamClientError, 400, None),
        (502, b"<html>Bad Gateway</html>", UpstreamError, 502, "upstream_error"),
        (500, b"", UpstreamError, 502, "upstream_error"),
        (503, b"", UpstreamOverloaded, 503, "upstream_overloaded"),
    ],
)
def test_error_mapping(
    status: int, body: bytes, error: type[GatewayError], wire_status: int, code: str | None
) -> None:
    mapped = gemini_error("gp", status, body, "7")
    assert type(mapped) is error
    assert (mapped.status, mapped.code) == (wire_status, code)
    wire = orjson.loads(mapped.body())
    assert set(wire["error"]) >= {"message", "type", "param", "code"}
    if wire_status == 429 or error is UpstreamOverloaded:
        assert dict(mapped.headers())[b"retry-after"] == b"7"
    if error is UpstreamClientError:
        assert wire["error"]["type"] in ("invalid_request_error", "rate_limit_exceeded")


def test_error_messages_keep_googles_text() -> None:
    mapped = gemini_error("gp", 400, b'[{"error":{"code":400,"message":"wrapped"}}]', None)
    assert mapped.message == "wrapped"
    assert gemini_error("gp", 400, b"plain text failure", None).message == "plain text failure"
    assert "API key not valid" in gemini_error("gp", 400, API_KEY_INVALID, None).message


# =========================================================================== urls


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("", "https://generativelanguage.googleapis.com/v1beta"),
        (
            "https://generativelanguage.googleapis.com",
            "https://generativelanguage.googleapis.com/v1beta",
        ),
        ("https://proxy.example/v1beta/", "https://proxy.example/v1beta"),
        ("http://127.0.0.1:9/google/", "http://127.0.0.1:9/google/v1beta"),
    ],
)
def test_api_base(base_url: str, expected: str) -> None:
    assert api_base(base_url) == expected


@pytest.mark.parametrize(
    ("model", "path"),
    [
        ("gemini-2.5-flash", "models/gemini-2.5-flash"),
        ("models/gemini-2.5-flash", "models/gemini-2.5-flash"),
        ("tunedModels/my-model-1", "tunedModels/my-model-1"),
        ("odd name/../x?key=1", "models/odd%20name%2F..%2Fx%3Fkey%3D1"),
    ],
)
def test_model_path(model: str, path: str) -> None:
    assert model_path(model) == path


def test_provider_urls_and_headers_hold_no_secret_in_the_url() -> None:
    provider = GeminiProvider(
        ProviderConfig(name="g", type="gemini", base_url="https://x.example/v1beta", api_key=KEY)
    )
    assert provider.url("models/gemini-2.5-flash", "streamGenerateContent?alt=sse") == (
        "https://x.example/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    )
    assert KEY not in provider.url("gemini-2.5-flash", "generateContent")
    assert KEY not in repr(provider.config)


# =========================================================================== against the mock


@pytest.fixture(scope="module")
def gemini() -> Iterator[MockGemini]:
    with running_gemini(api_key=KEY) as mock:
        yield mock


_chat_request = msgspec.json.Decoder(ChatRequest)
_embeddings_request = msgspec.json.Decoder(EmbeddingsRequest)


def chat_call(model: str, body: dict[str, Any]) -> ChatCall:
    raw = orjson.dumps({"model": "alias", **body})
    return ChatCall(
        body=raw,
        request=_chat_request.decode(raw),
        alias="alias",
        target=Target(provider="g", model=model),
        request_id="rid",
    )


# One store for the providers of these tests: a tool conversation's turns are
# made by different provider instances here, as by one worker in Gandalf.
SIGNATURES = Signatures()


def provider_for(
    base_url: str, api_key: str = KEY, signatures: Signatures = SIGNATURES
) -> GeminiProvider:
    return GeminiProvider(
        ProviderConfig(
            name="g", type="gemini", base_url=base_url, api_key=api_key, timeout_ms=5000
        ),
        signatures,
    )


async def _collect(stream: AsyncIterator[bytes]) -> bytes:
    out = b""
    async for piece in stream:
        out += piece
    return out


Outcome = tuple[Any, GatewayError | None]


def run_chat(
    base_url: str,
    call: ChatCall,
    *,
    stream: bool = False,
    key: str = KEY,
    signatures: Signatures = SIGNATURES,
) -> Outcome:
    """(the answer: a parsed body or the list of stream events, the error)."""

    async def main() -> Outcome:
        provider = provider_for(base_url, key, signatures)
        await provider.start()
        out = b""
        try:
            if not stream:
                reply = await provider.chat(call)
                return (orjson.loads(reply.body), reply.usage), None
            translated = await provider.stream(call)
            async for piece in translated:
                out += piece
            return (parse_events(out), translated.usage), None
        except GatewayError as exc:
            return (parse_events(out), None), exc
        finally:
            await provider.close()

    return asyncio.run(main())


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def test_chat_sends_the_provider_key_in_a_header_only(gemini: MockGemini) -> None:
    gemini.clear()
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"},
        ],
        "temperature": 0.2,
    }
    (answer, usage), error = run_chat(gemini.base_url, chat_call("gemini-ok", body))
    assert error is None
    assert answer["choices"][0]["message"]["content"] == "hello there"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["model"] == "gemini-ok" and answer["id"] == "mock-response-id"
    seen = gemini.received[-1]
    assert seen.path == "/v1beta/models/gemini-ok:generateContent"
    assert seen.query == {}
    assert KEY not in seen.raw_path
    assert seen.headers["x-goog-api-key"] == KEY
    assert "Authorization" not in seen.headers
    assert seen.json() == to_gemini(decode_chat(orjson.dumps({"model": "m", **body})))
    assert usage.completion_tokens == 2 and usage.prompt_tokens > 0
    assert answer["usage"]["total_tokens"] == usage.total_tokens


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_chunks_and_cumulative_usage(gemini: MockGemini, include_usage: bool) -> None:
    gemini.clear()
    text = "one two three four five"
    body = user(text, stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    (events, usage), error = run_chat(gemini.base_url, chat_call("gemini-ok", body), stream=True)
    assert error is None
    seen = gemini.received[-1]
    assert seen.path == "/v1beta/models/gemini-ok:streamGenerateContent"
    assert seen.query == {"alt": "sse"}
    assert seen.headers["x-goog-api-key"] == KEY
    deltas = [e["choices"][0]["delta"] for e in events if e != "[DONE]" and e["choices"]]
    assert "".join(d.get("content", "") for d in deltas) == text
    assert len(deltas) == 1 + 5 + 1  # role, a chunk per word, finish
    assert events[-1] == "[DONE]"
    # The mock reports 1, 2, ... 5 completion tokens cumulatively: the last wins.
    assert usage is not None and usage.completion_tokens == 5
    usage_events = [e for e in events if e != "[DONE]" and "usage" in e]
    if include_usage:
        assert [e["usage"]["completion_tokens"] for e in usage_events] == [5]
    else:
        assert usage_events == []


def test_n_candidates(gemini: MockGemini) -> None:
    (answer, _), error = run_chat(gemini.base_url, chat_call("gemini-ok", user("hi you", n=2)))
    assert error is None
    assert [c["message"]["content"] for c in answer["choices"]] == ["hi you", "[1] hi you"]
    assert gemini.received[-1].json()["generationConfig"] == {"candidateCount": 2}


def tool_turn(message: dict[str, Any], *, drop_signature: bool = False) -> dict[str, Any]:
    calls = message["tool_calls"]
    if drop_signature:  # ids Gandalf never gave out
        calls = [{**c, "id": f"call_other_{i}"} for i, c in enumerate(calls)]
        message = {**message, "tool_calls": calls}
    return {
        "messages": [
            {"role": "user", "content": "weather and time?"},
            message,
            *(
                {
                    "role": "tool",
                    "tool_call_id": c["id"],
                    "content": orjson.dumps({"n": i}).decode(),
                }
                for i, c in enumerate(calls)
            ),
        ],
        "tools": [
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "function", "function": {"name": "get_time"}},
        ],
    }


RESULTS = 'results: {"get_time":{"n":1},"get_weather":{"n":0}}'


@pytest.mark.parametrize("model", ["gemini-tools", "gemini-tools-ids"])
def test_tool_calls_round_trip_with_their_signature(gemini: MockGemini, model: str) -> None:
    first = chat_call(model, user("weather and time?"))
    (answer, _), error = run_chat(gemini.base_url, first)
    assert error is None
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    calls = message["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "Europe/Paris"}),
    ]
    # Ids OpenAI and Azure accept (40 characters at most); the signature stays here.
    assert all(len(c["id"]) <= 40 for c in calls)
    assert calls[0]["id"].startswith("call_s") and SIGNATURE not in json.dumps(calls)
    if model == "gemini-tools-ids":
        assert calls[1]["id"] == "fc-2"  # Gemini's own id, as it sent it
    # The client sends the calls back as it got them: the mock checks the signature.
    (second, _), error = run_chat(gemini.base_url, chat_call(model, tool_turn(message)))
    assert error is None, error
    assert second["choices"][0]["message"]["content"] == RESULTS


def test_streamed_tool_calls_round_trip(gemini: MockGemini) -> None:
    call = chat_call("gemini-tools", user("weather and time?", stream=True))
    (events, usage), error = run_chat(gemini.base_url, call, stream=True)
    assert error is None
    tool_deltas = [t for e in events[:-1] for t in e["choices"][0]["delta"].get("tool_calls") or ()]
    starts = [t for t in tool_deltas if "id" in t]
    assert [t["index"] for t in starts] == [0, 1]
    arguments = {t["index"]: t["function"]["arguments"] for t in tool_deltas if "id" not in t}
    assert arguments == {0: '{"city":"Paris"}', 1: '{"tz":"Europe/Paris"}'}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert usage is not None and usage.completion_tokens == 20  # the last report
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": t["id"],
                "type": "function",
                "function": {"name": t["function"]["name"], "arguments": arguments[t["index"]]},
            }
            for t in starts
        ],
    }
    (second, _), error = run_chat(
        gemini.base_url,
        chat_call("gemini-tools", {**tool_turn(message), "stream": True}),
        stream=True,
    )
    assert error is None, error
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in second[:-1]) == RESULTS


def test_a_signature_this_worker_lost_is_geminis_placeholder(gemini: MockGemini) -> None:
    """The next turn lands where the signature is not kept (another worker):
    Gemini gets its documented placeholder and answers."""
    (answer, _), _ = run_chat(gemini.base_url, chat_call("gemini-tools", user("w?")))
    turn = tool_turn(answer["choices"][0]["message"])
    (second, _), error = run_chat(
        gemini.base_url, chat_call("gemini-tools", turn), signatures=Signatures()
    )
    assert error is None, error
    assert second["choices"][0]["message"]["content"] == RESULTS
    calls = [p for p in gemini.received[-1].json()["contents"][1]["parts"] if "functionCall" in p]
    assert calls[0]["thoughtSignature"] == SKIP_SIGNATURE


def test_a_call_gemini_never_signed_is_geminis_400(gemini: MockGemini) -> None:
    """A tool call id Gandalf never gave out (another provider's) has no
    signature to send: Gemini 3 refuses it, and the client hears so."""
    (answer, _), _ = run_chat(gemini.base_url, chat_call("gemini-tools", user("w?")))
    turn = tool_turn(answer["choices"][0]["message"], drop_signature=True)
    _, error = run_chat(gemini.base_url, chat_call("gemini-tools", turn))
    assert type(error) is UpstreamClientError and error.status == 400
    assert "thought_signature" in error.message


def test_json_mode(gemini: MockGemini) -> None:
    body = user("hi", response_format={"type": "json_object"})
    (answer, _), error = run_chat(gemini.base_url, chat_call("gemini-json", body))
    assert error is None
    assert json.loads(answer["choices"][0]["message"]["content"]) == {"echo": "hi"}
    _, error = run_chat(gemini.base_url, chat_call("gemini-json", user("hi")))
    assert type(error) is UpstreamClientError and error.status == 400


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_blocked_safety_length(gemini: MockGemini, stream: bool) -> None:
    def final(model: str) -> tuple[str, str, Usage]:
        (answer, usage), error = run_chat(
            gemini.base_url, chat_call(model, user("a b c", stream=stream)), stream=stream
        )
        assert error is None
        if stream:
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in answer[:-1])
            return text, answer[-2]["choices"][0]["finish_reason"], usage
        choice = answer["choices"][0]
        return choice["message"]["content"], choice["finish_reason"], usage

    text, reason, usage = final("gemini-thinking")
    assert (text, reason) == ("a b c", "stop")  # the thought part is not shown
    assert usage.completion_tokens == 3 + 5  # words + thoughts
    assert final("gemini-blocked")[:2] == ("", "content_filter")
    assert final("gemini-safety")[:2] == ("a ", "content_filter")
    assert final("gemini-length")[:2] == ("a ", "length")


def test_stream_error_event_after_chunks(gemini: MockGemini) -> None:
    call = chat_call("gemini-stream-error", user("one two three", stream=True))
    (events, _), error = run_chat(gemini.base_url, call, stream=True)
    assert type(error) is UpstreamError and "mock internal error" in error.message
    # What came before the error event went out, unless it shared the error's
    # read (TranslatedStream yields per read): a prefix of it, never more.
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "one "}][: len(deltas)]


def test_stream_cut_before_finishing(gemini: MockGemini) -> None:
    call = chat_call("gemini-stream-cut", user("one two", stream=True))
    (events, _), error = run_chat(gemini.base_url, call, stream=True)
    assert type(error) is UpstreamError and "before finishing" in error.message
    assert "[DONE]" not in events


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "error", "status"),
    [
        ("gemini-status-400", UpstreamClientError, 400),
        ("gemini-status-401", UpstreamAuthError, 502),
        ("gemini-status-403", UpstreamAuthError, 502),
        ("gemini-status-404", UpstreamClientError, 404),
        ("gemini-status-429", UpstreamClientError, 429),
        ("gemini-status-500", UpstreamError, 502),
        ("gemini-status-503", UpstreamOverloaded, 503),
        ("gemini-badkey", UpstreamAuthError, 502),
        ("gemini-unavailable", UpstreamOverloaded, 503),
    ],
)
def test_upstream_errors_map(
    gemini: MockGemini, model: str, error: type[GatewayError], status: int, stream: bool
) -> None:
    _, raised = run_chat(gemini.base_url, chat_call(model, user("x", stream=stream)), stream=stream)
    assert type(raised) is error and raised.status == status
    assert KEY not in raised.body().decode()
    if model == "gemini-status-404":
        assert raised.code == "model_not_found"
    if model == "gemini-status-429":
        assert dict(raised.headers())[b"retry-after"] == b"7"


def test_a_wrong_provider_key_is_an_auth_error(gemini: MockGemini) -> None:
    _, raised = run_chat(gemini.base_url, chat_call("gemini-ok", user("x")), key="wrong")
    assert type(raised) is UpstreamAuthError and raised.status == 502
    assert gemini.received[-1].headers["x-goog-api-key"] == "wrong"


def test_base_url_with_v1beta_and_prefixed_models(gemini: MockGemini) -> None:
    gemini.clear()
    call = chat_call("models/gemini-ok", user("hi"))
    (answer, _), error = run_chat(gemini.base_url + "/v1beta/", call)
    assert error is None and answer["choices"][0]["message"]["content"] == "hi"
    assert gemini.received[-1].path == "/v1beta/models/gemini-ok:generateContent"


def test_connection_refused_is_502() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, raised = run_chat(f"http://127.0.0.1:{port}", chat_call("gemini-ok", user("x")))
    assert type(raised) is UpstreamError and "unreachable" in raised.message


def embeddings_call(model: str, body: dict[str, Any]) -> EmbeddingsCall:
    raw = orjson.dumps({"model": "alias", **body})
    return EmbeddingsCall(
        body=raw,
        request=_embeddings_request.decode(raw),
        alias="alias",
        target=Target(provider="g", model=model),
        request_id="rid",
    )


def run_embeddings(base_url: str, call: EmbeddingsCall) -> Outcome:
    async def main() -> Outcome:
        provider = provider_for(base_url)
        await provider.start()
        try:
            reply = await provider.embeddings(call)
            return (orjson.loads(reply.body), reply.usage), None
        except GatewayError as exc:
            return None, exc
        finally:
            await provider.close()

    return asyncio.run(main())


def test_embeddings_float_and_base64(gemini: MockGemini) -> None:
    gemini.clear()
    call = embeddings_call("gemini-embedding-001", {"input": ["hello", "hi"], "dimensions": 4})
    (answer, usage), error = run_embeddings(gemini.base_url, call)
    assert error is None
    assert [d["embedding"] for d in answer["data"]] == [
        mock_vector("hello", 4),
        mock_vector("hi", 4),
    ]
    assert answer["model"] == "gemini-embedding-001"
    assert usage == Usage() and answer["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    seen = gemini.received[-1]
    assert seen.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert seen.headers["x-goog-api-key"] == KEY and seen.query == {}
    call = embeddings_call("gemini-embedding-001", {"input": "hello", "encoding_format": "base64"})
    (answer, _), error = run_embeddings(gemini.base_url, call)
    assert error is None
    raw = base64.b64decode(answer["data"][0]["embedding"])
    assert list(memoryview(raw).cast("f")) == mock_vector("hello", 8)


def test_embeddings_errors(gemini: MockGemini) -> None:
    _, raised = run_embeddings(
        gemini.base_url, embeddings_call("gemini-status-429", {"input": "x"})
    )
    assert type(raised) is UpstreamClientError and raised.status == 429
    _, raised = run_embeddings(
        gemini.base_url, embeddings_call("gemini-embedding-001", {"input": [1, 2]})
    )
    assert type(raised) is InvalidRequest and raised.param == "input"


def test_the_mock_refuses_calls_without_a_key(gemini: MockGemini) -> None:
    _, raised = run_chat(gemini.base_url, chat_call("gemini-ok", user("x")), key="")
    assert type(raised) is UpstreamAuthError
    assert "x-goog-api-key" not in gemini.received[-1].headers
