"""The Anthropic adapter: OpenAI chat completions served by the Messages API.

Clients speak OpenAI's format; this module translates each request to
``POST /v1/messages`` (:func:`to_anthropic`), the answer back to a
``chat.completion`` (:func:`from_anthropic`), and the event stream back to
``chat.completion.chunk`` events (:class:`AnthropicStreamTranslator`), event
by event as they arrive. The translate functions do no I/O;
:class:`AnthropicProvider` does the HTTP.

Request parameters:

- translated: ``messages`` (system/developer -> ``system``; tool results ->
  ``tool_result`` blocks; consecutive same-role turns merged), ``max_tokens`` /
  ``max_completion_tokens`` (else the provider's ``max_tokens``, else
  :data:`DEFAULT_MAX_TOKENS`: Anthropic requires one), ``stop``,
  ``temperature``, ``top_p`` (both as sent: Anthropic refuses a temperature
  above 1 itself), ``user`` (``metadata.user_id``), ``stream``, ``tools``,
  ``tool_choice``, ``parallel_tool_calls``, ``response_format`` (a forced tool
  whose input becomes the message content, see :func:`response_tool_name`);
- refused with a 400 naming them, because the answer would not mean what the
  client asked for: ``n`` > 1, ``logprobs: true``, ``top_logprobs`` > 0, a
  non-empty ``logit_bias``, ``modalities`` with ``"audio"``, ``audio``;
- ignored, the answer keeps its meaning without them: ``presence_penalty``,
  ``frequency_penalty``, ``seed``, ``prediction``, ``store``, ``metadata``,
  ``service_tier``, ``reasoning_effort``, a message's ``name``, an image's
  ``detail``, a function's ``strict``, and any field the decoder does not know.

Content Anthropic refuses is left out rather than sent: empty or
whitespace-only text (its "text content blocks must contain non-whitespace
text" 400). A message left with no block at all (``{"role": "assistant",
"content": ""}`` with no tool calls, an empty user message) is dropped, and
its neighbours then merge if they share a role; a tool message with no text
becomes a ``tool_result`` without ``content``, which Anthropic accepts.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import orjson

from gandalf.domain import ChatCall, EmbeddingsCall, ProviderConfig, ProviderReply, Usage
from gandalf.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
)
from gandalf.provider import transport
from gandalf.provider._openai_chat import (
    DONE,
    ChatCompletionRequest,
    ChunkWriter,
    ImagePart,
    Message,
    NamedToolChoice,
    Part,
    TextPart,
    Tool,
    TranslatedStream,
    assistant_message,
    completion,
    decode_chat,
    parse_arguments,
    parse_data_url,
    reject,
    tool_call_object,
    usage_object,
)
from gandalf.provider.usage import usage_from_anthropic

PROVIDER_TYPE = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
JSON_OBJECT_TOOL = "json_response"
"""The forced tool that carries a ``response_format: json_object`` answer."""

# --------------------------------------------------------------------------- request


def to_anthropic(request: ChatCompletionRequest, model: str, *, max_tokens: int) -> dict[str, Any]:
    """The Messages API body for ``request`` sent to ``model``; ``max_tokens``
    applies when the request sets no output limit. Raises InvalidRequest (400,
    naming the parameter) for what Anthropic cannot honour or the request got
    wrong. The body has ``stream: true`` when the request streams."""
    _refuse_unsupported(request)
    system, messages = _messages(request.messages)
    limit = request.output_limit
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens if limit is None else limit,
        "messages": messages,
    }
    if system:
        payload["system"] = system
    stop = request.stop_list
    if stop:
        payload["stop_sequences"] = stop
    if request.temperature is not None:
        payload["temperature"] = request.temperature
    if request.top_p is not None:
        payload["top_p"] = request.top_p
    if request.user:
        payload["metadata"] = {"user_id": request.user}
    tools, tool_choice = _tools(request)
    if tools:
        payload["tools"] = tools
    if tool_choice is not None:
        payload["tool_choice"] = tool_choice
    if request.stream:
        payload["stream"] = True
    return payload


def response_tool_name(request: ChatCompletionRequest) -> str | None:
    """The name of the tool that carries a JSON ``response_format`` answer
    (None without one). The response translators need it: that tool's input
    becomes the message content, never a tool call."""
    tool = _response_tool(request)
    return None if tool is None else str(tool["name"])


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    if request.n is not None and request.n > 1:
        raise reject("n", PROVIDER_TYPE, "they return one choice per request")
    if request.logprobs:
        raise reject("logprobs", PROVIDER_TYPE, "they do not return log probabilities")
    if request.top_logprobs:
        raise reject("top_logprobs", PROVIDER_TYPE, "they do not return log probabilities")
    if request.logit_bias:
        raise reject("logit_bias", PROVIDER_TYPE, "they take no token biases")
    if request.modalities is not None and "audio" in request.modalities:
        raise reject("modalities", PROVIDER_TYPE, "they do not produce audio")
    if request.audio is not None:
        raise reject("audio", PROVIDER_TYPE, "they do not produce audio")


def _messages(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """``(system, messages)``: system texts lifted out, the rest as strictly
    alternating turns (Anthropic refuses two consecutive turns of one role)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.role
        if role in ("system", "developer"):
            system.extend(_system_texts(message.content, i))
            continue
        if role == "user":
            blocks = _blocks(message.content, i, images=True)
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
        elif role == "tool":
            role = "user"  # tool results travel in the user turn that follows the call
            blocks = [_tool_result(message, i)]
        else:
            raise InvalidRequest(
                f"Invalid value for 'messages[{i}].role': '{role}' is not one of "
                "'system', 'developer', 'user', 'assistant', 'tool'.",
                param=f"messages[{i}].role",
            )
        if not blocks:
            continue  # nothing Anthropic would accept (see the module docstring)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(system), turns


