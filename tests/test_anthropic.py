"""The anthropic adapter: golden translations, the stream state machine, error
mapping, and the provider against a local mock Messages API.

Golden fixtures (tests/golden/anthropic/) are hand-written expectations:

- ``requests/*.json``: an OpenAI request, the provider's default
  ``max_tokens`` and target model -> the exact Anthropic body;
- ``responses/*.json``: an Anthropic message -> the exact OpenAI completion
  and the recorded usage;
- ``streams/*.json``: a ``.sse`` transcript of Anthropic events -> the OpenAI
  chunks (each ``data:`` line parsed) and, for broken streams, the error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from gandalf import errors
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
    UpstreamTimeout,
)
from gandalf.provider._openai_chat import decode_chat
from gandalf.provider.anthropic import (
    ANTHROPIC_VERSION,
    DEFAULT_MAX_TOKENS,
    AnthropicProvider,
    AnthropicStreamTranslator,
    anthropic_error,
    finish_reason,
    from_anthropic,
    messages_url,
    response_tool_name,
    to_anthropic,
)
from gandalf.provider.sse import EventParser
from tests.mock_anthropic import TOOL_CALLS, MockAnthropic, mock_usage, running_anthropic

GOLDEN = Path(__file__).parent / "golden" / "anthropic"
REQUESTS = sorted((GOLDEN / "requests").glob("*.json"))
RESPONSES = sorted((GOLDEN / "responses").glob("*.json"))
STREAMS = sorted((GOLDEN / "streams").glob("*.json"))
TRANSCRIPTS = sorted((GOLDEN / "streams").glob("*.sse"))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return data


def request_of(payload: dict[str, Any]) -> Any:
    return decode_chat(orjson.dumps(payload))


def ids(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


# --------------------------------------------------------------------------- golden requests


@pytest.mark.parametrize("path", REQUESTS, ids=ids(REQUESTS))
def test_request_golden(path: Path) -> None:
    case = load(path)
    request = request_of(case["openai"])
    body = to_anthropic(request, case["model"], max_tokens=case["max_tokens"])
    # Through JSON, as the provider sends it.
    assert orjson.loads(orjson.dumps(body)) == case["anthropic"]
    assert response_tool_name(request) == case.get("response_tool")


def test_golden_fixtures_cover_the_brief() -> None:
    assert len(REQUESTS) >= 15 and len(RESPONSES) >= 12 and len(STREAMS) >= 9


# --------------------------------------------------------------------------- golden responses


@pytest.mark.parametrize("path", RESPONSES, ids=ids(RESPONSES))
def test_response_golden(path: Path) -> None:
    case = load(path)
    body, usage = from_anthropic(
        orjson.dumps(case["anthropic"]),
        created=case["created"],
        response_tool=case["response_tool"],
    )
    assert orjson.loads(body) == case["openai"]
    # Counts a golden does not name are 0.
    assert msgspec.structs.asdict(usage) == msgspec.structs.asdict(Usage(**case["usage"]))


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"id":"msg_1"}', b'{"id":"m","model":"x","content":"no","usage":{}}'],
)
def test_a_body_that_is_not_a_message_is_502(body: bytes) -> None:
    with pytest.raises(UpstreamError) as caught:
        from_anthropic(body, created=1, response_tool=None)
    assert type(caught.value) is UpstreamError and caught.value.status == 502


# --------------------------------------------------------------------------- golden streams


def translate(
    transcript: bytes, case: dict[str, Any], reads: list[bytes] | None = None
) -> tuple[list[bytes], GatewayError | None, AnthropicStreamTranslator]:
    """Run ``transcript`` (cut into ``reads``, else one read) through the
    parser and translator as TranslatedStream does: the output of each event
    separately, then the error that stopped it (if any)."""
    translator = AnthropicStreamTranslator(
        "claude",
        created=case["created"],
        include_usage=case["include_usage"],
        response_tool=case["response_tool"],
    )
    parser = EventParser()
    outputs: list[bytes] = []
    try:
        for read in reads if reads is not None else [transcript]:
            for name, data in parser.feed(read):
                outputs.append(translator.feed(name, data))
        for name, data in parser.finish():
            outputs.append(translator.feed(name, data))
        outputs.append(translator.finish())
    except GatewayError as exc:
        return outputs, exc, translator
    return outputs, None, translator


def chunks_of(output: bytes) -> list[Any]:
    """Each ``data:`` payload parsed (``[DONE]`` kept as the string)."""
    assert output == b"" or output.endswith(b"\n\n")
    out: list[Any] = []
    for line in output.split(b"\n"):
        if not line:
            continue
        assert line.startswith(b"data: ")
        payload = line[6:]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


@pytest.mark.parametrize("path", STREAMS, ids=ids(STREAMS))
def test_stream_golden(path: Path) -> None:
    case = load(path)
    transcript = (path.parent / case["transcript"]).read_bytes()
    outputs, error, translator = translate(transcript, case)
    assert chunks_of(b"".join(outputs)) == case["chunks"]
    expected_error = case.get("error")
    if expected_error is None:
        assert error is None
    else:
        assert error is not None
        assert type(error).__name__ == expected_error["class"]
        assert error.status == expected_error["status"]
        assert expected_error["message_contains"] in error.message
        assert "'claude'" in error.message  # names the provider
    usage = translator.usage
    if case["usage"] is None:
        assert usage is None
    else:
        assert usage is not None
        assert msgspec.structs.asdict(usage) == msgspec.structs.asdict(Usage(**case["usage"]))
    assert translator.events == case["events"]


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=ids(TRANSCRIPTS))
def test_stream_output_does_not_depend_on_how_reads_are_cut(path: Path) -> None:
    transcript = path.read_bytes()
    case = {"created": 1, "include_usage": True, "response_tool": None}
    whole, whole_error, _ = translate(transcript, case)
    expected = b"".join(whole)

    def same(reads: list[bytes]) -> None:
        outputs, error, _ = translate(transcript, case, reads)
        assert b"".join(outputs) == expected
        assert (type(error), getattr(error, "message", None)) == (
            type(whole_error),
            getattr(whole_error, "message", None),
        )

    for cut in range(len(transcript) + 1):
        same([transcript[:cut], transcript[cut:]])
    same([transcript[i : i + 1] for i in range(len(transcript))])


def test_each_event_is_translated_as_it_arrives() -> None:
    """No buffering: each event's chunks come out of the feed of that event."""
    transcript = (GOLDEN / "streams" / "tools.sse").read_bytes()
    translator = AnthropicStreamTranslator("claude", created=1, include_usage=False)
    counts = [
        out.count(b"data: ")
        for out in (translator.feed(n, d) for n, d in EventParser().feed(transcript))
    ]
    # message_start, text block (start, 2 deltas, stop), tool 0 (start, empty
    # fragment, fragment, ping, 3 fragments, stop), text block with its text
    # in the start (start, stop), tool 1 (start, 2 fragments, stop),
    # 2 message_delta, message_stop (finish and [DONE]).
    assert counts == [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 0, 2]


