"""OpenAI's chat format, decoded whole, for the adapters that translate it.

The openai adapter never decodes a body past what routing needs; adapters
for other wire formats (anthropic, gemini) must read every field. This module
holds what they share:

- :func:`decode_chat`: the full request as msgspec Structs; a wrong shape is a
  400 naming the field;
- :func:`reject`: the 400 for a parameter a provider cannot honour;
- :class:`ChunkWriter`: OpenAI ``chat.completion.chunk`` events, framed from
  prebuilt bytes (one per stream, a few concatenations per event);
- :func:`completion`, :func:`assistant_message`, :func:`usage_object`: the
  non-streaming answer;
- :class:`TranslatedStream`: an upstream event stream turned into OpenAI SSE
  by a :class:`StreamTranslator`, chunk by chunk as reads arrive.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import msgspec
import orjson

from gandalf.domain import Usage
from gandalf.errors import GatewayError, InvalidRequest, decode_body
from gandalf.provider import transport
from gandalf.provider.sse import EventParser

# --------------------------------------------------------------------------- request


class ImageURL(msgspec.Struct):
    url: str
    detail: str | None = None


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: ImageURL


# Other part types (input_audio, file, refusal) fail to decode: a 400 naming the part.
Part = TextPart | ImagePart


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str = ""  # a JSON text, as OpenAI sends it


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    function: FunctionDef
    type: str = "function"


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    function: NamedFunction
    type: str = "function"


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str = "response"
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """Every field of a chat completion request that some adapter translates or
    refuses. Fields nobody reads (``user``, ``metadata``, ``store``, ...) are
    ignored by the decoder."""

    model: str
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    user: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None

    @property
    def output_limit(self) -> int | None:
        """``max_completion_tokens`` (the current name) or ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        stop = self.stop
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else list(stop)

    @property
    def wants_usage(self) -> bool:
        options = self.stream_options
        return options is not None and options.include_usage


class EmbeddingsInput(msgspec.Struct, kw_only=True):
    model: str
    # Strings, or token arrays (a list of ints, or of such lists) that only
    # OpenAI-compatible upstreams accept.
    input: str | list[str | int | list[int]]
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_embeddings_decoder = msgspec.json.Decoder(EmbeddingsInput)


def decode_chat(body: bytes) -> ChatCompletionRequest:
    """The whole request; a 400 naming the field when its shape is wrong (and,
    as for every client body, when it is nested too deeply or not UTF-8)."""
    return decode_body(_chat_decoder, body)


def decode_embeddings(body: bytes) -> EmbeddingsInput:
    return decode_body(_embeddings_decoder, body)


def reject(param: str, provider_type: str, why: str = "") -> InvalidRequest:
    """The 400 for a parameter that would change the answer's meaning and that
    ``provider_type`` cannot honour."""
    detail = f": {why}" if why else ""
    return InvalidRequest(
        f"Parameter '{param}' is not supported by {provider_type} models{detail}.",
        param=param,
    )


def text_of(content: str | list[Part] | None) -> str:
    """The text of a content value (text parts joined); images are dropped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextPart))


def parse_data_url(url: str, param: str) -> tuple[str, str] | None:
    """``(media_type, base64_data)`` of a ``data:`` URL; None for other URLs.
    A malformed data URL is a 400."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    media_type, _, encoding = head.partition(";")
    if not sep or encoding != "base64" or not media_type:
        raise InvalidRequest(
            f"Invalid image URL at '{param}': expected data:<media type>;base64,<data>.",
            param=param,
        )
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"Invalid image URL at '{param}': the data is not base64.", param=param
        ) from None
    return media_type, data


def parse_arguments(arguments: str, param: str) -> dict[str, Any]:
    """A tool call's JSON-text arguments as an object (``""`` is ``{}``)."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            f"Invalid tool call arguments at '{param}': not valid JSON.", param=param
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"Invalid tool call arguments at '{param}': expected a JSON object.", param=param
        )
    return value


# --------------------------------------------------------------------------- response


def usage_object(
    prompt: int, completion: int, *, cached: int | None = None, reasoning: int | None = None
) -> dict[str, Any]:
    """OpenAI's usage object; ``cached`` (prompt tokens read from a cache) and
    ``reasoning`` (thinking tokens, already counted in ``completion``) when known."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def tool_call_object(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_message(content: str | None, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def completion(
    *,
    completion_id: str,
    model: str,
    created: int,
    choices: list[tuple[dict[str, Any], str]],
    usage: dict[str, Any],
) -> bytes:
    """A ``chat.completion`` body; ``choices`` are (message, finish_reason) pairs."""
    return orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                for i, (message, finish) in enumerate(choices)
            ],
            "usage": usage,
        }
    )


