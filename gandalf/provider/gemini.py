"""The Gemini adapter: OpenAI chat completions and embeddings, translated to and
from Google's Gemini API (``generativelanguage.googleapis.com``, ``v1beta``).

Requests
  system/developer messages become ``systemInstruction``; user -> ``user``,
  assistant -> ``model``, tool results -> ``functionResponse`` parts of a
  ``user`` content; consecutive contents of one role are merged (Gemini wants
  roles to alternate). Images must be ``data:`` URLs (Gemini cannot fetch
  arbitrary http URLs). Tools use ``parametersJsonSchema`` so any standard JSON
  Schema (``additionalProperties``, ``$ref``...) goes through unchanged.

Parameters
  translated: temperature, top_p, max_tokens/max_completion_tokens, stop, n,
  seed, presence_penalty, frequency_penalty, tools, tool_choice,
  response_format (json_object, json_schema), stream, stream_options.

  refused with a 400 naming the parameter (they would change the answer's
  meaning): ``logprobs: true``, ``top_logprobs``, a non-empty ``logit_bias``,
  audio output (``modalities`` with ``"audio"``, ``audio``).

  ignored (no effect on the answer's meaning): user, parallel_tool_calls
  (Gemini decides), prediction, store, metadata, service_tier, and a tool's
  ``strict`` flag (Gemini has no strict mode).

Tool call ids and thought signatures
  Thinking models (Gemini 2.5, 3) put a ``thoughtSignature`` on functionCall
  parts and Gemini 3 rejects the next turn unless it comes back on the same
  part. OpenAI clients only echo a tool call's ``id``, and OpenAI and Azure
  refuse ids over 40 characters (a conversation may move between providers),
  so ids stay short and the signature stays in Gandalf (``_signatures``):

      call_s<24 hex>     a call with a signature (and Gemini's own id, if
                         any): both kept per provider in this worker's memory
      <Gemini's id>      a call without a signature, Gemini's id when it sent
                         one of at most 40 characters in ``[A-Za-z0-9_-]``
      call_<24 hex>      otherwise (minted here)

  Going back, a ``call_s`` id gets its signature and Gemini's id back; one
  this worker does not know (another worker or instance, or expired) gets
  Gemini's documented placeholder ``skip_thought_signature_validator``.
  Gemini's own ids are sent back as functionCall/functionResponse ids; minted
  ones (``call_``, which Gemini never issued) are not. Ids of the former
  format ``<base>__ts__<signature in base64url>`` are still read.

Answers
  One choice per candidate; ``thought: true`` parts (thought summaries) are
  dropped; usage: prompt = ``promptTokenCount``, completion =
  ``candidatesTokenCount + thoughtsTokenCount`` (Gemini bills thinking as
  output), ``cached_tokens`` = ``cachedContentTokenCount``, ``reasoning_tokens``
  = ``thoughtsTokenCount``. A signature on a text part (no function call) has
  no OpenAI home and is dropped (Gemini only requires function-call ones).

Embeddings
  ``:batchEmbedContents``, one request per input string; token-array inputs
  are refused. Gemini reports no token counts for embeddings: usage is its
  ``usageMetadata`` when present, else zeros.
"""

from __future__ import annotations

import base64
import re
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import quote

import msgspec
import orjson

from gandalf.domain import ChatCall, EmbeddingsCall, ProviderConfig, ProviderReply, Usage
from gandalf.errors import GatewayError, InvalidRequest, UpstreamAuthError, UpstreamError
from gandalf.provider import transport
from gandalf.provider._openai_chat import (
    DONE,
    ChatCompletionRequest,
    ChunkWriter,
    EmbeddingsInput,
    ImagePart,
    Message,
    NamedToolChoice,
    Part,
    TextPart,
    TranslatedStream,
    assistant_message,
    completion,
    decode_chat,
    decode_embeddings,
    parse_arguments,
    parse_data_url,
    reject,
    text_of,
    tool_call_object,
    usage_object,
)
from gandalf.provider._signatures import KEPT_PREFIX, SKIP_SIGNATURE, Signatures
from gandalf.provider.usage import usage_from_gemini

PROVIDER_TYPE = "gemini"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
API_VERSION = "/v1beta"

# --------------------------------------------------------------------------- tool call ids