def _system_texts(content: str | list[Part] | None, i: int) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content.strip() else []
    texts: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, ImagePart):
            raise InvalidRequest(
                f"Invalid content at 'messages[{i}].content[{j}]': anthropic models take "
                "no images in system or developer messages.",
                param=f"messages[{i}].content[{j}]",
            )
        if part.text.strip():
            texts.append(part.text)
    return texts


def _blocks(content: str | list[Part] | None, i: int, *, images: bool) -> list[dict[str, Any]]:
    """Text and image blocks for one message's content; empty text left out."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            if part.text.strip():
                blocks.append({"type": "text", "text": part.text})
        elif images:
            blocks.append(_image(part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
        else:
            raise InvalidRequest(
                f"Invalid content at 'messages[{i}].content[{j}]': assistant messages "
                "cannot contain images.",
                param=f"messages[{i}].content[{j}]",
            )
    return blocks


def _image(url: str, param: str) -> dict[str, Any]:
    data = parse_data_url(url, param)
    if data is not None:
        media_type, encoded = data
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": encoded},
        }
    scheme = url[:8].lower()
    if scheme.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest(
        f"Invalid image URL at '{param}': anthropic models take data: or http(s) URLs.",
        param=param,
    )


def _assistant_blocks(message: Message, i: int) -> list[dict[str, Any]]:
    blocks = _blocks(message.content, i, images=False)
    for k, call in enumerate(message.tool_calls or ()):
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.function.name,
                "input": parse_arguments(
                    call.function.arguments, f"messages[{i}].tool_calls[{k}].function.arguments"
                ),
            }
        )
    return blocks


def _tool_result(message: Message, i: int) -> dict[str, Any]:
    if not message.tool_call_id:
        param = f"messages[{i}].tool_call_id"
        raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
    content = message.content
    if isinstance(content, str):
        if content.strip():
            result["content"] = content
    else:
        blocks = _blocks(content, i, images=True)
        if blocks:
            result["content"] = blocks
    return result


_CHOICES = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}


def _tools(request: ChatCompletionRequest) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``(tools, tool_choice)`` from the request's tools, tool_choice,
    parallel_tool_calls and response_format."""
    tools = [_tool(tool, i) for i, tool in enumerate(request.tools or ())]
    choice = request.tool_choice
    if isinstance(choice, str) and choice not in _CHOICES:
        raise InvalidRequest(
            f"Invalid value for 'tool_choice': '{choice}' is not one of 'none', 'auto', "
            "'required' or a named function.",
            param="tool_choice",
        )
    if not tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        raise InvalidRequest(
            "Invalid value for 'tool_choice': it requires 'tools'.", param="tool_choice"
        )
    answer = _response_tool(request)
    anthropic_choice: dict[str, Any] | None
    if answer is not None:
        if any(tool["name"] == answer["name"] for tool in tools):
            raise InvalidRequest(
                f"Invalid value for 'response_format': a tool is already named "
                f"'{answer['name']}'; give the JSON schema another name.",
                param="response_format",
            )
        if not tools or choice == "none":
            # The answer is the only thing the model may produce: one call, forced.
            forced = {"type": "tool", "name": answer["name"], "disable_parallel_tool_use": True}
            return [answer], forced
        tools.append(answer)
        if isinstance(choice, NamedToolChoice):
            anthropic_choice = {"type": "tool", "name": choice.function.name}
        else:  # auto, required or absent: a user tool call or the answer, never bare text
            anthropic_choice = {"type": "any"}
    elif not tools:
        return [], None  # auto/none and parallel_tool_calls mean nothing without tools
    elif isinstance(choice, NamedToolChoice):
        anthropic_choice = {"type": "tool", "name": choice.function.name}
    elif choice is None:
        anthropic_choice = None
    else:
        anthropic_choice = dict(_CHOICES[choice])
    if request.parallel_tool_calls is False:
        if anthropic_choice is None:
            anthropic_choice = {"type": "auto"}
        if anthropic_choice["type"] != "none":
            anthropic_choice["disable_parallel_tool_use"] = True
    return tools, anthropic_choice