def test_tool_fragments_concatenate_to_the_full_arguments() -> None:
    transcript = (GOLDEN / "streams" / "tools.sse").read_bytes()
    case = {"created": 1, "include_usage": False, "response_tool": None}
    outputs, error, _ = translate(transcript, case)
    assert error is None
    calls: dict[int, dict[str, str]] = {}
    content = ""
    for chunk in chunks_of(b"".join(outputs)):
        if chunk == "[DONE]":
            continue
        delta = chunk["choices"][0]["delta"]
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.get("id", "")
            entry["name"] += call["function"].get("name", "")
            entry["arguments"] += call["function"]["arguments"]
    assert content == "I'll look up both. And the time:"
    assert calls[0]["id"] == "toolu_01Weather" and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert calls[1]["id"] == "toolu_01Time" and calls[1]["name"] == "get_time"
    assert json.loads(calls[1]["arguments"]) == {"timezone": "Europe/Paris"}


def synthetic_stream(stop_reason: str, *, tool: str | None = None) -> bytes:
    """A minimal transcript ending with ``stop_reason``, with one tool_use of
    ``tool`` (else one text block)."""
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {"id": "msg_s", "model": "m", "usage": {"input_tokens": 3}},
        }
    ]
    if tool is None:
        block: dict[str, Any] = {"type": "text", "text": ""}
        delta: dict[str, Any] = {"type": "text_delta", "text": "x"}
    else:
        block = {"type": "tool_use", "id": "toolu_s", "name": tool, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": '{"a": 1}'}
    events += [
        {"type": "content_block_start", "index": 0, "content_block": block},
        {"type": "content_block_delta", "index": 0, "delta": delta},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason},
            "usage": {"output_tokens": 2},
        },
        {"type": "message_stop"},
    ]
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