SIGNATURE_MARKER = "__ts__"
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")  # an id any OpenAI-compatible API accepts
_MINTED_PREFIX = "call_"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_TO_URLSAFE = str.maketrans("+/", "-_")
_FROM_URLSAFE = str.maketrans("-_", "+/")


def new_call_id() -> str:
    """A tool call id for a functionCall that came without one."""
    return _MINTED_PREFIX + secrets.token_hex(12)


def new_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def join_call_id(base: str, signature: str | None) -> str:
    """The OpenAI tool call id carrying ``signature`` (standard base64) after ``base``."""
    if not signature:
        return base
    return base + SIGNATURE_MARKER + signature.translate(_TO_URLSAFE).rstrip("=")


def split_call_id(call_id: str) -> tuple[str, str | None]:
    """``(base, signature)`` of an OpenAI tool call id; the signature back in
    the padded standard base64 Gemini sent, None when the id carries none."""
    base, marker, tail = call_id.partition(SIGNATURE_MARKER)
    if not marker or not base or len(tail) % 4 == 1 or _BASE64URL.fullmatch(tail) is None:
        return call_id, None
    signature = tail.translate(_FROM_URLSAFE)
    return base, signature + "=" * (-len(signature) % 4)


def _gemini_id(base: str) -> str | None:
    """The id to send Gemini for a call: its own, never one it did not issue."""
    return None if base.startswith(_MINTED_PREFIX) else base


# --------------------------------------------------------------------------- request


def _parts_of(content: str | list[Part] | None, where: str) -> list[dict[str, Any]]:
    """Gemini parts of a message content; empty strings are dropped."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            if part.text:
                parts.append({"text": part.text})
        elif isinstance(part, ImagePart):
            param = f"{where}.content[{j}].image_url.url"
            data_url = parse_data_url(part.image_url.url, param)
            if data_url is None:
                raise reject(
                    param,
                    PROVIDER_TYPE,
                    "Gemini cannot fetch image URLs; send images as data: URLs "
                    "(data:<media type>;base64,<data>)",
                )
            media_type, data = data_url
            parts.append({"inlineData": {"mimeType": media_type, "data": data}})
    return parts


def _function_response(message: Message, name: str, call_id: str | None) -> dict[str, Any]:
    text = text_of(message.content)
    response: Any = None
    if text.lstrip().startswith("{"):
        try:
            response = orjson.loads(text)
        except orjson.JSONDecodeError:
            response = None
    if not isinstance(response, dict):
        response = {"content": text}
    call: dict[str, Any] = {"name": name, "response": response}
    if call_id is not None:
        call = {"id": call_id, **call}
    return {"functionResponse": call}


def _contents(
    messages: list[Message], signatures: Signatures | None
) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, Gemini contents with same-role neighbours merged)."""
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    # OpenAI tool call id -> (function name, Gemini's call id), from earlier calls
    names: dict[str, tuple[str, str | None]] = {}

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return  # Gemini rejects a content without parts
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.role
        if role in ("system", "developer"):
            text = text_of(message.content)
            if text:
                system.append(text)
        elif role == "user":
            add("user", _parts_of(message.content, where))
        elif role == "assistant":
            parts = _parts_of(message.content, where)
            for j, call in enumerate(message.tool_calls or ()):
                param = f"{where}.tool_calls[{j}].function.arguments"
                args = parse_arguments(call.function.arguments, param)
                base, signature = split_call_id(call.id)  # ids of the former format too
                function_call: dict[str, Any] = {"name": call.function.name, "args": args}
                call_id = _gemini_id(base)
                if signature is None and base.startswith(KEPT_PREFIX):
                    kept = signatures.find(base) if signatures is not None else None
                    # Not kept here (another worker, expired): Gemini's placeholder.
                    call_id, signature = kept if kept is not None else (None, SKIP_SIGNATURE)
                if call_id is not None:
                    function_call = {"id": call_id, **function_call}
                part: dict[str, Any] = {"functionCall": function_call}
                if signature is not None:
                    part["thoughtSignature"] = signature
                parts.append(part)
                names[call.id] = (call.function.name, call_id)
            add("model", parts)
        elif role == "tool":
            param = f"{where}.tool_call_id"
            if message.tool_call_id is None:
                raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
            named = names.get(message.tool_call_id)
            if named is None:
                raise InvalidRequest(
                    f"Invalid '{param}': no earlier assistant tool call has the id "
                    f"'{message.tool_call_id}'.",
                    param=param,
                )
            add("user", [_function_response(message, *named)])
        else:
            raise InvalidRequest(
                f"Invalid value for '{where}.role': '{role}'; expected system, developer, "
                "user, assistant or tool.",
                param=f"{where}.role",
            )
    return system, contents


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    if request.logprobs:
        raise reject("logprobs", PROVIDER_TYPE)
    if request.top_logprobs:
        raise reject("top_logprobs", PROVIDER_TYPE)
    if request.logit_bias:
        raise reject("logit_bias", PROVIDER_TYPE)
    if request.modalities and "audio" in request.modalities:
        raise reject("modalities", PROVIDER_TYPE, "audio output is not available")
    if request.audio is not None:
        raise reject("audio", PROVIDER_TYPE, "audio output is not available")


