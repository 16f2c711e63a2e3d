"""A mock Anthropic Messages API for tests, on 127.0.0.1.

An aiohttp server on its own event loop in a background thread (as
tests/upstream.py), so in-process tests and a ``gandalf serve`` subprocess can
both call it::

    with running_anthropic() as mock:      # or MockAnthropic().start() ... .stop()
        base_url = mock.base_url           # http://127.0.0.1:PORT (no /v1)
        ...
        mock.received[-1].headers["x-api-key"]

``POST /v1/messages`` checks a request as Anthropic does (answering 400
``invalid_request_error`` in Anthropic's error shape): the ``x-api-key``
(else 401 ``authentication_error``) and ``anthropic-version`` headers,
``model``, ``max_tokens``, non-empty ``messages`` whose roles alternate
(stricter than today's API, which merges same-role turns), no empty content,
no empty or whitespace-only text block, ``tool_result`` blocks first in their
user turn, each answering a ``tool_use`` of the assistant turn before, every
such ``tool_use`` answered in the next turn, tools
with an object ``input_schema``, a ``tool_choice`` naming a declared tool.

The answer is chosen by the requested ``model``:

- ``claude-ok`` and any model not listed below: echoes :func:`echo_text` (the
  text of the last user turn) with ``end_turn``; the text is cut at the first
  of the request's ``stop_sequences`` (``stop_sequence``) or to
  ``max_tokens`` * 4 characters (``max_tokens``);
- ``claude-tools``: the text "Let me check both." then two ``tool_use``
  blocks, :data:`TOOL_CALLS` (``get_weather``, ``get_time``), ``tool_use``;
  when the last user turn carries ``tool_result`` blocks it answers
  ``"Results: "`` + their texts joined with ``"; "`` instead (``end_turn``);
- ``claude-json``: one ``tool_use`` of the forced tool (``tool_choice.name``,
  else the last declared tool) with input ``{"echo": <echo text>}``, ``tool_use``;
- ``claude-thinking``: a thinking block, then the echo;
- ``claude-refusal``: a short text, ``refusal``;
- ``claude-overloaded``: HTTP 529 ``overloaded_error``;
- ``claude-status-NNN``: HTTP NNN with the error type Anthropic uses for it
  (:data:`ERROR_TYPES`; 404 says "model: ..."; 429 adds ``retry-after: 7``);
- ``claude-text-NNN``: HTTP NNN with a plain-text body.

Usage is realistic: :func:`mock_usage` (~4 characters a token; half the
prompt reported as ``cache_read_input_tokens``, the rest as ``input_tokens``).

With ``"stream": true`` the same message is sent as Anthropic's events
(:func:`stream_events`: ``message_start``, ``ping``, per block a start, deltas
of at most :data:`PIECE` characters, and a stop; ``message_delta``,
``message_stop``; tool inputs as ``input_json_delta`` fragments after an
empty one). Streaming-only models:

- ``claude-stream-error``: ``message_start``, a text block start and one
  delta, then an ``error`` event (``overloaded_error``) and the end;
- ``claude-stream-api-error``: the same with ``api_error``;
- ``claude-stream-cut``: the same without the error event: the body just
  ends before ``message_stop``.
- ``claude-pause``: as ``claude-ok``, silent :attr:`MockAnthropic.pause`
  seconds in the middle of its third event, and as long again after it;
- ``claude-stream-dies``: as ``claude-stream-cut`` in a body framed by closing
  the connection (no length, not chunked), then the close.

``POST /v1/messages/count_tokens`` answers ``{"input_tokens": N}``, N the
prompt tokens :func:`mock_usage` counts. Answers carry a ``request-id`` header.

Every request is recorded (path, headers, body) in ``received``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from tests.background import BackgroundServer, close_framed

PIECE = 6  # characters per streamed text delta / tool-input fragment
TOOL_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("toolu_mock_weather", "get_weather", {"city": "Paris", "unit": "celsius"}),
    ("toolu_mock_time", "get_time", {"timezone": "Europe/Paris"}),
]
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_STREAM_FAILURES = {
    "claude-stream-error": "overloaded_error",
    "claude-stream-api-error": "api_error",
    "claude-stream-cut": None,
}


class Received:
    __slots__ = ("body", "headers", "path")

    def __init__(self, path: str, headers: dict[str, str], body: bytes) -> None:
        self.path = path
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _texts(blocks: Any) -> list[str]:
    if isinstance(blocks, str):
        return [blocks]
    if not isinstance(blocks, list):
        return []
    return [b["text"] for b in blocks if isinstance(b, dict) and b.get("type") == "text"]


def _last_user(payload: dict[str, Any]) -> list[Any]:
    for message in reversed(payload.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return [{"type": "text", "text": content}]
            return content if isinstance(content, list) else []
    return []


def echo_text(payload: dict[str, Any]) -> str:
    """The last user turn's text blocks joined with ``" "``, plus ``" [N
    image(s)]"`` when it has images; ``"(no text)"`` when there is nothing."""
    blocks = _last_user(payload)
    text = " ".join(_texts(blocks))
    images = sum(1 for b in blocks if isinstance(b, dict) and b.get("type") == "image")
    if images:
        text += f" [{images} image(s)]"
    return text.strip() or "(no text)"


