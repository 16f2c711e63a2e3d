"""A mock Gemini API (``generativelanguage`` ``v1beta``) for tests, on 127.0.0.1.

It runs an aiohttp server on its own event loop in a background thread, so
in-process tests and a ``gandalf serve`` subprocess can both call it::

    with running_gemini() as gemini:           # or MockGemini().start() ... .stop()
        provider base_url = gemini.base_url     # http://127.0.0.1:<port>
        ... gemini.received[-1].headers["x-goog-api-key"]

Routes (under ``/v1beta`` and, the same, ``/v1``): ``POST /v1beta/models/{model}:generateContent``,
``:streamGenerateContent`` (``?alt=sse``: server-sent events framed with CRLF,
as Google frames them; without it, a JSON array of chunks, as Google answers)
and ``:batchEmbedContents``. Calls need an ``x-goog-api-key`` header (none:
403 PERMISSION_DENIED); with ``MockGemini(api_key=...)`` any other key gets
Google's 400 INVALID_ARGUMENT "API key not valid".

Behaviour is chosen by the model in the path:

- ``gemini-ok`` (and any model not listed): echoes the text of the last user
  content (function responses as JSON). Streamed, it comes word by word, one
  chunk each, every chunk with a *cumulative* ``usageMetadata``
  (``candidatesTokenCount`` = words so far); the last chunk has
  ``finishReason: STOP``. Non-streamed: the whole text, the final usage.
  ``candidateCount`` N gives N candidates (the i-th text prefixed ``[i] ``).
  Usage: ``promptTokenCount`` = :func:`prompt_tokens` of the body,
  ``candidatesTokenCount`` = the number of words.
- ``gemini-thinking``: as ``gemini-ok`` after a ``thought: true`` part; usage
  adds ``thoughtsTokenCount`` 5 and ``cachedContentTokenCount`` 2.
- ``gemini-tools``: two functionCalls, ``get_weather {"city": "Paris"}`` with
  ``thoughtSignature`` :data:`SIGNATURE` and ``get_time {"tz":
  "Europe/Paris"}`` without one (streamed: one per chunk, ``STOP`` on the
  second). When the last user content holds functionResponses it answers the
  text ``results: <{name: response} as JSON>`` instead, after checking, as
  Gemini 3 does, that the ``get_weather`` call in the history carries
  :data:`SIGNATURE` or the documented placeholder :data:`SKIP_SIGNATURE`
  (400 INVALID_ARGUMENT when not).
- ``gemini-tools-ids``: as ``gemini-tools`` with Gemini's own functionCall
  ids ``fc-1``/``fc-2``; the second turn also checks that the history's calls
  and responses carry those ids.
- ``gemini-json``: the text ``{"echo": <last user text>}``; 400 unless
  ``generationConfig.responseMimeType`` is ``application/json``.
- ``gemini-blocked``: the prompt is blocked (``promptFeedback.blockReason:
  SAFETY``, no candidates).
- ``gemini-safety`` / ``gemini-length``: one word, then ``finishReason``
  ``SAFETY`` / ``MAX_TOKENS``.
- ``gemini-status-NNN``: HTTP NNN with a Google error body (``code``,
  ``message``, ``status``); 429 adds ``retry-after: 7``; 404 says the model is
  not found.
- ``gemini-badkey``: 400 INVALID_ARGUMENT "API key not valid" (API_KEY_INVALID).
- ``gemini-unavailable``: 503 UNAVAILABLE ("The model is overloaded").
- ``gemini-stream-error``: streamed, one text chunk then an ``{"error": ...}``
  event (500 INTERNAL) and the end; non-streamed as ``gemini-ok``.
- ``gemini-stream-cut``: streamed, the chunks of ``gemini-ok`` without any
  ``finishReason``; non-streamed as ``gemini-ok``.
- ``gemini-stream-dies``: streamed (``alt=sse``), the first chunk of
  ``gemini-ok`` in a body framed by closing the connection, then the close.
- ``gemini-pause``: streamed, as ``gemini-ok`` with :attr:`MockGemini.pause`
  seconds of silence after the first chunk.

``:embedContent`` answers one :func:`mock_vector`; ``:countTokens`` answers
``{"totalTokens": prompt_tokens(body)}``. ``:batchEmbedContents`` answers one
:func:`mock_vector` per request
(``outputDimensionality`` honoured, default :data:`DEFAULT_DIMENSIONS`) and,
like Gemini, no token counts; each request's ``model`` must be
``models/<model of the path>``. ``gemini-status-NNN`` fails as for chat.

Every request is recorded in ``received`` (path, raw path, query, headers, body).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from tests.background import BackgroundServer, close_framed

DEFAULT_DIMENSIONS = 8
SIGNATURE = "c2lnbmF0dXJlLW9uZQ+/+w=="  # standard base64 with + / and padding, on purpose
RESPONSE_ID = "mock-response-id"
# Gemini's documented placeholder for a signature the client no longer has.
SKIP_SIGNATURE = "skip_thought_signature_validator"
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_WORDS = re.compile(r"\s*\S+\s*|\s+")
_TOOL_CALLS = (
    ("get_weather", {"city": "Paris"}, "fc-1"),
    ("get_time", {"tz": "Europe/Paris"}, "fc-2"),
)


class Received:
    __slots__ = ("body", "headers", "method", "model", "path", "query", "raw_path")

    def __init__(self, request: web.Request, body: bytes, model: str, method: str) -> None:
        self.path = request.path
        self.raw_path = request.raw_path
        self.query = dict(request.query)
        self.headers = dict(request.headers)
        self.body = body
        self.model = model
        self.method = method

    def json(self) -> Any:
        return json.loads(self.body)


def mock_vector(text: str, dimensions: int) -> list[float]:
    """The mock's embedding of ``text``: exact in float32 (so base64 round-trips)."""
    return [float(len(text))] + [j * 0.25 for j in range(1, dimensions)]