def _tools(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    declarations = []
    for i, tool in enumerate(request.tools or ()):
        if tool.type != "function":
            raise reject(f"tools[{i}].type", PROVIDER_TYPE, f"tool type '{tool.type}'")
        function = tool.function
        declaration: dict[str, Any] = {"name": function.name}
        if function.description is not None:
            declaration["description"] = function.description
        if function.parameters is not None:
            declaration["parametersJsonSchema"] = function.parameters
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}] if declarations else []


_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}


def _tool_config(choice: str | NamedToolChoice) -> dict[str, Any]:
    if isinstance(choice, NamedToolChoice):
        config: dict[str, Any] = {
            "mode": "ANY",
            "allowedFunctionNames": [choice.function.name],
        }
    else:
        mode = _MODES.get(choice)
        if mode is None:
            raise InvalidRequest(
                f"Invalid value for 'tool_choice': '{choice}'; expected none, auto, required "
                "or a named function.",
                param="tool_choice",
            )
        config = {"mode": mode}
    return {"functionCallingConfig": config}


def _generation_config(request: ChatCompletionRequest) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.output_limit is not None:
        config["maxOutputTokens"] = request.output_limit
    stop = request.stop_list
    if stop:
        config["stopSequences"] = stop
    if request.n is not None and request.n > 1:
        config["candidateCount"] = request.n
    if request.seed is not None:
        config["seed"] = request.seed
    if request.presence_penalty is not None:
        config["presencePenalty"] = request.presence_penalty
    if request.frequency_penalty is not None:
        config["frequencyPenalty"] = request.frequency_penalty
    fmt = request.response_format
    if fmt is not None:
        if fmt.type == "json_object":
            config["responseMimeType"] = "application/json"
        elif fmt.type == "json_schema":
            config["responseMimeType"] = "application/json"
            if fmt.json_schema is not None and fmt.json_schema.schema is not None:
                config["responseJsonSchema"] = fmt.json_schema.schema
        elif fmt.type != "text":
            raise InvalidRequest(
                f"Invalid value for 'response_format.type': '{fmt.type}'; expected text, "
                "json_object or json_schema.",
                param="response_format.type",
            )
    return config


def to_gemini(
    request: ChatCompletionRequest, signatures: Signatures | None = None
) -> dict[str, Any]:
    """The ``generateContent`` body for ``request`` (the model goes in the URL).
    Raises InvalidRequest (400 naming the parameter) for what Gemini cannot do.
    ``signatures``: where the thought signatures of earlier answers are kept."""
    _refuse_unsupported(request)
    system, contents = _contents(request.messages, signatures)
    if not contents:
        raise InvalidRequest(
            "Invalid 'messages': Gemini needs at least one non-empty user or assistant message.",
            param="messages",
        )
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    tools = _tools(request)
    tool_config = None if request.tool_choice is None else _tool_config(request.tool_choice)
    if tools:
        body["tools"] = tools
        if tool_config is not None:
            body["toolConfig"] = tool_config
    # A tool_choice without tools has nothing to choose from: no toolConfig.
    config = _generation_config(request)
    if config:
        body["generationConfig"] = config
    return body


# --------------------------------------------------------------------------- response