def mock_usage(payload: dict[str, Any], output_tokens: int) -> dict[str, int]:
    """The usage the mock reports: the prompt is ~4 characters a token
    (messages and system as JSON), half of it read from the cache."""
    prompt_chars = len(json.dumps(payload.get("messages"))) + len(
        json.dumps(payload.get("system", ""))
    )
    prompt = max(2, prompt_chars // 4)
    cached = prompt // 2
    return {
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": output_tokens,
    }


def _tokens(text: str) -> int:
    return max(1, -(-len(text) // 4))


def _pieces(text: str) -> list[str]:
    return [text[i : i + PIECE] for i in range(0, len(text), PIECE)]


def _problem(payload: Any, headers: dict[str, str]) -> tuple[int, str, str] | None:
    """``(status, error type, message)`` for a request Anthropic would refuse."""
    if not headers.get("x-api-key"):
        return 401, "authentication_error", "x-api-key header is required"
    if not headers.get("anthropic-version"):
        return 400, "invalid_request_error", "anthropic-version: header is required"
    if not isinstance(payload, dict):
        return 400, "invalid_request_error", "body: expected an object"
    if not isinstance(payload.get("model"), str):
        return 400, "invalid_request_error", "model: Field required"
    if not isinstance(payload.get("max_tokens"), int):
        return 400, "invalid_request_error", "max_tokens: Field required"
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return 400, "invalid_request_error", "messages: at least one message is required"
    previous: dict[str, Any] = {}
    for i, message in enumerate(messages):
        problem = _message_problem(message, previous, i)
        if problem:
            return 400, "invalid_request_error", problem
        previous = message
    declared = set()
    for i, tool in enumerate(payload.get("tools") or []):
        schema = tool.get("input_schema")
        if not isinstance(tool.get("name"), str) or not isinstance(schema, dict):
            return 400, "invalid_request_error", f"tools.{i}: name and input_schema required"
        if schema.get("type") != "object":
            return 400, "invalid_request_error", f"tools.{i}.input_schema.type: must be object"
        declared.add(tool["name"])
    choice = payload.get("tool_choice")
    if choice is not None:
        if choice.get("type") not in ("auto", "any", "tool", "none"):
            return 400, "invalid_request_error", "tool_choice.type: invalid"
        if choice["type"] == "tool" and choice.get("name") not in declared:
            return 400, "invalid_request_error", "tool_choice.name: no such tool"
    return None


def _message_problem(message: Any, previous: dict[str, Any], i: int) -> str | None:
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ("user", "assistant"):
        return f"messages.{i}.role: Input should be 'user' or 'assistant'"
    if previous.get("role") == role:
        return f"messages.{i}: roles must alternate between 'user' and 'assistant'"
    content = message.get("content")
    if isinstance(content, str):
        return None if content else f"messages.{i}: content must be non-empty"
    if not isinstance(content, list) or not content:
        return f"messages.{i}: all messages must have non-empty content"
    before = previous.get("content")
    if not isinstance(before, list):
        before = []
    calls = {b.get("id") for b in before if isinstance(b, dict) and b.get("type") == "tool_use"}
    answered = {b.get("tool_use_id") for b in content if isinstance(b, dict)}
    if calls - answered:
        return (
            f"messages.{i}: tool_use ids were found without tool_result blocks "
            f"immediately after: {', '.join(sorted(map(str, calls - answered)))}"
        )
    seen_other = False
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and not str(block.get("text", "")).strip():
            return f"messages.{i}.content.{j}: text content blocks must contain non-whitespace text"
        if kind == "tool_result":
            if seen_other:
                return f"messages.{i}.content.{j}: tool_result blocks must come first"
            if block.get("tool_use_id") not in calls:
                return f"messages.{i}.content.{j}: unexpected tool_use_id in tool_result"
        else:
            seen_other = True
        if kind not in ("text", "image", "tool_use", "tool_result"):
            return f"messages.{i}.content.{j}.type: unknown block type {kind!r}"
    return None


def answer(payload: dict[str, Any], message_id: str) -> dict[str, Any]:
    """The message the mock answers ``payload`` with (see the module docstring)."""
    model = payload["model"]
    content: list[dict[str, Any]]
    stop_reason = "end_turn"
    stop_sequence: str | None = None
    if model == "claude-tools":
        results = [b for b in _last_user(payload) if b.get("type") == "tool_result"]
        if results:
            texts = ["".join(_texts(r.get("content", ""))) for r in results]
            content = [{"type": "text", "text": "Results: " + "; ".join(texts)}]
        else:
            content = [{"type": "text", "text": "Let me check both."}]
            content += [
                {"type": "tool_use", "id": call_id, "name": name, "input": arguments}
                for call_id, name, arguments in TOOL_CALLS
            ]
            stop_reason = "tool_use"
    elif model == "claude-json":
        choice = payload.get("tool_choice") or {}
        tools = payload.get("tools") or [{"name": "json_response"}]
        name = choice.get("name") if choice.get("type") == "tool" else tools[-1]["name"]
        content = [
            {
                "type": "tool_use",
                "id": "toolu_mock_json",
                "name": name,
                "input": {"echo": echo_text(payload)},
            }
        ]
        stop_reason = "tool_use"
    elif model == "claude-refusal":
        content = [{"type": "text", "text": "I can't help with that."}]
        stop_reason = "refusal"
    else:
        text = echo_text(payload)
        for stop in payload.get("stop_sequences") or []:
            cut = text.find(stop)
            if cut >= 0:
                text, stop_reason, stop_sequence = text[:cut], "stop_sequence", stop
                break
        limit = int(payload["max_tokens"])
        if _tokens(text) > limit:
            text, stop_reason, stop_sequence = text[: limit * 4], "max_tokens", None
        content = [{"type": "text", "text": text}]
        if model == "claude-thinking":
            thought = {"type": "thinking", "thinking": "Echo it.", "signature": "sig-mock"}
            content.insert(0, thought)
    output = 0
    for block in content:
        if block["type"] == "text":
            output += _tokens(block["text"])
        elif block["type"] == "tool_use":
            output += _tokens(json.dumps(block["input"]))
        else:
            output += _tokens(block.get("thinking", ""))
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": mock_usage(payload, output),
    }


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def stream_events(message: dict[str, Any]) -> list[bytes]:
    """``message`` as the events Anthropic streams it with."""
    start = dict(message, content=[], stop_reason=None, stop_sequence=None)
    start["usage"] = dict(message["usage"], output_tokens=1)
    out = [event("message_start", {"type": "message_start", "message": start})]
    out.append(event("ping", {"type": "ping"}))
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        deltas: list[dict[str, Any]]
        if kind == "text":
            opening: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in _pieces(block["text"])]
        elif kind == "tool_use":
            opening = dict(block, input={})
            fragments = ["", *_pieces(json.dumps(block["input"]))]
            deltas = [{"type": "input_json_delta", "partial_json": f} for f in fragments]
        else:
            opening = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [
                {"type": "thinking_delta", "thinking": block["thinking"]},
                {"type": "signature_delta", "signature": block["signature"]},
            ]
        out.append(
            event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": opening},
            )
        )
        out += [
            event(
                "content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}
            )
            for d in deltas
        ]
        out.append(event("content_block_stop", {"type": "content_block_stop", "index": index}))
    stop = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    usage = {"output_tokens": message["usage"]["output_tokens"]}
    out.append(event("message_delta", {"type": "message_delta", "delta": stop, "usage": usage}))
    out.append(event("message_stop", {"type": "message_stop"}))
    return out


