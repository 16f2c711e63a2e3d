"""OpenAI's Responses API on the wire, and its translation through chat.

What a target that does not serve ``/v1/responses`` itself gets (Anthropic,
Gemini, Ollama, fake, ``responses: false`` OpenAI-compatible ones):

- :func:`decode_request`: the request, every field Gandalf reads, as msgspec
  Structs; a wrong shape, an unknown item or tool type is a 400 naming it;
- :func:`chat_body`: the conversation (history from ``previous_response_id``,
  ``instructions``, ``input`` items) and options as a chat completion body,
  which the existing chat translation then carries to the provider;
- :func:`from_completion`: a chat completion turned into a Response object;
- :class:`EventWriter`: a chat completion stream (OpenAI chunk SSE, as every
  adapter yields it) turned into the Responses API's typed events, with their
  ``sequence_number``, event by event as the chunks arrive.

Field names follow the official openai SDK (``openai/types/responses``), the
ground truth of the tests.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import msgspec

from gandalf.domain import MAX_OUTPUT_TOKENS, MAX_TOOLS, Usage
from gandalf.errors import InvalidRequest, decode_body

__all__ = [
    "EventWriter",
    "ResponsesRequest",
    "chat_body",
    "decode_request",
    "from_completion",
    "input_items",
    "new_id",
]

MAX_ITEMS = 16_384  # input items per request (a gateway bound, as MAX_MESSAGES for chat)
# OpenAI's limits on ``metadata`` (kept with a stored response).
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
# An id the caller sent is echoed in an error at most this long.
_ECHO = 100


def shorten(text: str) -> str:
    """``text`` as an error message may quote it: at most ``_ECHO`` characters."""
    return text if len(text) <= _ECHO else text[:_ECHO] + "..."


def new_id(prefix: str) -> str:
    """An id as OpenAI spells them (``resp_``, ``msg_``, ``fc_`` + 48 hex digits)."""
    return prefix + os.urandom(24).hex()


# --------------------------------------------------------------------------- request


class ContentPart(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A content part of a message item: ``input_text`` / ``output_text``
    (``text``), ``input_image`` (``image_url``), ``refusal`` (``refusal``)."""

    type: str
    text: str | None = None
    image_url: str | None = None
    detail: str | None = None
    file_id: str | None = None
    refusal: str | None = None


class InputItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An input item: a message (``type`` absent or ``message``), a
    ``function_call`` or its ``function_call_output``; ``reasoning`` items
    (a previous answer's) are accepted and not translated."""

    type: str = "message"
    role: str | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None


class FunctionTool(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceObject(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str
    name: str | None = None


class TextFormat(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str  # required: omit_defaults would drop a default from the echo
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class Reasoning(msgspec.Struct, kw_only=True, omit_defaults=True):
    effort: str | None = None
    summary: str | None = None


_NULL = msgspec.Raw(b"null")
_Tokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT_TOKENS)]


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """Every field of ``POST /v1/responses`` Gandalf reads. ``input`` stays raw
    items (they are stored and, for a relayed target, sent on unchanged);
    :func:`input_items` decodes them."""

    model: str
    input: str | Annotated[list[msgspec.Raw], msgspec.Meta(max_length=MAX_ITEMS)]
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | ToolChoiceObject | None = None
    text: TextConfig | None = None
    max_output_tokens: _Tokens | None = None
    temperature: float | None = None
    top_p: float | None = None
    reasoning: Reasoning | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    stream: bool = False
    parallel_tool_calls: bool | None = None
    background: bool | None = None
    conversation: msgspec.Raw = _NULL
    prompt: msgspec.Raw = _NULL
    user: str | None = None


_request = msgspec.json.Decoder(ResponsesRequest)
_item = msgspec.json.Decoder(InputItem)
_encoder = msgspec.json.Encoder()

_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TOOL_CHOICES = frozenset({"auto", "none", "required"})
_FORMATS = frozenset({"text", "json_object", "json_schema"})


def decode_request(body: bytes) -> ResponsesRequest:
    """The request; a 400 naming the field when a shape is wrong, for a tool
    other than ``function``, a ``tool_choice`` Gandalf cannot carry, an
    unknown ``text.format``, ``background`` or ``conversation`` (state that
    lives at OpenAI, which Gandalf neither relays nor keeps)."""
    request = decode_body(_request, body)
    if isinstance(request.input, str):
        if not request.input:
            raise InvalidRequest("'input' must not be an empty string.", param="input")
    elif not request.input:
        raise InvalidRequest("'input' must contain at least one item.", param="input")
    for i, tool in enumerate(request.tools or ()):
        if tool.type != "function":
            raise InvalidRequest(
                f"Tool type '{tool.type}' (tools[{i}]) is not supported: Gandalf serves "
                "function tools only.",
                param=f"tools[{i}].type",
            )
        if not tool.name:
            raise InvalidRequest(f"Missing 'tools[{i}].name'.", param=f"tools[{i}].name")
    choice = request.tool_choice
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise InvalidRequest(
                f"Invalid 'tool_choice': '{choice}' (auto, none or required).", param="tool_choice"
            )
    elif choice is not None and (choice.type != "function" or not choice.name):
        raise InvalidRequest(
            f"'tool_choice' of type '{choice.type}' is not supported: name a function "
            "({'type': 'function', 'name': ...}) or use auto, none or required.",
            param="tool_choice",
        )
    text = request.text
    if text is not None and text.format is not None:
        kind = text.format.type
        if kind not in _FORMATS:
            raise InvalidRequest(
                f"Invalid 'text.format.type': '{kind}' (text, json_object or json_schema).",
                param="text.format.type",
            )
        if kind == "json_schema" and (text.format.schema is None or not text.format.name):
            raise InvalidRequest(
                "'text.format' of type json_schema needs a 'name' and a 'schema'.",
                param="text.format",
            )
    metadata = request.metadata
    if metadata is not None and (
        len(metadata) > METADATA_PAIRS
        or any(len(k) > METADATA_KEY or len(v) > METADATA_VALUE for k, v in metadata.items())
    ):
        raise InvalidRequest(
            f"'metadata' takes at most {METADATA_PAIRS} pairs, keys of at most {METADATA_KEY} "
            f"characters and values of at most {METADATA_VALUE}.",
            param="metadata",
        )
    if request.background:
        raise InvalidRequest(
            "'background' responses are not supported by Gandalf.", param="background"
        )
    if bytes(request.conversation) != b"null":
        raise InvalidRequest(
            "'conversation' is not supported by Gandalf: use 'previous_response_id'.",
            param="conversation",
        )
    for i, raw in enumerate(request.input if isinstance(request.input, list) else ()):
        _check_item(_decode_item(raw, i), i)
    return request


def _decode_item(raw: msgspec.Raw, i: int) -> InputItem:
    try:
        return _item.decode(raw)
    except msgspec.ValidationError as exc:
        where = str(exc).rsplit("at `$", 1)
        path = f"input[{i}]" + (where[1].rstrip("`") if len(where) == 2 else "")
        raise InvalidRequest(
            f"Invalid input item 'input[{i}]': {str(exc).split(' - at', 1)[0]}.", param=path
        ) from None


def _check_item(item: InputItem, i: int) -> None:
    kind = item.type
    if kind == "message":
        if item.role not in _ROLES:
            raise InvalidRequest(
                f"'input[{i}].role' must be user, assistant, system or developer.",
                param=f"input[{i}].role",
            )
        if item.content is None:
            raise InvalidRequest(f"Missing 'input[{i}].content'.", param=f"input[{i}].content")
        if isinstance(item.content, list):
            for j, part in enumerate(item.content):
                _check_part(part, f"input[{i}].content[{j}]")
    elif kind == "function_call":
        if not item.call_id or not item.name or item.arguments is None:
            raise InvalidRequest(
                f"'input[{i}]' (function_call) needs 'call_id', 'name' and 'arguments'.",
                param=f"input[{i}]",
            )
    elif kind == "function_call_output":
        if not item.call_id or item.output is None:
            raise InvalidRequest(
                f"'input[{i}]' (function_call_output) needs 'call_id' and 'output'.",
                param=f"input[{i}]",
            )
    elif kind != "reasoning":
        raise InvalidRequest(
            f"Input item type '{kind}' (input[{i}]) is not supported by Gandalf "
            "(message, function_call, function_call_output).",
            param=f"input[{i}].type",
        )


def _check_part(part: ContentPart, where: str) -> None:
    kind = part.type
    if kind in ("input_text", "output_text"):
        if part.text is None:
            raise InvalidRequest(f"Missing '{where}.text'.", param=f"{where}.text")
    elif kind == "input_image":
        if not part.image_url:
            raise InvalidRequest(
                f"'{where}' (input_image) needs an 'image_url' (file ids are not supported).",
                param=f"{where}.image_url",
            )
    elif kind != "refusal":
        raise InvalidRequest(
            f"Content part type '{kind}' ({where}) is not supported by Gandalf "
            "(input_text, input_image, output_text).",
            param=f"{where}.type",
        )


def input_items(request: ResponsesRequest) -> list[msgspec.Raw]:
    """The request's ``input`` as items (a string is one user message)."""
    value = request.input
    if isinstance(value, str):
        return [msgspec.Raw(_encoder.encode({"role": "user", "content": value}))]
    return value


# --------------------------------------------------------------------------- to chat


def _text_of(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text or p.refusal or "" for p in content)


def _user_content(content: str | list[ContentPart]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        if part.type == "input_image":
            image: dict[str, Any] = {"url": part.image_url}
            if part.detail is not None:
                image["detail"] = part.detail
            parts.append({"type": "image_url", "image_url": image})
        else:
            parts.append({"type": "text", "text": part.text or part.refusal or ""})
    return parts


def _messages(items: list[msgspec.Raw], instructions: str | None) -> list[dict[str, Any]]:
    """The conversation as chat messages: consecutive function calls (and the
    assistant text right before them) become one assistant message with
    ``tool_calls``; each output a ``tool`` message."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    calls: set[str] = set()  # the call ids seen so far: an output answers one of them
    for i, raw in enumerate(items):
        item = _decode_item(raw, i)
        _check_item(item, i)
        kind = item.type
        if kind == "message":
            role = "system" if item.role == "developer" else item.role
            assert item.content is not None and role is not None
            if role == "assistant":
                messages.append({"role": "assistant", "content": _text_of(item.content)})
            elif role == "system":
                messages.append({"role": "system", "content": _text_of(item.content)})
            else:
                messages.append({"role": role, "content": _user_content(item.content)})
        elif kind == "function_call":
            assert item.call_id is not None  # _check_item
            calls.add(item.call_id)
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments or ""},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if not last["content"]:
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if item.call_id not in calls:
                # A chat target refuses a tool message that answers no tool call
                # (or, like the fake, answers nothing): say which item it is.
                raise InvalidRequest(
                    f"No function_call with call_id '{shorten(item.call_id or '')}' comes "
                    f"before 'input[{i}]' (function_call_output).",
                    param=f"input[{i}].call_id",
                )
            messages.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": _text_of(item.output)}
            )
        # reasoning items: a previous answer's thoughts, for its own provider only
    return messages


def chat_body(request: ResponsesRequest, items: list[msgspec.Raw], *, reasoning: bool) -> bytes:
    """The chat completion body that asks a chat-only target the same thing:
    ``items`` (the whole conversation) as messages, the options translated.
    ``reasoning``: the target takes ``reasoning_effort`` (an OpenAI-format
    one); else ``reasoning.effort`` is a 400 naming it."""
    if bytes(request.prompt) != b"null":
        raise InvalidRequest(
            "Parameter 'prompt' (a prompt template stored at OpenAI) is not supported by this "
            "model's provider.",
            param="prompt",
        )
    body: dict[str, Any] = {
        "model": request.model,
        "messages": _messages(items, request.instructions),
    }
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if request.max_output_tokens is not None:
        body["max_completion_tokens"] = request.max_output_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.tools:
        tools = []
        for tool in request.tools:
            function: dict[str, Any] = {"name": tool.name}
            if tool.description is not None:
                function["description"] = tool.description
            if tool.parameters is not None:
                function["parameters"] = tool.parameters
            if tool.strict is not None:
                function["strict"] = tool.strict
            tools.append({"type": "function", "function": function})
        body["tools"] = tools
    choice = request.tool_choice
    if isinstance(choice, str):
        body["tool_choice"] = choice
    elif choice is not None:
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    text = request.text
    if text is not None and text.format is not None and text.format.type != "text":
        fmt = text.format
        if fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        else:
            schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema}
            if fmt.description is not None:
                schema["description"] = fmt.description
            if fmt.strict is not None:
                schema["strict"] = fmt.strict
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
    effort = request.reasoning.effort if request.reasoning is not None else None
    if effort is not None:
        if not reasoning:
            raise InvalidRequest(
                "Parameter 'reasoning.effort' is not supported by this model's provider "
                "(only OpenAI-compatible ones take it).",
                param="reasoning.effort",
            )
        body["reasoning_effort"] = effort
    return _encoder.encode(body)


# --------------------------------------------------------------------------- the Response object


class OutputText(msgspec.Struct, kw_only=True):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)
    type: str = "output_text"


class OutputMessage(msgspec.Struct, kw_only=True):
    id: str
    content: list[OutputText]
    status: str = "completed"
    role: str = "assistant"
    type: str = "message"


class FunctionCallItem(msgspec.Struct, kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"
    type: str = "function_call"


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


def response_usage(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            usage.cached_prompt_tokens, usage.cache_write_tokens
        ),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(usage.reasoning_tokens),
        total_tokens=usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
    )


class IncompleteDetails(msgspec.Struct):
    reason: str


class ResponseObject(msgspec.Struct, kw_only=True):
    """A Response (``object: response``), with the request's settings echoed."""

    id: str
    created_at: float
    model: str
    status: str
    output: list[OutputItem]
    instructions: str | None
    tools: list[FunctionTool]
    tool_choice: str | ToolChoiceObject
    parallel_tool_calls: bool
    temperature: float | None
    top_p: float | None
    max_output_tokens: int | None
    previous_response_id: str | None
    reasoning: Reasoning | None
    store: bool
    text: TextConfig
    metadata: dict[str, str]
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: None = None
    truncation: str = "disabled"
    user: str | None = None
    object: str = "response"


def skeleton(request: ResponsesRequest, response_id: str, created_at: float) -> ResponseObject:
    """The Response to ``request`` before any output (status ``in_progress``)."""
    text = request.text or TextConfig()
    if text.format is None:
        text = TextConfig(format=TextFormat(type="text"), verbosity=text.verbosity)
    return ResponseObject(
        id=response_id,
        created_at=created_at,
        model=request.model,
        status="in_progress",
        output=[],
        instructions=request.instructions,
        tools=list(request.tools or ()),
        tool_choice=request.tool_choice if request.tool_choice is not None else "auto",
        parallel_tool_calls=(
            request.parallel_tool_calls if request.parallel_tool_calls is not None else True
        ),
        temperature=request.temperature,
        top_p=request.top_p,
        max_output_tokens=request.max_output_tokens,
        previous_response_id=request.previous_response_id,
        reasoning=request.reasoning,
        store=request.store,
        text=text,
        metadata=request.metadata or {},
        user=request.user,
    )


def _finish(response: ResponseObject, finish_reason: str | None, usage: Usage | None) -> None:
    if finish_reason == "length":
        response.status = "incomplete"
        response.incomplete_details = IncompleteDetails("max_output_tokens")
    elif finish_reason == "content_filter":
        response.status = "incomplete"
        response.incomplete_details = IncompleteDetails("content_filter")
    else:
        response.status = "completed"
    response.usage = response_usage(usage) if usage is not None else None


class _Fn(msgspec.Struct):
    name: str = ""
    arguments: str = ""


class _ToolCall(msgspec.Struct):
    id: str | None = None
    function: _Fn = msgspec.field(default_factory=_Fn)


class _Message(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    message: _Message = msgspec.field(default_factory=_Message)
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)


_completion = msgspec.json.Decoder(_Completion)


def from_completion(
    request: ResponsesRequest, response_id: str, completion: bytes, usage: Usage
) -> ResponseObject:
    """The Response a chat completion (OpenAI's format, as every adapter
    answers) amounts to: its text as one message item, each tool call a
    ``function_call`` item."""
    response = skeleton(request, response_id, time.time())
    decoded = _completion.decode(completion)
    choice = decoded.choices[0] if decoded.choices else _Choice()
    message = choice.message
    text = message.content or message.refusal
    if text:
        response.output.append(OutputMessage(id=new_id("msg_"), content=[OutputText(text=text)]))
    for call in message.tool_calls or ():
        response.output.append(
            FunctionCallItem(
                id=new_id("fc_"),
                call_id=call.id or new_id("call_"),
                name=call.function.name,
                arguments=call.function.arguments,
            )
        )
    _finish(response, choice.finish_reason, usage)
    return response


def encode(value: object) -> bytes:
    return _encoder.encode(value)


# --------------------------------------------------------------------------- the stream


class _DeltaFn(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _DeltaCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _DeltaFn | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_DeltaCall] | None = None


class _ChunkChoice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_ChunkChoice] = msgspec.field(default_factory=list)


_chunk = msgspec.json.Decoder(_Chunk)


class EventWriter:
    """A chat completion stream's SSE bytes in, the Responses API's events
    out. :meth:`start` gives ``response.created`` / ``response.in_progress``;
    :meth:`feed` the events of whatever complete chunks arrived; :meth:`finish`
    closes the open items and gives ``response.completed`` (or
    ``response.incomplete``), after which :attr:`response` is the whole Response."""

    __slots__ = ("_buffer", "_calls", "_finish_reason", "_message", "_seq", "response")

    def __init__(self, request: ResponsesRequest, response_id: str) -> None:
        self.response = skeleton(request, response_id, time.time())
        self._seq = 0
        self._buffer = b""
        self._message: tuple[int, OutputMessage] | None = None  # (output index, item) open
        self._calls: dict[int, tuple[int, FunctionCallItem]] = {}  # chat index -> open call
        self._finish_reason: str | None = None

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        fields["type"] = kind
        fields["sequence_number"] = self._seq
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(fields) + b"\n\n"

    def _added(self, index: int, item: OutputItem) -> bytes:
        return self._event("response.output_item.added", {"output_index": index, "item": item})

    def start(self) -> bytes:
        response = self.response
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            block, buffer = buffer[:end], buffer[end + 2 :]
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload and payload != b"[DONE]":
                        self._chunk(payload, out)
        self._buffer = buffer
        return b"".join(out)

    def _chunk(self, payload: bytes, out: list[bytes]) -> None:
        try:
            chunk = _chunk.decode(payload)
        except msgspec.DecodeError:
            return  # not a chunk (an adapter's comment or error event): nothing to add
        for choice in chunk.choices[:1]:
            delta = choice.delta
            text = delta.content or delta.refusal
            if text:
                self._text(text, out)
            for call in delta.tool_calls or ():
                self._call(call, out)
            if choice.finish_reason is not None:
                self._finish_reason = choice.finish_reason

    def _text(self, text: str, out: list[bytes]) -> None:
        opened = self._message
        if opened is None:
            index = len(self.response.output)
            item = OutputMessage(id=new_id("msg_"), content=[], status="in_progress")
            self.response.output.append(item)
            opened = self._message = (index, item)
            out.append(
                self._event("response.output_item.added", {"output_index": index, "item": item})
            )
            out.append(
                self._event(
                    "response.content_part.added",
                    {
                        "item_id": item.id,
                        "output_index": index,
                        "content_index": 0,
                        "part": OutputText(text=""),
                    },
                )
            )
            item.content.append(OutputText(text=""))
        index, item = opened
        item.content[0].text += text
        out.append(
            self._event(
                "response.output_text.delta",
                {
                    "item_id": item.id,
                    "output_index": index,
                    "content_index": 0,
                    "delta": text,
                    "logprobs": [],
                },
            )
        )

    def _close_message(self, out: list[bytes]) -> None:
        opened = self._message
        if opened is None:
            return
        self._message = None
        index, item = opened
        part = item.content[0]
        common = {"item_id": item.id, "output_index": index, "content_index": 0}
        out.append(
            self._event("response.output_text.done", {**common, "text": part.text, "logprobs": []})
        )
        out.append(self._event("response.content_part.done", {**common, "part": part}))
        item.status = "completed"
        out.append(self._event("response.output_item.done", {"output_index": index, "item": item}))

    def _call(self, call: _DeltaCall, out: list[bytes]) -> None:
        opened = self._calls.get(call.index)
        function = call.function
        if opened is None:
            self._close_message(out)  # text before the calls is its own item
            index = len(self.response.output)
            item = FunctionCallItem(
                id=new_id("fc_"),
                call_id=call.id or new_id("call_"),
                name=(function.name if function is not None else None) or "",
                arguments="",
                status="in_progress",
            )
            self.response.output.append(item)
            opened = self._calls[call.index] = (index, item)
            out.append(
                self._event("response.output_item.added", {"output_index": index, "item": item})
            )
        index, item = opened
        if function is not None and function.arguments:
            item.arguments += function.arguments
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    {"item_id": item.id, "output_index": index, "delta": function.arguments},
                )
            )

    def finish(self, usage: Usage | None) -> bytes:
        """The rest of the buffered stream, the open items closed, and the final event."""
        out: list[bytes] = []
        if self._buffer:
            self._buffer += b"\n\n"
            out.append(self.feed(b""))
        self._close_message(out)
        for index, item in self._calls.values():
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    {"item_id": item.id, "output_index": index, "arguments": item.arguments},
                )
            )
            item.status = "completed"
            out.append(
                self._event("response.output_item.done", {"output_index": index, "item": item})
            )
        self._calls = {}
        response = self.response
        _finish(response, self._finish_reason, usage)
        kind = "response.completed" if response.status == "completed" else "response.incomplete"
        out.append(self._event(kind, {"response": response}))
        return b"".join(out)