class _FunctionCall(msgspec.Struct):
    name: str
    args: dict[str, Any] | None = None
    id: str | None = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    thought_signature: str | None = None
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] = []
    role: str | None = None


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None
    index: int = 0  # proto3 JSON leaves out zero values: no index means 0


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int | None = None
    cached_content_token_count: int | None = None
    total_token_count: int = 0


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    prompt_feedback: _PromptFeedback | None = None
    usage_metadata: _UsageMetadata | None = None
    model_version: str | None = None
    response_id: str | None = None
    error: dict[str, Any] | None = None  # an error event of a stream


_response_decoder = msgspec.json.Decoder(_Response)

_FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)


def finish_reason(reason: str | None, called_tools: bool) -> str:
    """OpenAI's finish_reason for a Gemini candidate's ``finishReason``."""
    if reason == "MAX_TOKENS":
        return "length"
    if reason in _FILTERED:
        return "content_filter"
    # STOP and everything else (OTHER, LANGUAGE, MALFORMED_FUNCTION_CALL, ...)
    # ended the answer normally as far as an OpenAI client can tell.
    return "tool_calls" if called_tools else "stop"


def _usage(meta: _UsageMetadata | None) -> tuple[dict[str, Any], Usage]:
    """OpenAI's usage object and the domain Usage of a ``usageMetadata``."""
    if meta is None:
        meta = _UsageMetadata()
    thoughts = meta.thoughts_token_count
    domain = usage_from_gemini(
        meta.prompt_token_count,
        meta.candidates_token_count,
        thoughts or 0,
        meta.cached_content_token_count or 0,
    )
    wire = usage_object(
        domain.prompt_tokens,
        domain.completion_tokens,
        cached=domain.cached_prompt_tokens,
        reasoning=thoughts,
    )
    return wire, domain


def _arguments(call: _FunctionCall) -> str:
    return orjson.dumps(call.args if call.args is not None else {}).decode()


def _call_id(
    part: _Part,
    call: _FunctionCall,
    new_call_id: Callable[[], str],
    signatures: Signatures | None,
) -> str:
    """The OpenAI id of a functionCall: at most 40 characters (OpenAI's and
    Azure's limit), its signature kept in ``signatures`` (None: dropped)."""
    signature = part.thought_signature
    if signature and signatures is not None:
        return signatures.keep(call.id, signature)
    gemini_id = call.id
    if gemini_id and _PLAIN_ID.fullmatch(gemini_id) is not None:
        return gemini_id
    return new_call_id()


def _decode_response(body: bytes, provider: str) -> _Response:
    try:
        return _response_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError(
            f"Upstream provider '{provider}' returned a body that is not a Gemini "
            "GenerateContentResponse."
        ) from None


def from_gemini(
    body: bytes,
    *,
    model: str,
    created: int,
    completion_id: str,
    new_call_id: Callable[[], str],
    provider: str = PROVIDER_TYPE,
    signatures: Signatures | None = None,
) -> tuple[bytes, Usage]:
    """An OpenAI ``chat.completion`` body and its usage, from a
    ``generateContent`` answer. A malformed body is an UpstreamError (502)."""
    response = _decode_response(body, provider)
    if response.error is not None:
        code = response.error.get("code")
        raise gemini_error(provider, code if isinstance(code, int) else 500, body, None)
    choices: list[tuple[dict[str, Any], str]] = []
    for candidate in sorted(response.candidates, key=lambda c: c.index):
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in candidate.content.parts if candidate.content is not None else ():
            if part.thought:
                continue
            if part.function_call is not None:
                call = part.function_call
                calls.append(
                    tool_call_object(
                        _call_id(part, call, new_call_id, signatures), call.name, _arguments(call)
                    )
                )
            elif part.text:
                texts.append(part.text)
        text = "".join(texts)
        message = assistant_message(text if text or not calls else None, calls)
        choices.append((message, finish_reason(candidate.finish_reason, bool(calls))))
    if not choices:
        feedback = response.prompt_feedback
        if feedback is None or feedback.block_reason is None:
            raise UpstreamError(
                f"Upstream provider '{provider}' returned no candidates and no block reason."
            )
        choices.append((assistant_message("", []), "content_filter"))
    wire, usage = _usage(response.usage_metadata)
    out = completion(
        completion_id=response.response_id or completion_id,
        model=response.model_version or model,
        created=created,
        choices=choices,
        usage=wire,
    )
    return out, usage


# --------------------------------------------------------------------------- stream