@pytest.mark.parametrize(
    ("stop_reason", "tool", "expected"),
    [
        ("end_turn", None, "stop"),
        ("stop_sequence", None, "stop"),
        ("pause_turn", None, "stop"),
        ("max_tokens", None, "length"),
        ("model_context_window_exceeded", None, "length"),
        ("refusal", None, "content_filter"),
        ("tool_use", "get_weather", "tool_calls"),
        ("tool_use", "json_response", "stop"),
        ("max_tokens", "get_weather", "length"),
        ("a_future_reason", None, "stop"),
    ],
)
def test_finish_reasons_match_streamed_and_not(
    stop_reason: str, tool: str | None, expected: str
) -> None:
    case = {"created": 1, "include_usage": False, "response_tool": "json_response"}
    outputs, error, _ = translate(synthetic_stream(stop_reason, tool=tool), case)
    assert error is None
    chunks = chunks_of(b"".join(outputs))
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"][0]["finish_reason"] == expected
    content: list[dict[str, Any]] = (
        [{"type": "text", "text": "x"}]
        if tool is None
        else [{"type": "tool_use", "id": "t", "name": tool, "input": {"a": 1}}]
    )
    message = {
        "id": "msg_n",
        "model": "m",
        "content": content,
        "stop_reason": stop_reason,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    body, _ = from_anthropic(orjson.dumps(message), created=1, response_tool="json_response")
    assert orjson.loads(body)["choices"][0]["finish_reason"] == expected
    assert finish_reason(None, tool_calls=0) == "stop"


def test_stream_protocol_violations_are_502() -> None:
    translator = AnthropicStreamTranslator("claude", created=1, include_usage=False)
    delta = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}'
    with pytest.raises(UpstreamError, match="before message_start"):
        translator.feed(b"content_block_delta", delta)
    with pytest.raises(UpstreamError, match="malformed 'message_start'"):
        translator.feed(b"message_start", b"{not json")
    with pytest.raises(UpstreamError, match="malformed 'content_block_delta'"):
        translator.feed(b"content_block_delta", b'{"type":"content_block_delta"}')
    with pytest.raises(UpstreamError, match="before message_stop"):
        translator.finish()


def test_events_without_an_event_line_are_read_by_their_type() -> None:
    translator = AnthropicStreamTranslator("claude", created=5, include_usage=False)
    start = b'{"type":"message_start","message":{"id":"m1","model":"c","usage":{}}}'
    assert b'"role":"assistant"' in translator.feed(b"", start)
    assert translator.feed(b"", b'{"type":"ping"}') == b""
    assert translator.feed(b"", b'{"no_type":true}') == b""
    assert translator.feed(b"", b'{"type":"message_stop"}').endswith(b"data: [DONE]\n\n")
    assert translator.finish() == b""
    assert translator.feed(b"message_start", start) == b""  # nothing after the end
    assert translator.usage == Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)


def test_error_event_with_unexpected_type_is_502_with_its_message() -> None:
    translator = AnthropicStreamTranslator("claude", created=1, include_usage=False)
    error = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'
    with pytest.raises(UpstreamError) as caught:
        translator.feed(b"error", error)
    assert type(caught.value) is UpstreamError and "slow down" in caught.value.message


# --------------------------------------------------------------------------- request refusals