def _failing_stream(message: dict[str, Any], failure: str | None) -> list[bytes]:
    """The first four events of ``message``'s stream (start, ping, a text block
    start, one delta), then an ``error`` event of type ``failure`` (if any)."""
    events = stream_events(message)[:4]
    if failure is not None:
        events.append(event("error", error_body(failure, f"mock {failure}")))
    return events


class MockAnthropic(BackgroundServer):
    name = "mock anthropic"

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.pause = 1.0  # seconds claude-pause is silent, twice
        self._count = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MockAnthropic:
        super().start()
        return self

    def clear(self) -> None:
        self.received.clear()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(request.path_qs, headers, body))
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "invalid_request_error", "body: invalid JSON")
        problem = _problem(payload, headers)
        if problem is not None:
            return _error(*problem)
        model: str = payload["model"]
        if model == "claude-overloaded":
            return _error(529, "overloaded_error", "Overloaded")
        if model.startswith("claude-status-"):
            status = int(model.rsplit("-", 1)[1])
            kind = ERROR_TYPES.get(
                status, "api_error" if status >= 500 else "invalid_request_error"
            )
            message = f"model: {model}" if status == 404 else f"mock {kind}"
            extra = {"retry-after": "7"} if status == 429 else {}
            return _error(status, kind, message, extra)
        if model.startswith("claude-text-"):
            return web.Response(status=int(model.rsplit("-", 1)[1]), text="plain failure")
        self._count += 1
        message_id = f"msg_mock_{self._count:04d}"
        # Anthropic names each answer in a request-id header; clients log it.
        ids = {"request-id": f"req_mock_{self._count:04d}"}
        if payload.get("stream") is not True:
            return web.json_response(answer(payload, message_id), headers=ids)  # failures: an echo
        if model == "claude-stream-dies":
            events = _failing_stream(answer(payload, message_id), None)
            return await close_framed(request, b"".join(events))
        if model in _STREAM_FAILURES:
            events = _failing_stream(answer(payload, message_id), _STREAM_FAILURES[model])
        else:
            events = stream_events(answer(payload, message_id))
        resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream", **ids})
        await resp.prepare(request)
        for i, item in enumerate(events):
            if model == "claude-pause" and i == 2:  # silent mid-event, then between events
                await resp.write(item[:10])
                await asyncio.sleep(self.pause)
                await resp.write(item[10:])
                await asyncio.sleep(self.pause)
                continue
            await resp.write(item)
        await resp.write_eof()
        return resp

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        """``/v1/messages/count_tokens``: the prompt's tokens as the usage counts them."""
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(request.path_qs, headers, body))
        if "x-api-key" not in headers:
            return _error(401, "authentication_error", "x-api-key header is required")
        payload = json.loads(body)
        usage = mock_usage(payload, 0)
        total = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
        return web.json_response({"input_tokens": total})


def _error(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(error_body(kind, message), status=status, headers=headers)


@contextmanager
def running_anthropic() -> Iterator[MockAnthropic]:
    mock = MockAnthropic().start()
    try:
        yield mock
    finally:
        mock.stop()