class GeminiStreamTranslator:
    """``streamGenerateContent?alt=sse`` events -> OpenAI chunks, per event.

    Each event is a whole GenerateContentResponse holding the next pieces of
    each candidate; functionCall parts arrive whole. ``usageMetadata`` is
    cumulative: the latest one is the answer's usage (never summed). The
    chunk ``id``/``model`` are the first event's ``responseId``/``modelVersion``
    when present, as for non-streamed answers.
    """

    __slots__ = (
        "_completion_id",
        "_created",
        "_events",
        "_finished",
        "_include_usage",
        "_meta",
        "_model",
        "_new_call_id",
        "_provider",
        "_signatures",
        "_started",
        "_tools",
        "_writer",
    )

    def __init__(
        self,
        *,
        model: str,
        created: int,
        completion_id: str,
        include_usage: bool,
        new_call_id: Callable[[], str],
        provider: str = PROVIDER_TYPE,
        signatures: Signatures | None = None,
    ) -> None:
        self._signatures = signatures
        self._model = model
        self._created = created
        self._completion_id = completion_id
        self._include_usage = include_usage
        self._new_call_id = new_call_id
        self._provider = provider
        self._writer: ChunkWriter | None = None
        self._started: set[int] = set()  # candidates whose role chunk went out
        self._finished: set[int] = set()
        self._tools: dict[int, int] = {}  # candidate -> tool calls sent
        self._meta: _UsageMetadata | None = None
        self._events = 0

    @property
    def usage(self) -> Usage | None:
        meta = self._meta
        return None if meta is None else _usage(meta)[1]

    @property
    def events(self) -> int:
        return self._events

    def feed(self, event: bytes, data: bytes) -> bytes:
        try:
            chunk = _response_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            # An error event may come wrapped in a list, as Google's HTTP errors do.
            if data.lstrip().startswith(b"[") and b'"error"' in data:
                raise gemini_error(self._provider, 500, data, None) from None
            raise UpstreamError(
                f"Upstream provider '{self._provider}' sent a stream event that is not a "
                "Gemini GenerateContentResponse."
            ) from None
        if chunk.error is not None:
            code = chunk.error.get("code")
            raise gemini_error(self._provider, code if isinstance(code, int) else 500, data, None)
        writer = self._writer
        if writer is None:
            writer = self._writer = ChunkWriter(
                chunk.response_id or self._completion_id,
                chunk.model_version or self._model,
                self._created,
            )
        if chunk.usage_metadata is not None:
            self._meta = chunk.usage_metadata  # cumulative: the latest replaces the last
        out: list[bytes] = []
        for candidate in chunk.candidates:
            index = candidate.index
            if index in self._finished:
                continue  # nothing may follow a finish chunk
            if index not in self._started:
                self._started.add(index)
                out.append(writer.role(index))
            for part in candidate.content.parts if candidate.content is not None else ():
                if part.thought:
                    continue
                call = part.function_call
                if call is not None:
                    tool = self._tools.get(index, 0)
                    self._tools[index] = tool + 1
                    call_id = _call_id(part, call, self._new_call_id, self._signatures)
                    out.append(writer.tool_start(tool, call_id, call.name, index))
                    out.append(writer.tool_arguments(tool, _arguments(call), index))
                    self._events += 2
                elif part.text:
                    out.append(writer.content(part.text, index))
                    self._events += 1
            if candidate.finish_reason is not None:
                self._finished.add(index)
                reason = finish_reason(candidate.finish_reason, index in self._tools)
                out.append(writer.finish(reason, index))
        feedback = chunk.prompt_feedback
        if (
            not chunk.candidates
            and not self._started
            and feedback is not None
            and feedback.block_reason is not None
        ):
            # The prompt itself was blocked: no candidate will ever come.
            self._started.add(0)
            self._finished.add(0)
            out.append(writer.role(0))
            out.append(writer.finish("content_filter", 0))
        return b"".join(out)

    def finish(self) -> bytes:
        writer = self._writer
        if writer is None or not self._started or self._started - self._finished:
            raise UpstreamError(
                f"Upstream provider '{self._provider}' ended the stream before finishing."
            )
        if not self._include_usage:
            return DONE
        return writer.usage(_usage(self._meta)[0]) + DONE


# --------------------------------------------------------------------------- embeddings


class _Embedding(msgspec.Struct):
    values: list[float]