BASE: dict[str, Any] = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ],
)
def test_meaning_changing_parameters_are_refused(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        to_anthropic(request_of({**BASE, **extra}), "claude", max_tokens=10)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert f"'{param}'" in caught.value.message and "anthropic" in caught.value.message


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def calling(arguments: str) -> dict[str, Any]:
    """An assistant message with one call of ``f``."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return {"role": "assistant", "tool_calls": [call]}


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        (
            [user("a"), calling("{}"), {"role": "tool", "content": "r"}],
            {},
            "messages[2].tool_call_id",
        ),
        ([{"role": "system", "content": [image("https://x/y.png")]}], {}, "messages[0].content[0]"),
        (
            [user([{"type": "text", "text": "a"}, image("ftp://x/y.png")])],
            {},
            "messages[0].content[1].image_url.url",
        ),
        ([user([image("data:image/png;base64,@@@")])], {}, "messages[0].content[0].image_url.url"),
        (
            [user("a"), {"role": "assistant", "content": [image("https://x/y.png")]}],
            {},
            "messages[1].content[0]",
        ),
        ([user("a"), calling("{bad")], {}, "messages[1].tool_calls[0].function.arguments"),
        ([{"role": "function", "content": "x"}], {}, "messages[0].role"),
        ([user("a")], {"tool_choice": "required"}, "tool_choice"),
        (
            [user("a")],
            {"tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
        ),
        (
            [user("a")],
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "sometimes",
            },
            "tool_choice",
        ),
        ([user("a")], {"tools": [{"type": "custom", "function": {"name": "f"}}]}, "tools[0].type"),
        ([user("a")], {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ([user("a")], {"response_format": {"type": "yaml"}}, "response_format.type"),
        (
            [user("a")],
            {
                "tools": [{"type": "function", "function": {"name": "json_response"}}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
    ],
)
def test_untranslatable_requests_are_400_naming_the_field(
    messages: list[dict[str, Any]], extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        to_anthropic(request_of({"model": "a", "messages": messages, **extra}), "c", max_tokens=9)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_auto_or_none_tool_choice_without_tools_is_dropped() -> None:
    for extra in ({"tool_choice": "auto"}, {"tool_choice": "none"}, {"parallel_tool_calls": False}):
        body = to_anthropic(request_of({**BASE, **extra}), "c", max_tokens=9)
        assert "tool_choice" not in body and "tools" not in body


# --------------------------------------------------------------------------- error statuses


def anthropic_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


@pytest.mark.parametrize(
    ("status", "body", "retry_after", "error", "wire_status", "wire_type", "wire_code"),
    [
        (
            400,
            anthropic_body("invalid_request_error", "messages: bad"),
            None,
            UpstreamClientError,
            400,
            "invalid_request_error",
            None,
        ),
        (
            401,
            anthropic_body("authentication_error", "invalid x-api-key"),
            None,
            UpstreamAuthError,
            502,
            "upstream_error",
            "upstream_auth_error",
        ),
        (
            403,
            anthropic_body("permission_error", "no"),
            None,
            UpstreamAuthError,
            502,
            "upstream_error",
            "upstream_auth_error",
        ),
        (
            404,
            anthropic_body("not_found_error", "model: claude-nope"),
            None,
            UpstreamClientError,
            404,
            "invalid_request_error",
            "model_not_found",
        ),
        (
            404,
            anthropic_body("not_found_error", "Not found"),
            None,
            UpstreamClientError,
            404,
            "invalid_request_error",
            None,
        ),
        (
            413,
            anthropic_body("request_too_large", "Request exceeds the maximum size"),
            None,
            UpstreamClientError,
            413,
            "invalid_request_error",
            "request_too_large",
        ),
        (
            429,
            anthropic_body("rate_limit_error", "slow down"),
            "7",
            UpstreamClientError,
            429,
            "rate_limit_exceeded",
            "rate_limit_exceeded",
        ),
        (
            402,
            anthropic_body("billing_error", "credit balance too low"),
            None,
            UpstreamClientError,
            402,
            "invalid_request_error",
            None,
        ),
        (
            500,
            anthropic_body("api_error", "Internal server error"),
            None,
            UpstreamError,
            502,
            "upstream_error",
            "upstream_error",
        ),
        (
            503,
            anthropic_body("api_error", "unavailable"),
            "3",
            UpstreamOverloaded,
            503,
            "upstream_error",
            "upstream_overloaded",
        ),
        (
            529,
            anthropic_body("overloaded_error", "Overloaded"),
            None,
            UpstreamOverloaded,
            503,
            "upstream_error",
            "upstream_overloaded",
        ),
        (
            504,
            anthropic_body("timeout_error", "Request timed out"),
            None,
            UpstreamTimeout,
            504,
            "upstream_error",
            "upstream_timeout",
        ),
        (
            400,
            b"<html>bad gateway config</html>",
            None,
            UpstreamClientError,
            400,
            "invalid_request_error",
            None,
        ),
        (502, b"", None, UpstreamError, 502, "upstream_error", "upstream_error"),
    ],
)
def test_error_statuses_map_to_the_contract(
    status: int,
    body: bytes,
    retry_after: str | None,
    error: type[GatewayError],
    wire_status: int,
    wire_type: str,
    wire_code: str | None,
) -> None:
    mapped = anthropic_error("claude", status, body, retry_after)
    assert type(mapped) is error
    assert mapped.status == wire_status
    wire = orjson.loads(mapped.body())["error"]
    assert wire["type"] == wire_type and wire["code"] == wire_code
    if retry_after is not None:
        assert dict(mapped.headers())[b"retry-after"] == retry_after.encode()
    if status == 400 and body.startswith(b"<"):
        assert "bad gateway config" in mapped.message


def test_client_errors_carry_anthropic_message() -> None:
    mapped = anthropic_error("claude", 400, anthropic_body("invalid_request_error", "boom"), None)
    assert mapped.message == "boom"
    assert isinstance(mapped, errors.UpstreamClientError) and mapped.raw_body is None


# --------------------------------------------------------------------------- provider and mock


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("https://api.anthropic.com", "https://api.anthropic.com/v1/messages"),
        ("https://api.anthropic.com/", "https://api.anthropic.com/v1/messages"),
        ("https://proxy.example/v1", "https://proxy.example/v1/messages"),
        ("https://proxy.example/v1/", "https://proxy.example/v1/messages"),
        ("", "https://api.anthropic.com/v1/messages"),
    ],
)
def test_messages_url(base: str, url: str) -> None:
    assert messages_url(base) == url


@pytest.fixture(scope="module")
def anthropic() -> Iterator[MockAnthropic]:
    with running_anthropic() as mock:
        yield mock


_chat_request = msgspec.json.Decoder(ChatRequest)


def chat_call(payload: dict[str, Any], model: str) -> ChatCall:
    body = orjson.dumps(payload)
    request = _chat_request.decode(body)
    return ChatCall(
        body=body,
        request=request,
        alias=request.model,
        target=Target(provider="claude", model=model),
        request_id="rid",
    )


def provider_for(base_url: str, **config: Any) -> AnthropicProvider:
    return AnthropicProvider(
        ProviderConfig(
            name="claude",
            type="anthropic",
            base_url=base_url,
            api_key="sk-ant-provider-secret",
            **config,
        )
    )


def run_chat(base_url: str, call: ChatCall, **config: Any) -> Any:
    """The reply's body parsed (and its usage), or the gateway error."""

    async def main() -> Any:
        provider = provider_for(base_url, **config)
        await provider.start()
        try:
            reply = await provider.chat(call)
            return orjson.loads(reply.body), reply.usage
        except GatewayError as exc:
            return exc
        finally:
            await provider.close()

    return asyncio.run(main())


class StreamResult:
    def __init__(self) -> None:
        self.chunks: list[Any] = []
        self.error: GatewayError | None = None
        self.usage: Usage | None = None
        self.events = 0


def run_stream(base_url: str, call: ChatCall) -> StreamResult:
    result = StreamResult()

    async def main() -> None:
        provider = provider_for(base_url)
        await provider.start()
        try:
            stream = await provider.stream(call)
            try:
                async for out in stream:
                    result.chunks += chunks_of(out)
            finally:
                result.usage = stream.usage
                result.events = stream.events
                await stream.aclose()
        except GatewayError as exc:
            result.error = exc
        finally:
            await provider.close()

    asyncio.run(main())
    return result


def message(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "my-alias", "messages": [{"role": "user", "content": text}], **extra}


def test_chat_echo_with_provider_credentials(anthropic: MockAnthropic) -> None:
    anthropic.clear()
    payload = message("Hello there", max_tokens=50)
    reply = run_chat(anthropic.base_url, chat_call(payload, "claude-ok"))
    assert not isinstance(reply, Exception), reply
    body, usage = reply
    seen = anthropic.received[-1]
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == "sk-ant-provider-secret"
    assert seen.headers["anthropic-version"] == ANTHROPIC_VERSION
    assert seen.headers["content-type"] == "application/json"
    assert "authorization" not in seen.headers
    sent = seen.json()
    assert sent["model"] == "claude-ok" and sent["max_tokens"] == 50 and "stream" not in sent
    assert body["object"] == "chat.completion" and body["model"] == "claude-ok"
    assert body["id"].startswith("msg_mock_")
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    expected = mock_usage(sent, 3)
    prompt = expected["input_tokens"] + expected["cache_read_input_tokens"]
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 3,
        "total_tokens": prompt + 3,
        "prompt_tokens_details": {"cached_tokens": expected["cache_read_input_tokens"]},
    }
    assert usage == Usage(
        prompt_tokens=prompt,
        completion_tokens=3,
        total_tokens=prompt + 3,
        cached_prompt_tokens=expected["cache_read_input_tokens"],
    )