def prompt_tokens(payload: dict[str, Any]) -> int:
    """The mock's prompt token count: a quarter of the JSON length of the
    contents and system instruction, at least 1."""
    text = json.dumps([payload.get("contents"), payload.get("systemInstruction")])
    return max(1, len(text) // 4)


def google_error(status: int, message: str, *, reasons: tuple[str, ...] = ()) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": _STATUS_NAMES.get(status, "UNKNOWN"),
    }
    if reasons:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": r, "domain": "x"}
            for r in reasons
        ]
    return {"error": error}


def _error(status: int, message: str, **kwargs: Any) -> web.Response:
    headers = {"retry-after": "7"} if status == 429 else {}
    return web.json_response(
        google_error(status, message, **kwargs), status=status, headers=headers
    )


def _last_user(payload: dict[str, Any]) -> list[dict[str, Any]]:
    for content in reversed(payload.get("contents") or []):
        if content.get("role") == "user":
            return list(content.get("parts") or [])
    return []


def _echo_text(payload: dict[str, Any]) -> str:
    parts = _last_user(payload)
    texts = [p["text"] for p in parts if isinstance(p.get("text"), str)]
    if texts:
        return "".join(texts)
    responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
    return json.dumps(responses, separators=(",", ":")) if responses else ""


def _candidate(parts: list[dict[str, Any]], index: int, finish: str | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}}
    if index:
        candidate["index"] = index  # proto3 JSON leaves out zeros, as Google does
    if finish is not None:
        candidate["finishReason"] = finish
    return candidate


class _Script:
    """One answer as the stream chunks Gemini would send."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.chunks: list[dict[str, Any]] = []

    def add(
        self,
        candidates: list[dict[str, Any]],
        usage: dict[str, int] | None,
        **extra: Any,
    ) -> None:
        chunk: dict[str, Any] = {"candidates": candidates} if candidates else {}
        chunk.update(extra)
        if usage is not None:
            chunk["usageMetadata"] = usage
        chunk["modelVersion"] = self.model
        chunk["responseId"] = RESPONSE_ID
        self.chunks.append(chunk)

    def whole(self) -> dict[str, Any]:
        """The non-streamed answer: every chunk's parts merged per candidate."""
        merged: dict[int, dict[str, Any]] = {}
        out: dict[str, Any] = {}
        for chunk in self.chunks:
            for candidate in chunk.get("candidates", []):
                index = candidate.get("index", 0)
                into = merged.setdefault(index, _candidate([], index, None))
                parts = into["content"]["parts"]
                for part in candidate["content"]["parts"]:
                    last = parts[-1] if parts else None
                    if (
                        last is not None
                        and set(part) == {"text"}
                        and set(last) == {"text"}
                        and "thought" not in last
                    ):
                        last["text"] += part["text"]
                    else:
                        parts.append(dict(part))
                if "finishReason" in candidate:
                    into["finishReason"] = candidate["finishReason"]
            for key in ("promptFeedback", "usageMetadata", "modelVersion", "responseId"):
                if key in chunk:
                    out[key] = chunk[key]
        if merged:
            out["candidates"] = [merged[i] for i in sorted(merged)]
        return out