def _tool(tool: Tool, i: int) -> dict[str, Any]:
    if tool.type != "function":
        raise InvalidRequest(
            f"Invalid value for 'tools[{i}].type': anthropic models take only "
            f"'function' tools, got '{tool.type}'.",
            param=f"tools[{i}].type",
        )
    function = tool.function
    out: dict[str, Any] = {"name": function.name}
    if function.description:
        out["description"] = function.description
    out["input_schema"] = (
        function.parameters
        if function.parameters is not None
        else {"type": "object", "properties": {}}
    )
    return out


def _response_tool(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The forced tool standing in for a JSON ``response_format`` (Anthropic
    has no JSON mode: a tool's input is the one output it validates as JSON)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {
            "name": JSON_OBJECT_TOOL,
            "description": "Respond with a JSON object.",
            "input_schema": {"type": "object"},
        }
    if fmt.type == "json_schema":
        spec = fmt.json_schema
        if spec is None:
            raise InvalidRequest(
                "Missing required parameter: 'response_format.json_schema'.",
                param="response_format.json_schema",
            )
        tool: dict[str, Any] = {"name": spec.name}
        if spec.description:
            tool["description"] = spec.description
        tool["input_schema"] = spec.schema if spec.schema is not None else {"type": "object"}
        return tool
    raise InvalidRequest(
        f"Invalid value for 'response_format.type': '{fmt.type}' is not one of 'text', "
        "'json_object', 'json_schema'.",
        param="response_format.type",
    )


# --------------------------------------------------------------------------- response

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: str | None, *, tool_calls: int) -> str:
    """OpenAI's finish_reason for Anthropic's stop_reason. ``tool_use`` is
    ``tool_calls`` only when the client gets tool calls (``tool_calls`` > 0):
    a call of the response tool alone is a finished answer. Unknown or missing
    reasons are ``stop``."""
    reason = _FINISH.get(stop_reason or "", "stop")
    if reason == "tool_calls" and not tool_calls:
        return "stop"
    return reason


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Block(msgspec.Struct):
    type: str
    text: str = ""
    id: str = ""
    name: str = ""
    input: Any = None