class _EmbeddingsUsage(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    total_token_count: int = 0


class _EmbeddingsResponse(msgspec.Struct, rename="camel"):
    embeddings: list[_Embedding]
    usage_metadata: _EmbeddingsUsage | None = None


_embeddings_decoder = msgspec.json.Decoder(_EmbeddingsResponse)


def resource_name(model: str) -> str:
    """``models/<model>`` (a name already starting ``models/`` or
    ``tunedModels/`` is kept)."""
    if model.startswith(("models/", "tunedModels/")):
        return model
    return "models/" + model


def to_gemini_embeddings(request: EmbeddingsInput, model: str) -> dict[str, Any]:
    """The ``batchEmbedContents`` body: one request per input string."""
    raw = request.input
    texts: list[str]
    if isinstance(raw, str):
        texts = [raw]
    elif all(isinstance(item, str) for item in raw):
        texts = cast(list[str], raw)
    else:
        raise reject("input", PROVIDER_TYPE, "token arrays cannot be sent; send strings")
    if not texts or any(text == "" for text in texts):
        raise InvalidRequest(
            "Invalid 'input': expected a non-empty string or a non-empty list of "
            "non-empty strings.",
            param="input",
        )
    fmt = request.encoding_format
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest(
            f"Invalid value for 'encoding_format': '{fmt}'; expected float or base64.",
            param="encoding_format",
        )
    name = resource_name(model)
    requests = []
    for text in texts:
        item: dict[str, Any] = {"model": name, "content": {"parts": [{"text": text}]}}
        if request.dimensions is not None:
            item["outputDimensionality"] = request.dimensions
        requests.append(item)
    return {"requests": requests}


def from_gemini_embeddings(
    body: bytes,
    *,
    model: str,
    encoding_format: str | None,
    expected: int | None = None,
    provider: str = PROVIDER_TYPE,
) -> tuple[bytes, Usage]:
    """OpenAI's embeddings list from a ``batchEmbedContents`` answer (base64:
    little-endian float32). Usage is ``usageMetadata`` when Gemini sends it,
    else zeros. ``expected``: the number of inputs; another count is a 502."""
    try:
        response = _embeddings_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError(
            f"Upstream provider '{provider}' returned a body that is not a Gemini "
            "BatchEmbedContentsResponse."
        ) from None
    if expected is not None and len(response.embeddings) != expected:
        raise UpstreamError(
            f"Upstream provider '{provider}' returned {len(response.embeddings)} embeddings "
            f"for {expected} inputs."
        )
    as_base64 = encoding_format == "base64"
    data = []
    for index, embedding in enumerate(response.embeddings):
        values = embedding.values
        vector: Any = (
            base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            if as_base64
            else values
        )
        data.append({"object": "embedding", "index": index, "embedding": vector})
    meta = response.usage_metadata
    prompt = meta.prompt_token_count if meta is not None else 0
    total = (meta.total_token_count or prompt) if meta is not None else 0
    out = orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": total},
        }
    )
    return out, Usage(prompt_tokens=prompt, total_tokens=total)


# --------------------------------------------------------------------------- errors