def test_base_url_ending_in_v1_is_not_doubled(anthropic: MockAnthropic) -> None:
    reply = run_chat(anthropic.base_url + "/v1", chat_call(message("hi"), "claude-ok"))
    assert not isinstance(reply, Exception), reply


def test_max_tokens_default_comes_from_the_provider(anthropic: MockAnthropic) -> None:
    anthropic.clear()
    run_chat(anthropic.base_url, chat_call(message("hi"), "claude-ok"), max_tokens=777)
    assert anthropic.received[-1].json()["max_tokens"] == 777
    run_chat(anthropic.base_url, chat_call(message("hi"), "claude-ok"))
    assert anthropic.received[-1].json()["max_tokens"] == DEFAULT_MAX_TOKENS


def test_finish_length_and_stop_through_the_mock(anthropic: MockAnthropic) -> None:
    long = run_chat(anthropic.base_url, chat_call(message("a" * 40, max_tokens=2), "claude-ok"))
    assert long[0]["choices"][0]["finish_reason"] == "length"
    assert long[0]["choices"][0]["message"]["content"] == "a" * 8
    stopped = run_chat(
        anthropic.base_url, chat_call(message("one END two", stop="END"), "claude-ok")
    )
    assert stopped[0]["choices"][0]["message"]["content"] == "one "
    assert stopped[0]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path", REQUESTS, ids=ids(REQUESTS))