class _Message(msgspec.Struct):
    id: str
    model: str
    content: list[_Block]
    usage: _Usage
    stop_reason: str | None = None


_message_decoder = msgspec.json.Decoder(_Message)


def _usage_pair(
    input_tokens: int, cache_read: int, cache_creation: int, output_tokens: int
) -> tuple[dict[str, Any], Usage]:
    # The counts in OpenAI's terms (usage_from_anthropic, shared with the
    # native passthrough); the cache reads shown as cached_tokens.
    domain = usage_from_anthropic(input_tokens, output_tokens, cache_read, cache_creation)
    wire = usage_object(domain.prompt_tokens, output_tokens, cached=cache_read)
    return wire, domain


def from_anthropic(body: bytes, *, created: int, response_tool: str | None) -> tuple[bytes, Usage]:
    """The ``chat.completion`` body and usage for a Messages API answer.
    ``response_tool`` names the tool whose input is the JSON answer (see
    :func:`response_tool_name`). Raises UpstreamError (502) for a body that is
    not a message."""
    try:
        message = _message_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise UpstreamError(
            f"The anthropic upstream returned a body that is not a message: {exc}."
        ) from None
    texts: list[str] = []
    answers: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            arguments = orjson.dumps({} if block.input is None else block.input).decode()
            if block.name == response_tool:
                answers.append(arguments)
            else:
                calls.append(tool_call_object(block.id, block.name, arguments))
        # thinking, redacted_thinking and server-tool blocks have no OpenAI form
    content: str | None
    if answers:
        # The JSON is the answer; text around it would make it unparseable.
        content = "".join(answers)
    else:
        content = "".join(texts)
        if not content and calls:
            content = None
    usage = message.usage
    wire, domain = _usage_pair(
        usage.input_tokens,
        usage.cache_read_input_tokens or 0,
        usage.cache_creation_input_tokens or 0,
        usage.output_tokens,
    )
    out = completion(
        completion_id=message.id,
        model=message.model,
        created=created,
        choices=[
            (
                assistant_message(content, calls),
                finish_reason(message.stop_reason, tool_calls=len(calls)),
            )
        ],
        usage=wire,
    )
    return out, domain


# --------------------------------------------------------------------------- stream


class _StartMessage(msgspec.Struct):
    id: str
    model: str
    usage: _Usage = msgspec.field(default_factory=_Usage)


class _MessageStart(msgspec.Struct):
    message: _StartMessage


class _BlockStart(msgspec.Struct):
    index: int
    content_block: _Block


class _Delta(msgspec.Struct):
    type: str
    text: str = ""
    partial_json: str = ""


class _BlockDelta(msgspec.Struct):
    index: int
    delta: _Delta


class _BlockStop(msgspec.Struct):
    index: int


class _StopInfo(msgspec.Struct):
    stop_reason: str | None = None


class _DeltaUsage(msgspec.Struct):
    output_tokens: int | None = None
    input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _MessageDelta(msgspec.Struct):
    delta: _StopInfo = msgspec.field(default_factory=_StopInfo)
    usage: _DeltaUsage | None = None


class _ErrorDetail(msgspec.Struct):
    type: str = ""
    message: str = ""


class _ErrorEvent(msgspec.Struct):
    error: _ErrorDetail


class _Typed(msgspec.Struct):
    type: str = ""


_message_start = msgspec.json.Decoder(_MessageStart)
_block_start = msgspec.json.Decoder(_BlockStart)
_block_delta = msgspec.json.Decoder(_BlockDelta)
_block_stop = msgspec.json.Decoder(_BlockStop)
_message_delta = msgspec.json.Decoder(_MessageDelta)
_error_event = msgspec.json.Decoder(_ErrorEvent)
_typed = msgspec.json.Decoder(_Typed)

_ANSWER = -1  # in AnthropicStreamTranslator._blocks: the response tool's block