_AUTH_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"})
_STATUS_CODES = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def _google_error(body: bytes) -> tuple[str | None, str | None, set[str]]:
    """(``status``, ``message``, detail reasons) of a Google error body, which
    may come wrapped in a list; Nones when it is not one."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, set()
    if isinstance(value, list) and value:
        value = value[0]
    error = value.get("error") if isinstance(value, dict) else None
    if not isinstance(error, dict):
        return None, None, set()
    status = error.get("status")
    message = error.get("message")
    reasons: set[str] = set()
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and isinstance(detail.get("reason"), str):
            reasons.add(detail["reason"])
    return (
        status if isinstance(status, str) else None,
        message if isinstance(message, str) else None,
        reasons,
    )


def gemini_error(provider: str, status: int, body: bytes, retry_after: str | None) -> GatewayError:
    """The gateway error for a non-2xx Gemini answer (or an error event).

    Google answers a bad API key with 400 INVALID_ARGUMENT "API key not
    valid": like 401/403 that is the gateway's credentials, not the caller's
    request (UpstreamAuthError, 502)."""
    google_status, message, reasons = _google_error(body)
    if message is None:
        text = body[:500].decode("utf-8", "replace").strip()
        message = text or f"HTTP {status}"
    if reasons & _AUTH_REASONS or (status == 400 and "API key not valid" in message):
        return UpstreamAuthError(
            f"Upstream provider '{provider}' rejected the gateway's API key ({message}); "
            "check the provider's api_key."
        )
    code = _STATUS_CODES.get(google_status or "", status)
    if status in (401, 403) or code in (401, 403):
        return transport.status_error(provider, 403 if code == 403 else 401, message, None)
    if code == 503 or status == 503:
        return transport.status_error(provider, 503, message, retry_after, overloaded=True)
    if code == 429:
        return transport.status_error(provider, 429, message, retry_after)
    if code == 404:
        error_code = "model_not_found" if "model" in message.lower() else None
        return transport.status_error(provider, 404, message, retry_after, error_code=error_code)
    if code == 400:
        return transport.status_error(provider, 400, message, retry_after)
    return transport.status_error(provider, status, message, retry_after)


# --------------------------------------------------------------------------- provider


def model_path(model: str) -> str:
    """The URL path of a model resource: ``models/<quoted id>``."""
    for prefix in ("models/", "tunedModels/"):
        if model.startswith(prefix):
            return prefix + quote(model[len(prefix) :], safe="")
    return "models/" + quote(model, safe="")


def api_base(base_url: str) -> str:
    """``base_url`` (default Google's) ending in ``/v1beta``, exactly once."""
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    return base if base.endswith(API_VERSION) else base + API_VERSION


class GeminiProvider(transport.UpstreamClient):
    """Google's Gemini API, spoken to in its own wire format."""

    __slots__ = ("_base", "_headers", "_on_error", "_signatures")

    def __init__(self, config: ProviderConfig, signatures: Signatures | None = None) -> None:
        super().__init__(config)
        self._base = api_base(config.base_url)
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            # A header, never ?key=: URLs end up in logs.
            headers["x-goog-api-key"] = config.api_key
        self._headers = headers
        # Per provider, in this worker: see _signatures for what a miss does.
        self._signatures = signatures if signatures is not None else Signatures()

        def on_error(status: int, body: bytes, retry_after: str | None) -> GatewayError:
            return gemini_error(config.name, status, body, retry_after)

        self._on_error: transport.ErrorMapper = on_error

    def url(self, model: str, method: str) -> str:
        """The URL of ``method`` (``generateContent``, ...) for ``model``."""
        return f"{self._base}/{model_path(model)}:{method}"

    async def chat(self, call: ChatCall) -> ProviderReply:
        session = self._live_session()
        request = decode_chat(call.body)
        body = orjson.dumps(to_gemini(request, self._signatures))
        model = call.target.model
        data = await transport.post_json(
            session,
            self.url(model, "generateContent"),
            body,
            self._headers,
            self._errors,
            self._on_error,
        )
        out, usage = from_gemini(
            data,
            model=model,
            created=int(time.time()),
            completion_id=new_completion_id(),
            new_call_id=new_call_id,
            signatures=self._signatures,
            provider=self.name,
        )
        return ProviderReply(body=out, usage=usage)

    async def stream(self, call: ChatCall) -> TranslatedStream:
        session = self._live_session()
        request = decode_chat(call.body)
        body = orjson.dumps(to_gemini(request, self._signatures))
        model = call.target.model
        resp = await transport.open_event_stream(
            session,
            self.url(model, "streamGenerateContent?alt=sse"),
            body,
            self._headers,
            self._stream_timeout,
            self._errors,
            self._on_error,
        )
        translator = GeminiStreamTranslator(
            model=model,
            created=int(time.time()),
            completion_id=new_completion_id(),
            include_usage=call.request.wants_usage,
            new_call_id=new_call_id,
            signatures=self._signatures,
            provider=self.name,
        )
        return TranslatedStream(resp, translator, self._errors)

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply:
        session = self._live_session()
        request = decode_embeddings(call.body)
        model = call.target.model
        payload = to_gemini_embeddings(request, model)
        data = await transport.post_json(
            session,
            self.url(model, "batchEmbedContents"),
            orjson.dumps(payload),
            self._headers,
            self._errors,
            self._on_error,
        )
        out, usage = from_gemini_embeddings(
            data,
            model=model,
            encoding_format=request.encoding_format,
            expected=len(payload["requests"]),
            provider=self.name,
        )
        return ProviderReply(body=out, usage=usage)