def test_every_golden_translation_is_accepted_by_the_mock(
    anthropic: MockAnthropic, path: Path
) -> None:
    """The mock checks requests as Anthropic does (alternation, no empty text,
    tool results first and matching): the translations must pass."""
    case = load(path)
    payload = dict(case["openai"], stream=False)
    payload.pop("stream_options", None)
    reply = run_chat(anthropic.base_url, chat_call(payload, "claude-ok"))
    assert not isinstance(reply, Exception), reply


def test_tool_calls_streamed_and_not_agree(anthropic: MockAnthropic) -> None:
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for _, name, _ in TOOL_CALLS
    ]
    payload = message("weather and time?", tools=tools)
    body, _ = run_chat(anthropic.base_url, chat_call(payload, "claude-tools"))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check both."
    calls = choice["message"]["tool_calls"]
    assert [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ] == [(call_id, name, arguments) for call_id, name, arguments in TOOL_CALLS]

    streamed = run_stream(
        anthropic.base_url,
        chat_call(
            dict(payload, stream=True, stream_options={"include_usage": True}), "claude-tools"
        ),
    )
    assert streamed.error is None, streamed.error
    assert streamed.chunks[-1] == "[DONE]"
    assert streamed.chunks[-2]["usage"] == body["usage"]
    assert streamed.chunks[-3]["choices"][0]["finish_reason"] == "tool_calls"
    rebuilt: dict[int, dict[str, str]] = {}
    text = ""
    fragments = 0
    for chunk in streamed.chunks[:-2]:
        delta = chunk["choices"][0]["delta"]
        text += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            entry = rebuilt.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.get("id", "")
            entry["name"] += call["function"].get("name", "")
            entry["arguments"] += call["function"]["arguments"]
            fragments += "id" not in call
    assert text == "Let me check both."
    assert fragments > 2 * len(TOOL_CALLS)  # really streamed in pieces
    assert [
        (rebuilt[i]["id"], rebuilt[i]["name"], json.loads(rebuilt[i]["arguments"]))
        for i in sorted(rebuilt)
    ] == [(call_id, name, arguments) for call_id, name, arguments in TOOL_CALLS]
    assert (
        streamed.usage is not None and streamed.usage.total_tokens == body["usage"]["total_tokens"]
    )