class AnthropicStreamTranslator:
    """Anthropic's stream events -> OpenAI chunks, one event at a time.

    ``message_start`` gives the role chunk; text arrives as content chunks;
    each ``tool_use`` block becomes a tool call numbered 0, 1, ... in order
    (whatever Anthropic's block index), its ``input_json_delta`` fragments
    the call's argument fragments; a call without argument fragments gets
    ``"{}"`` when its block stops, as in non-streamed answers. The response
    tool's fragments are content instead (and text is then dropped, as in
    :func:`from_anthropic`); when the model never calls it (a refusal), the
    text it held is sent whole before the finish chunk. ``message_stop`` gives the finish chunk, the
    usage chunk when ``include_usage``, and ``data: [DONE]``. An ``error``
    event raises the gateway error; thinking, pings and unknown events are
    skipped.
    """

    __slots__ = (
        "_blocks",
        "_cache_creation",
        "_cache_read",
        "_created",
        "_done",
        "_events",
        "_held",
        "_include_usage",
        "_input",
        "_output",
        "_provider",
        "_response_tool",
        "_stop_reason",
        "_tool_calls",
        "_unfilled",
        "_usage",
        "_writer",
    )

    def __init__(
        self,
        provider: str,
        *,
        created: int,
        include_usage: bool,
        response_tool: str | None = None,
    ) -> None:
        self._provider = provider
        self._created = created
        self._include_usage = include_usage
        self._response_tool = response_tool
        self._writer: ChunkWriter | None = None
        # Anthropic block index -> OpenAI tool index (or _ANSWER), tool blocks only.
        self._blocks: dict[int, int] = {}
        self._unfilled: set[int] = set()  # tool blocks that sent no argument yet
        # With a response tool, text is held until it is known whether the model
        # called that tool (then the JSON is the answer and the text is dropped)
        # or not (a refusal, a user tool call: the text is the answer, sent at
        # message_stop), as :func:`from_anthropic` decides for a whole message.
        # None: nothing to hold (no response tool, or it was called).
        self._held: list[str] | None = [] if response_tool is not None else None
        self._tool_calls = 0
        self._stop_reason: str | None = None
        self._input = 0
        self._cache_read = 0
        self._cache_creation = 0
        self._output = 0
        self._usage: Usage | None = None
        self._events = 0
        self._done = False

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def events(self) -> int:
        return self._events

    def feed(self, event: bytes, data: bytes) -> bytes:
        if self._done:
            return b""
        name = event.decode("ascii", "replace") if event else ""
        try:
            if not name:
                name = _typed.decode(data).type
            if name == "content_block_delta":
                return self._on_block_delta(_block_delta.decode(data))
            if name == "content_block_start":
                return self._on_block_start(_block_start.decode(data))
            if name == "content_block_stop":
                return self._on_block_stop(_block_stop.decode(data))
            if name == "message_start":
                return self._on_message_start(_message_start.decode(data))
            if name == "message_delta":
                self._on_message_delta(_message_delta.decode(data))
                return b""
            if name == "message_stop":
                return self._on_message_stop()
            if name == "error":
                raise self._stream_error(_error_event.decode(data).error)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UpstreamError(
                f"Upstream provider '{self._provider}' sent a malformed '{name}' event: {exc}."
            ) from None
        return b""  # ping, and event types newer than this adapter

    def finish(self) -> bytes:
        if self._done:
            return b""
        raise UpstreamError(
            f"Upstream provider '{self._provider}' ended the stream before message_stop."
        )

    def _writer_for(self, what: str) -> ChunkWriter:
        writer = self._writer
        if writer is None:
            raise UpstreamError(
                f"Upstream provider '{self._provider}' sent {what} before message_start."
            )
        return writer

    def _on_message_start(self, event: _MessageStart) -> bytes:
        message = event.message
        self._writer = writer = ChunkWriter(message.id, message.model, self._created)
        usage = message.usage
        self._input = usage.input_tokens
        self._cache_read = usage.cache_read_input_tokens or 0
        self._cache_creation = usage.cache_creation_input_tokens or 0
        self._output = usage.output_tokens
        return writer.role()

    def _on_block_start(self, event: _BlockStart) -> bytes:
        writer = self._writer_for("content_block_start")
        block = event.content_block
        if block.type == "text":
            if block.text:
                return self._text(writer, block.text)
            return b""
        if block.type != "tool_use":
            return b""  # thinking, server tools: nothing the client sees
        index = event.index
        self._unfilled.add(index)
        if block.name == self._response_tool:
            self._blocks[index] = _ANSWER
            self._held = None  # the JSON is the answer: text around it is dropped
            out = b""
        else:
            self._blocks[index] = target = self._tool_calls
            self._tool_calls += 1
            out = writer.tool_start(target, block.id, block.name)
        if isinstance(block.input, dict) and block.input:
            # Streams start tool inputs empty; take one that came whole anyway.
            out += self._arguments(writer, index, orjson.dumps(block.input).decode())
        return out

    def _on_block_delta(self, event: _BlockDelta) -> bytes:
        delta = event.delta
        if delta.type == "text_delta":
            if not delta.text:
                return b""
            return self._text(self._writer_for("content_block_delta"), delta.text)
        if delta.type == "input_json_delta" and delta.partial_json and event.index in self._blocks:
            return self._arguments(
                self._writer_for("content_block_delta"), event.index, delta.partial_json
            )
        return b""  # thinking_delta, signature_delta, citations, server-tool input

    def _text(self, writer: ChunkWriter, text: str) -> bytes:
        if self._response_tool is None:
            self._events += 1
            return writer.content(text)
        held = self._held
        if held is not None:  # the response tool may still come: hold the text
            held.append(text)
        return b""

    def _on_block_stop(self, event: _BlockStop) -> bytes:
        index = event.index
        if index not in self._unfilled:
            return b""
        # A tool without parameters streams no fragment; "" is not JSON, "{}" is.
        return self._arguments(self._writer_for("content_block_stop"), index, "{}")

    def _arguments(self, writer: ChunkWriter, index: int, fragment: str) -> bytes:
        self._unfilled.discard(index)
        self._events += 1
        target = self._blocks[index]
        if target == _ANSWER:
            return writer.content(fragment)
        return writer.tool_arguments(target, fragment)

    def _on_message_delta(self, event: _MessageDelta) -> None:
        if event.delta.stop_reason is not None:
            self._stop_reason = event.delta.stop_reason
        usage = event.usage
        if usage is not None:
            # Counts here are cumulative: the latest value is the total so far.
            if usage.output_tokens is not None:
                self._output = usage.output_tokens
            if usage.input_tokens is not None:
                self._input = usage.input_tokens
            if usage.cache_read_input_tokens is not None:
                self._cache_read = usage.cache_read_input_tokens
            if usage.cache_creation_input_tokens is not None:
                self._cache_creation = usage.cache_creation_input_tokens
        self._usage = self._usage_pair()[1]

    def _on_message_stop(self) -> bytes:
        writer = self._writer_for("message_stop")
        self._done = True
        wire, self._usage = self._usage_pair()
        out = b""
        held = self._held
        if held:  # the response tool was not called: the text is the answer
            self._events += 1
            out = writer.content("".join(held))
        out += writer.finish(finish_reason(self._stop_reason, tool_calls=self._tool_calls))
        if self._include_usage:
            out += writer.usage(wire)
        return out + DONE

    def _usage_pair(self) -> tuple[dict[str, Any], Usage]:
        return _usage_pair(self._input, self._cache_read, self._cache_creation, self._output)

    def _stream_error(self, error: _ErrorDetail) -> GatewayError:
        message = error.message or error.type or "unknown error"
        if error.type == "overloaded_error":
            return UpstreamOverloaded(
                f"Upstream provider '{self._provider}' is overloaded: {message}"
            )
        return UpstreamError(
            f"Upstream provider '{self._provider}' failed mid-stream ({error.type}): {message}"
        )