def _usage(prompt: int, output: int, **extra: int) -> dict[str, int]:
    usage = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": output,
        "totalTokenCount": prompt + output + extra.get("thoughtsTokenCount", 0),
    }
    usage.update(extra)
    return usage


class MockGemini(BackgroundServer):
    name = "mock gemini"

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.received: list[Received] = []
        self.pause = 1.0  # seconds gemini-pause is silent after its first chunk

    @property
    def base_url(self) -> str:
        """The provider's ``base_url`` (Gandalf appends ``/v1beta``)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> MockGemini:
        super().start()
        return self

    def clear(self) -> None:
        self.received.clear()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{target}", self._handle)
        app.router.add_post("/v1/models/{target}", self._handle)  # Gemini's stable API version

    # ------------------------------------------------------------ handlers

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        model, _, method = request.match_info["target"].rpartition(":")
        self.received.append(Received(request, body, model, method))
        key = request.headers.get("x-goog-api-key")
        if key is None:
            return _error(
                403,
                "Method doesn't allow unregistered callers (callers without "
                "established identity). Please use API Key or other form of API "
                "consumer identity to call this API.",
            )
        if model == "gemini-badkey" or (self.api_key is not None and key != self.api_key):
            return _error(
                400, "API key not valid. Please pass a valid API key.", reasons=("API_KEY_INVALID",)
            )
        if model.startswith("gemini-status-"):
            status = int(model.rsplit("-", 1)[1])
            if status == 404:
                return _error(
                    404,
                    f"models/{model} is not found for API version v1beta, or is not supported "
                    f"for {method}. Call ListModels to see the list of available models and "
                    "their supported methods.",
                )
            return _error(status, f"mock says {status}")
        if model == "gemini-unavailable":
            return _error(503, "The model is overloaded. Please try again later.")
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "Invalid JSON payload received.")
        if method == "batchEmbedContents":
            return self._embeddings(model, payload)
        if method == "embedContent":
            text = "".join(p.get("text", "") for p in payload["content"]["parts"])
            dimensions = int(payload.get("outputDimensionality") or DEFAULT_DIMENSIONS)
            return web.json_response({"embedding": {"values": mock_vector(text, dimensions)}})
        if method == "countTokens":
            return web.json_response({"totalTokens": prompt_tokens(payload)})
        if method not in ("generateContent", "streamGenerateContent"):
            return _error(404, f"Method {method} not found.")
        script = self._script(model, payload)
        if isinstance(script, web.Response):
            return script
        if method == "generateContent":
            return web.json_response(script.whole())
        if request.query.get("alt") != "sse":
            return web.json_response(script.chunks)
        if model == "gemini-stream-dies":
            first = json.dumps(script.chunks[0], separators=(",", ":")).encode()
            return await close_framed(request, b"data: " + first + b"\r\n\r\n")
        return await self._stream(request, model, script)

    async def _stream(
        self, request: web.Request, model: str, script: _Script
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        chunks = script.chunks
        if model == "gemini-stream-cut":
            chunks = [_without_finish(chunk) for chunk in chunks]
        if model == "gemini-stream-error":
            chunks = [*chunks[:1], google_error(500, "mock internal error")]
        for i, chunk in enumerate(chunks):
            if model == "gemini-pause" and i == 1:
                await asyncio.sleep(self.pause)  # the silence is what is tested
            data = json.dumps(chunk, separators=(",", ":")).encode()
            await resp.write(b"data: " + data + b"\r\n\r\n")
        await resp.write_eof()
        return resp

    def _script(self, model: str, payload: dict[str, Any]) -> _Script | web.Response:
        script = _Script(model)
        prompt = prompt_tokens(payload)
        config = payload.get("generationConfig") or {}
        if model == "gemini-blocked":
            script.add([], _usage(prompt, 0), promptFeedback={"blockReason": "SAFETY"})
            return script
        if model in ("gemini-tools", "gemini-tools-ids"):
            return self._tools(script, model, payload, prompt)
        if model == "gemini-json":
            if config.get("responseMimeType") != "application/json":
                return _error(400, "mock: gemini-json needs responseMimeType application/json")
            text = json.dumps({"echo": _echo_text(payload)})
        else:
            text = _echo_text(payload)
        words = _WORDS.findall(text) or [""]
        extra: dict[str, int] = {}
        if model == "gemini-thinking":
            extra = {"thoughtsTokenCount": 5, "cachedContentTokenCount": 2}
            script.add(
                [_candidate([{"text": "Thinking it over.", "thought": True}], 0, None)],
                _usage(prompt, 0, **extra),
            )
        if model in ("gemini-safety", "gemini-length"):
            finish = "SAFETY" if model == "gemini-safety" else "MAX_TOKENS"
            words = words[:1]
        else:
            finish = "STOP"
        count = int(config.get("candidateCount") or 1)
        for i, word in enumerate(words):
            last = i == len(words) - 1
            candidates = [
                _candidate(
                    [{"text": (f"[{c}] " if c and i == 0 else "") + word}],
                    c,
                    finish if last else None,
                )
                for c in range(count)
            ]
            script.add(candidates, _usage(prompt, (i + 1) * count, **extra))
        return script

    def _tools(
        self, script: _Script, model: str, payload: dict[str, Any], prompt: int
    ) -> _Script | web.Response:
        with_ids = model == "gemini-tools-ids"
        responses = [p["functionResponse"] for p in _last_user(payload) if "functionResponse" in p]
        if responses:
            problem = _check_history(payload, with_ids)
            if problem:
                return _error(400, problem)
            results = {r["name"]: r["response"] for r in responses}
            text = "results: " + json.dumps(results, separators=(",", ":"), sort_keys=True)
            script.add([_candidate([{"text": text}], 0, "STOP")], _usage(prompt, 4))
            return script
        for i, (name, args, call_id) in enumerate(_TOOL_CALLS):
            call: dict[str, Any] = {"name": name, "args": args}
            if with_ids:
                call["id"] = call_id
            part: dict[str, Any] = {"functionCall": call}
            if i == 0:
                part["thoughtSignature"] = SIGNATURE
            last = i == len(_TOOL_CALLS) - 1
            script.add(
                [_candidate([part], 0, "STOP" if last else None)], _usage(prompt, 10 * (i + 1))
            )
        return script

    def _embeddings(self, model: str, payload: dict[str, Any]) -> web.Response:
        out = []
        for i, item in enumerate(payload.get("requests") or []):
            if item.get("model") != f"models/{model}":
                return _error(
                    400,
                    f"Model names should match: requests[{i}].model is {item.get('model')!r}, "
                    f"the URL says models/{model}.",
                )
            text = "".join(p.get("text", "") for p in item["content"]["parts"])
            dimensions = int(item.get("outputDimensionality") or DEFAULT_DIMENSIONS)
            out.append({"values": mock_vector(text, dimensions)})
        return web.json_response({"embeddings": out})


def _without_finish(chunk: dict[str, Any]) -> dict[str, Any]:
    candidates = [
        {k: v for k, v in c.items() if k != "finishReason"} for c in chunk.get("candidates", [])
    ]
    return {**chunk, "candidates": candidates}


def _check_history(payload: dict[str, Any], with_ids: bool) -> str | None:
    """What Gemini would refuse in a second turn's history, or None."""
    calls = [
        part
        for content in payload.get("contents") or []
        if content.get("role") == "model"
        for part in content.get("parts") or []
        if "functionCall" in part
    ]
    for part in calls:
        if part["functionCall"]["name"] == "get_weather" and part.get("thoughtSignature") not in (
            SIGNATURE,
            SKIP_SIGNATURE,
        ):
            return (
                "Function call is missing a thought_signature in functionCall parts. This is "
                "required for tools to work correctly."
            )
    if with_ids:
        ids = {part["functionCall"].get("id") for part in calls}
        answered = {
            part["functionResponse"].get("id")
            for part in _last_user(payload)
            if "functionResponse" in part
        }
        if ids != {"fc-1", "fc-2"} or answered != ids:
            return f"mock: function call ids {sorted(map(str, ids))} / responses {answered}"
    return None


@contextmanager
def running_gemini(api_key: str | None = None) -> Iterator[MockGemini]:
    mock = MockGemini(api_key).start()
    try:
        yield mock
    finally:
        mock.stop()