def test_tool_results_round_trip(anthropic: MockAnthropic) -> None:
    payload = {
        "model": "my-alias",
        "messages": [
            {"role": "user", "content": "weather and time?"},
            {
                "role": "assistant",
                "content": "Let me check both.",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps(arguments)},
                    }
                    for call_id, name, arguments in TOOL_CALLS
                ],
            },
            {"role": "tool", "tool_call_id": TOOL_CALLS[0][0], "content": "18C"},
            {"role": "tool", "tool_call_id": TOOL_CALLS[1][0], "content": "14:05"},
        ],
    }
    body, _ = run_chat(anthropic.base_url, chat_call(payload, "claude-tools"))
    assert body["choices"][0]["message"]["content"] == "Results: 18C; 14:05"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_json_mode_streamed_and_not(anthropic: MockAnthropic) -> None:
    for response_format in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "echoed", "schema": {"type": "object"}}},
    ):
        payload = message("say it", response_format=response_format)
        body, _ = run_chat(anthropic.base_url, chat_call(payload, "claude-json"))
        choice = body["choices"][0]
        assert json.loads(choice["message"]["content"]) == {"echo": "say it"}
        assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
        streamed = run_stream(
            anthropic.base_url, chat_call(dict(payload, stream=True), "claude-json")
        )
        assert streamed.error is None
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed.chunks[:-1])
        assert json.loads(text) == {"echo": "say it"}
        assert streamed.chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert not any("tool_calls" in c["choices"][0]["delta"] for c in streamed.chunks[:-1])


def test_stream_echo_include_usage_on_and_off(anthropic: MockAnthropic) -> None:
    for include in (False, True):
        anthropic.clear()
        payload = message(
            "stream me please", stream=True, stream_options={"include_usage": include}
        )
        result = run_stream(anthropic.base_url, chat_call(payload, "claude-ok"))
        assert result.error is None
        sent = anthropic.received[-1].json()
        assert sent["stream"] is True and "stream_options" not in sent
        assert result.chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert result.chunks[-1] == "[DONE]"
        has_usage = "usage" in result.chunks[-2]
        assert has_usage is include
        finish = result.chunks[-3] if include else result.chunks[-2]
        assert finish["choices"][0]["finish_reason"] == "stop"
        text = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in result.chunks
            if c != "[DONE]" and c["choices"]
        )
        assert text == "stream me please"
        assert result.usage is not None and result.usage.completion_tokens == 4
        assert result.events == 3  # "stream", " me pl", "ease"


def test_thinking_is_not_shown(anthropic: MockAnthropic) -> None:
    body, usage = run_chat(anthropic.base_url, chat_call(message("deep"), "claude-thinking"))
    assert body["choices"][0]["message"]["content"] == "deep"
    result = run_stream(
        anthropic.base_url, chat_call(message("deep", stream=True), "claude-thinking")
    )
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in result.chunks[:-1])
    assert text == "deep" and result.usage == usage