# --------------------------------------------------------------------------- errors


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_error_body = msgspec.json.Decoder(_ErrorBody)


def anthropic_error(
    provider: str, status: int, body: bytes, retry_after: str | None
) -> GatewayError:
    """The gateway error for a non-2xx Messages API answer, from its status and
    ``{"type": "error", "error": {"type", "message"}}`` body (or any text):
    overloaded_error/503/529 -> UpstreamOverloaded (503); timeout_error/504 ->
    UpstreamTimeout (504); 401/403 -> UpstreamAuthError (502); other 5xx ->
    UpstreamError (502); 429 -> 429 rate_limit_exceeded; other 4xx -> the same
    status as invalid_request_error, with code ``model_not_found`` for an
    unknown model and ``request_too_large`` for 413."""
    try:
        detail = _error_body.decode(body).error
        kind, message = detail.type, detail.message or f"HTTP {status}"
    except (msgspec.DecodeError, msgspec.ValidationError):
        kind = ""
        message = body[:500].decode("utf-8", "replace").strip() or f"HTTP {status}"
    if kind == "overloaded_error":
        return transport.status_error(provider, status, message, retry_after, overloaded=True)
    if kind == "timeout_error" or status == 504:
        return UpstreamTimeout(f"Upstream provider '{provider}' timed out: {message}")
    if status in (401, 403, 429) or not 400 <= status < 500:
        return transport.status_error(provider, status, message, retry_after)
    code: str | None = None
    if kind == "not_found_error" or status == 404:
        code = "model_not_found" if "model" in message.lower() else None
    elif kind == "request_too_large" or status == 413:
        code = "request_too_large"
    return transport.status_error(
        provider,
        status,
        message,
        retry_after,
        error_type="invalid_request_error",
        error_code=code,
    )