DONE = b"data: [DONE]\n\n"
_TAIL = b',"logprobs":null,"finish_reason":null}]}\n\n'


class ChunkWriter:
    """``chat.completion.chunk`` events for one stream, from prebuilt framing."""

    __slots__ = ("_head", "_usage_head")

    def __init__(self, completion_id: str, model: str, created: int) -> None:
        common = (
            b'data: {"id":'
            + orjson.dumps(completion_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
        )
        self._head = common + b',"choices":[{"index":'
        self._usage_head = common + b',"choices":[],"usage":'

    def delta(self, index: int, delta: bytes) -> bytes:
        return self._head + str(index).encode() + b',"delta":' + delta + _TAIL

    def role(self, index: int = 0) -> bytes:
        return self.delta(index, b'{"role":"assistant","content":""}')

    def content(self, text: str, index: int = 0) -> bytes:
        return self.delta(index, b'{"content":' + orjson.dumps(text) + b"}")

    def tool_start(self, tool_index: int, call_id: str, name: str, index: int = 0) -> bytes:
        return self.delta(
            index,
            b'{"tool_calls":[{"index":'
            + str(tool_index).encode()
            + b',"id":'
            + orjson.dumps(call_id)
            + b',"type":"function","function":{"name":'
            + orjson.dumps(name)
            + b',"arguments":""}}]}',
        )

    def tool_arguments(self, tool_index: int, fragment: str, index: int = 0) -> bytes:
        return self.delta(
            index,
            b'{"tool_calls":[{"index":'
            + str(tool_index).encode()
            + b',"function":{"arguments":'
            + orjson.dumps(fragment)
            + b"}}]}",
        )

    def finish(self, reason: str, index: int = 0) -> bytes:
        return (
            self._head
            + str(index).encode()
            + b',"delta":{},"logprobs":null,"finish_reason":'
            + orjson.dumps(reason)
            + b"}]}\n\n"
        )

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._usage_head + orjson.dumps(usage) + b"}\n\n"


class StreamTranslator(Protocol):
    """Turns one upstream's events into OpenAI SSE bytes.

    ``feed`` gets each upstream event (its ``event:`` name, ``b""`` when it has
    none, and its data) and returns the bytes to send now, maybe empty; it
    raises a GatewayError for an upstream error event. ``finish`` runs when the
    upstream closes: it returns the closing bytes (``data: [DONE]``) or raises
    UpstreamError when the stream ended before the upstream said it was
    complete. ``usage`` is known once the upstream reported it; ``events``
    counts the content events sent (the estimate when a stream is cut short).
    """

    @property
    def usage(self) -> Usage | None: ...

    @property
    def events(self) -> int: ...

    def feed(self, event: bytes, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _Failed(Exception):
    def __init__(self, error: GatewayError, sent: bytes) -> None:
        self.error = error
        self.sent = sent


def _translate(translator: StreamTranslator, events: list[tuple[bytes, bytes]]) -> bytes:
    """The output for ``events``; on a translator error, _Failed with the output
    of the events before it."""
    out: list[bytes] = []
    try:
        for name, data in events:
            out.append(translator.feed(name, data))
    except GatewayError as exc:
        raise _Failed(exc, b"".join(out)) from None
    return b"".join(out)


class TranslatedStream:
    """An accepted upstream event stream, translated as each read arrives:
    nothing waits for the end of the answer."""

    __slots__ = ("_errors", "_resp", "_translator")

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        translator: StreamTranslator,
        errors: transport.UpstreamErrors,
    ) -> None:
        self._resp = resp
        self._translator = translator
        # Reading the body: a read timeout now is silence, not a missing first byte.
        self._errors = errors.stream_body

    @property
    def usage(self) -> Usage | None:
        return self._translator.usage

    @property
    def events(self) -> int:
        return self._translator.events

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        resp = self._resp
        translator = self._translator
        parser = EventParser()
        complete = False
        try:
            with self._errors:
                async for chunk in resp.content.iter_any():
                    out = _translate(translator, parser.feed(chunk))
                    if out:
                        yield out
            out = _translate(translator, parser.finish()) + translator.finish()
            complete = True
            if out:
                yield out
        except _Failed as failed:
            # What the events before the failing one produced still reaches the
            # client, ahead of the error event the server adds.
            if failed.sent:
                yield failed.sent
            raise failed.error from None
        finally:
            if complete:
                resp.release()
            else:
                resp.close()

    async def aclose(self) -> None:
        self._resp.close()