def test_refusal_is_content_filter(anthropic: MockAnthropic) -> None:
    body, _ = run_chat(anthropic.base_url, chat_call(message("bad"), "claude-refusal"))
    assert body["choices"][0]["finish_reason"] == "content_filter"


@pytest.mark.parametrize(
    ("model", "error", "status"),
    [
        ("claude-stream-error", UpstreamOverloaded, 503),
        ("claude-stream-api-error", UpstreamError, 502),
        ("claude-stream-cut", UpstreamError, 502),
    ],
)
def test_streams_that_break_raise_after_what_was_sent(
    anthropic: MockAnthropic, model: str, error: type[GatewayError], status: int
) -> None:
    result = run_stream(anthropic.base_url, chat_call(message("Hello world", stream=True), model))
    assert type(result.error) is error and result.error.status == status
    # The translator emits both chunks before the failure (see the golden stream
    # tests); TranslatedStream drops the ones of the read that failed, so the
    # client sees a prefix of them, never a finish or [DONE].
    deltas = [chunk["choices"][0]["delta"] for chunk in result.chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hello "}][: len(deltas)]


@pytest.mark.parametrize(
    ("model", "error", "status", "code"),
    [
        ("claude-status-400", UpstreamClientError, 400, None),
        ("claude-status-404", UpstreamClientError, 404, "model_not_found"),
        ("claude-status-413", UpstreamClientError, 413, "request_too_large"),
        ("claude-status-429", UpstreamClientError, 429, "rate_limit_exceeded"),
        ("claude-status-401", UpstreamAuthError, 502, "upstream_auth_error"),
        ("claude-status-403", UpstreamAuthError, 502, "upstream_auth_error"),
        ("claude-status-500", UpstreamError, 502, "upstream_error"),
        ("claude-status-504", UpstreamTimeout, 504, "upstream_timeout"),
        ("claude-status-529", UpstreamOverloaded, 503, "upstream_overloaded"),
        ("claude-overloaded", UpstreamOverloaded, 503, "upstream_overloaded"),
        ("claude-text-400", UpstreamClientError, 400, None),
        ("claude-text-500", UpstreamError, 502, "upstream_error"),
    ],
)
def test_provider_error_statuses(
    anthropic: MockAnthropic, model: str, error: type[GatewayError], status: int, code: str | None
) -> None:
    for stream in (False, True):
        call = chat_call(message("x", stream=stream), model)
        if stream:
            result = run_stream(anthropic.base_url, call)
            assert result.chunks == []  # refused before any byte
            mapped = result.error
        else:
            mapped = run_chat(anthropic.base_url, call)
        assert type(mapped) is error, (stream, mapped)
        assert mapped.status == status and mapped.code == code
        assert "sk-ant-provider-secret" not in mapped.body().decode()
        if model == "claude-status-429":
            assert dict(mapped.headers())[b"retry-after"] == b"7"


def test_refused_parameters_never_reach_the_upstream(anthropic: MockAnthropic) -> None:
    anthropic.clear()
    reply = run_chat(anthropic.base_url, chat_call(message("x", n=3), "claude-ok"))
    assert isinstance(reply, InvalidRequest) and reply.param == "n"
    result = run_stream(anthropic.base_url, chat_call(message("x", n=3, stream=True), "claude-ok"))
    assert isinstance(result.error, InvalidRequest)
    assert anthropic.received == []


def test_embeddings_are_refused() -> None:
    async def main() -> GatewayError:
        provider = provider_for("http://127.0.0.1:9")
        body = b'{"model":"emb","input":"x"}'
        call = EmbeddingsCall(
            body=body,
            request=msgspec.json.decode(body, type=EmbeddingsRequest),
            alias="emb",
            target=Target(provider="claude", model="claude-ok"),
            request_id="rid",
        )
        try:
            await provider.embeddings(call)
        except GatewayError as exc:
            return exc
        raise AssertionError("embeddings did not fail")

    error = asyncio.run(main())
    assert type(error) is InvalidRequest and error.status == 400 and error.param == "model"
    assert "embeddings" in error.message