# --------------------------------------------------------------------------- provider


def messages_url(base_url: str) -> str:
    """``base_url`` + ``/v1/messages``, without doubling a ``/v1`` it ends with."""
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    return base + ("/messages" if base.endswith("/v1") else "/v1/messages")


class AnthropicProvider(transport.UpstreamClient):
    """Anthropic's Messages API behind the OpenAI chat-completions format."""

    __slots__ = ("_headers", "_max_tokens", "_url")

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._url = messages_url(config.base_url)
        # Only the provider's key goes upstream; the caller's never reaches an adapter.
        self._headers = {
            "x-api-key": config.api_key,
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
        }
        self._max_tokens = config.max_tokens or DEFAULT_MAX_TOKENS

    def _error(self, status: int, body: bytes, retry_after: str | None) -> GatewayError:
        return anthropic_error(self.name, status, body, retry_after)

    async def chat(self, call: ChatCall) -> ProviderReply:
        session = self._live_session()
        request = decode_chat(call.body)
        payload = to_anthropic(request, call.target.model, max_tokens=self._max_tokens)
        payload.pop("stream", None)
        data = await transport.post_json(
            session, self._url, orjson.dumps(payload), self._headers, self._errors, self._error
        )
        body, usage = from_anthropic(
            data, created=int(time.time()), response_tool=response_tool_name(request)
        )
        return ProviderReply(body=body, usage=usage)

    async def stream(self, call: ChatCall) -> TranslatedStream:
        session = self._live_session()
        request = decode_chat(call.body)
        payload = to_anthropic(request, call.target.model, max_tokens=self._max_tokens)
        payload["stream"] = True
        resp = await transport.open_event_stream(
            session,
            self._url,
            orjson.dumps(payload),
            self._headers,
            self._stream_timeout,
            self._errors,
            self._error,
        )
        translator = AnthropicStreamTranslator(
            self.name,
            created=int(time.time()),
            include_usage=call.request.wants_usage,
            response_tool=response_tool_name(request),
        )
        return TranslatedStream(resp, translator, self._errors)

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply:
        raise InvalidRequest(
            f"Model '{call.alias}' is served by provider '{self.name}' (anthropic), and "
            "Anthropic has no embeddings API.",
            param="model",
        )
