"""A controllable mock OpenAI upstream for tests, on 127.0.0.1.

It runs an aiohttp server on its own event loop in a background thread, so both
in-process tests and a ``gandalf serve`` subprocess can call it. Its behaviour
is chosen by the ``model`` it receives (Gandalf puts the route target's model
there), which lets one mock serve every scenario at once:

- ``ok-*`` (anything not listed below): a chat.completion echoing the last user message
- ``status-NNN``: HTTP NNN with an OpenAI-shaped error (429 adds ``retry-after: 7``)
- ``text-NNN``: HTTP NNN with a plain-text body
- ``busy``: HTTP 429 with an OpenAI-shaped error, no ``retry-after``, and
  :data:`BUSY_HEADERS` (rate limits)
- ``hang``: never answers until released (timeouts)
- ``headers-then-hang``: 200 and its headers at once, then the start of a
  body and nothing more until released (a long generation, or a stall)
- ``big-N``: 200 with a JSON body of N bytes and more (response size caps);
  ``chunked-N`` the same in 64 KiB chunks, without a Content-Length
- ``gate``: waits until the test opens the gate (graceful drain)
- ``badjson``: 200 with a body that is not JSON
- ``with-headers``: as ``ok-*`` (streamed or not), with :data:`UPSTREAM_HEADERS`

Chat bodies with ``"stream": true`` get server-sent events (OpenAI's chunk
format; a final usage-only event only when the body asked for
``stream_options.include_usage``, then ``data: [DONE]``):

- ``stream-N``: N content chunks, ``"w0 "``, ``"w1 "``, ...
- ``slow-stream``: :data:`SLOW_CHUNKS` chunks; each one after the first waits
  for a permit the test grants with :meth:`MockUpstream.release`
- ``stream-silent``: one chunk, then nothing until one permit is granted, then
  one more chunk and the end
- ``stream-then-die``: two chunks, then the connection is closed (no [DONE])
- ``stream-late``: nothing at all (not even headers) until one permit is granted,
  then as ``stream-silent``
- ``stream-status-NNN``: HTTP NNN with an OpenAI-shaped error, before any event
- any other model that would succeed: the echoed text as one chunk
  (``hang``/``gate``/``status-NNN``/``text-NNN`` behave as without streaming)

Each streamed request is tracked by a :class:`StreamLog` keyed by its last user
message (``mock.stream_log(text)``): chunks sent, whether it finished, the usage
it reported, and whether the client (Gandalf) closed the connection before the
end. The mock doubles as an Ollama server (Ollama serves OpenAI's format under ``/v1``):
``GET /api/tags`` lists :attr:`MockUpstream.tags`; ``POST /api/chat`` and
``/api/generate`` answer in Ollama's own format (NDJSON unless ``"stream": false``,
counts in the last line); ``POST /api/embed`` returns ``embeddings``; ``POST
/api/show`` a model's details (``modelfile`` names the model it received). And as an
Azure OpenAI resource: ``POST /openai/deployments/{deployment}/chat/completions``
(or ``/embeddings``) behaves as ``/v1`` with the deployment as the model, and
answers 404 without an ``api-version`` query.
``POST /v1/embeddings`` answers echo-style: one :func:`mock_vector`
per input (``dimensions`` honoured, ``encoding_format: base64`` gives
little-endian float32 in base64); ``status-NNN`` models fail as for chat.

``POST /v1/responses``: a minimal Responses API (tests/mock_responses.py).

Every request is recorded (path, headers, body) in ``received``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from aiohttp import web

from tests import mock_responses
from tests.background import BackgroundServer

SLOW_CHUNKS = 3
DEFAULT_DIMENSIONS = 8
_CREATED = 1700000000
_T = TypeVar("_T")
_SILENT = ("stream-silent", "stream-late")


class Received:
    __slots__ = ("body", "headers", "path")

    def __init__(self, path: str, headers: dict[str, str], body: bytes) -> None:
        self.path = path
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def include_usage(self) -> bool:
        """Did this body ask for ``stream_options.include_usage``?"""
        try:
            payload = self.json()
        except ValueError:
            return False
        return isinstance(payload, dict) and wants_usage(payload)


# What an OpenAI upstream says about the call besides the answer (model
# ``with-headers``): rate limits, processing time, its own request id; and one
# header a gateway has no reason to relay.
UPSTREAM_HEADERS = {
    "x-request-id": "req_upstream_123",
    "openai-processing-ms": "42",
    "openai-version": "2020-10-01",
    "openai-organization": "org-mock",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-tokens": "6ms",
    "x-internal-route": "pod-7",
}


BUSY_HEADERS = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20ms"}


def wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


_BAD_JSON = {
    "error": {"message": "bad json", "type": "invalid_request_error", "param": None, "code": None}
}


def mock_vector(text: str, dimensions: int) -> list[float]:
    """The mock's embedding of ``text``: exact in float32 (so base64 round-trips)."""
    return [float(len(text))] + [j * 0.25 for j in range(1, dimensions)]


def chunk_event(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-mockstream",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _error_body(status: int) -> dict[str, Any]:
    return {
        "error": {
            "message": f"mock says {status}",
            "type": "mock_error",
            "param": None,
            "code": f"mock_{status}",
        }
    }


def _last_text(payload: dict[str, Any]) -> str:
    messages = payload.get("messages") or [{}]
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    text = last.get("content", "")
    return text if isinstance(text, str) else json.dumps(text)


class StreamLog:
    """What the mock did on one streamed (or "late") request, keyed by its last user message.

    Written on the mock's loop, read by the test thread (plain attributes).
    """

    def __init__(self) -> None:
        self.requests = 0  # streamed requests that arrived with this key
        self.include_usage = False  # what the last one asked for
        self.sent = 0  # content chunks written (counted just before each write)
        self.done = False  # data: [DONE] written (set just before the write)
        self.closed = False  # the client closed the connection before the end
        self.usage: dict[str, int] | None = None  # the usage the mock reported
        self._permits = 0
        self._changed: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _grant(self, count: int) -> None:
        self._permits += count
        self._event().set()

    async def _permit(self) -> None:
        changed = self._event()
        while self._permits <= 0:
            changed.clear()
            await changed.wait()
        self._permits -= 1


class MockUpstream(BackgroundServer):
    name = "mock upstream"

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self._gate: asyncio.Event | None = None
        self._release: asyncio.Event | None = None
        self.waiting = 0  # requests parked at the gate
        self.streams: dict[str, StreamLog] = {}  # touched on the mock's loop only
        self._stopping = False
        self.tags: list[str] = ["llama3.2:1b", "ok-local"]  # what GET /api/tags lists

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> MockUpstream:
        super().start()
        return self

    async def prepare(self) -> None:
        self._gate = asyncio.Event()
        self._release = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/chat", self._ollama)
        app.router.add_post("/api/generate", self._ollama)
        app.router.add_post("/api/embed", self._ollama_embed)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/openai/deployments/{deployment}/{operation:.+}", self._azure)

    async def before_stop(self) -> None:
        assert self._release is not None and self._gate is not None
        self._release.set()
        self._gate.set()
        self._stopping = True
        for log in self.streams.values():  # no handler stays parked
            log._grant(1_000_000)

    # ------------------------------------------------------------ controls

    def open_gate(self) -> None:
        def _open() -> None:
            assert self._gate is not None
            self._gate.set()

        self.loop.call_soon_threadsafe(_open)

    def clear(self) -> None:
        self.received.clear()

    def stream_log(self, key: str) -> StreamLog:
        """The log of the streamed request(s) whose last user message is ``key``
        (created empty if none arrived yet)."""
        return self.on_loop(lambda: self._log(key))

    def release(self, key: str, count: int = 1) -> None:
        """Let the stream(s) keyed ``key`` send ``count`` more gated chunk(s);
        permits granted before the request arrives are kept for it."""
        self.on_loop(lambda: self._log(key)._grant(count))

    def _log(self, key: str) -> StreamLog:
        log = self.streams.get(key)
        if log is None:
            log = self.streams[key] = StreamLog()
            if self._stopping:
                log._grant(1_000_000)
        return log

    # ------------------------------------------------------------ handlers

    async def _chat(
        self, request: web.Request, model_from_path: str | None = None
    ) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path_qs, dict(request.headers), body))
        try:
            payload = json.loads(body)
        except ValueError:
            return web.json_response(_BAD_JSON, status=400)
        if model_from_path is not None:
            payload["model"] = model_from_path
        model = str(payload.get("model", ""))
        if model.startswith("stream-status-"):
            status = int(model.rsplit("-", 1)[1])
            return web.json_response(_error_body(status), status=status)
        if model.startswith("status-"):
            status = int(model.split("-", 1)[1])
            headers = {"retry-after": "7"} if status == 429 else {}
            return web.json_response(_error_body(status), status=status, headers=headers)
        if model.startswith("text-"):
            return web.Response(status=int(model.split("-", 1)[1]), text="plain failure")
        if model == "busy":
            return web.json_response(_error_body(429), status=429, headers=BUSY_HEADERS)
        if model == "hang":
            assert self._release is not None
            await self._release.wait()
        if model == "headers-then-hang":
            assert self._release is not None
            started = web.StreamResponse(status=200, headers={"content-type": "application/json"})
            await started.prepare(request)
            await started.write(b'{"id": "chatcmpl-mock", ')
            await self._release.wait()
            return started
        if model.startswith("chunked-"):
            chunked = web.StreamResponse(status=200, headers={"content-type": "application/json"})
            chunked.enable_chunked_encoding()
            await chunked.prepare(request)
            await chunked.write(b'{"pad": "')
            left = int(model.split("-", 1)[1])
            while left > 0:
                await chunked.write(b"x" * min(left, 65536))
                left -= 65536
            await chunked.write(b'"}')
            await chunked.write_eof()
            return chunked
        if model.startswith("big-"):
            pad = b"x" * int(model.split("-", 1)[1])
            return web.Response(
                status=200, body=b'{"pad": "' + pad + b'"}', content_type="application/json"
            )
        if model == "gate":
            assert self._gate is not None
            self.waiting += 1
            await self._gate.wait()
        if model == "late" and payload.get("stream") is not True:
            # A non-streamed answer held until the test releases it (keyed by the
            # last user message); the log says whether the caller hung up first.
            log = self._log(_last_text(payload))
            log.requests += 1
            try:
                await log._permit()
            except asyncio.CancelledError:
                log.closed = True
                raise
        if model == "badjson":
            return web.Response(status=200, text="not json", content_type="application/json")
        if payload.get("stream") is True:
            return await self._stream(request, payload, model)
        messages = payload.get("messages") or [{}]
        text = messages[-1].get("content", "")
        if not isinstance(text, str):
            text = json.dumps(text)
        prompt = sum(len(json.dumps(m)) for m in messages) // 4
        completion = max(1, len(text) // 4)
        return web.json_response(
            headers=UPSTREAM_HEADERS if model == "with-headers" else None,
            data={
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        )

    async def _stream(
        self, request: web.Request, payload: dict[str, Any], model: str
    ) -> web.StreamResponse:
        key = _last_text(payload)
        log = self._log(key)
        log.requests += 1
        include_usage = wants_usage(payload)
        log.include_usage = include_usage
        if model.startswith("stream-") and model[7:].isdigit():
            pieces = [f"w{i} " for i in range(int(model[7:]))]
        elif model == "slow-stream":
            pieces = [f"w{i} " for i in range(SLOW_CHUNKS)]
        elif model in ("stream-silent", "stream-then-die", "stream-late"):
            pieces = ["w0 ", "w1 "]
        else:
            pieces = [key]
        messages = payload.get("messages") or []
        prompt = sum(len(json.dumps(m)) for m in messages) // 4
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(pieces),
            "total_tokens": prompt + len(pieces),
        }
        headers = {"content-type": "text/event-stream"}
        if model == "with-headers":
            headers.update(UPSTREAM_HEADERS)
        resp = web.StreamResponse(status=200, headers=headers)
        try:
            if model == "stream-late":
                await log._permit()  # no status line, no headers until the test says so
            await resp.prepare(request)
            for index, piece in enumerate(pieces):
                if index and (model == "slow-stream" or (index == 1 and model in _SILENT)):
                    await log._permit()
                delta: dict[str, Any] = {"content": piece}
                if index == 0:
                    delta = {"role": "assistant", "content": piece}
                log.sent += 1  # before the write: the client can never be ahead of the log
                await resp.write(chunk_event(model, delta))
                if model == "stream-then-die" and index == 1:
                    assert request.transport is not None
                    request.transport.close()  # mid-body: the client sees a cut chunked body
                    await asyncio.Event().wait()  # cancelled once the connection is gone
            tail = chunk_event(model, {}, "stop")
            if include_usage:
                log.usage = usage
                final = {
                    "id": "chatcmpl-mockstream",
                    "object": "chat.completion.chunk",
                    "created": _CREATED,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                tail += b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n"
            log.done = True
            await resp.write(tail + b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            if model != "stream-then-die":
                log.closed = True
            raise
        return resp

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses`` (tests/mock_responses.py says what it answers)."""
        body = await request.read()
        self.received.append(Received(request.path_qs, dict(request.headers), body))
        try:
            payload = json.loads(body)
        except ValueError:
            return web.json_response(_BAD_JSON, status=400)
        model = str(payload.get("model", ""))
        if model.startswith("status-"):
            status = int(model.split("-", 1)[1])
            return web.json_response(_error_body(status), status=status)
        response = mock_responses.answer(payload, len(self.received))
        extra = UPSTREAM_HEADERS if model == "with-headers" else {}
        if payload.get("stream") is not True:
            return web.json_response(response, headers=extra)
        resp = web.StreamResponse(
            status=200, headers={"content-type": "text/event-stream", **extra}
        )
        await resp.prepare(request)
        for event in mock_responses.events(response):
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        """Azure OpenAI: the deployment in the path picks the behaviour (as the
        model does on /v1); ``api-version`` is required, as Azure requires it."""
        if "api-version" not in request.query:
            body = await request.read()
            self.received.append(Received(request.path_qs, dict(request.headers), body))
            return web.json_response(
                {"error": {"code": "404", "message": "Resource not found"}}, status=404
            )
        deployment = request.match_info["deployment"]
        if request.match_info["operation"] == "embeddings":
            return await self._embeddings(request, deployment)
        return await self._chat(request, deployment)

    async def _ollama(self, request: web.Request) -> web.StreamResponse:
        """Ollama's native /api/chat and /api/generate: NDJSON unless ``stream``
        is false; the answer echoes the last message (or the prompt) in
        ``stream-N``-many pieces like the OpenAI mock."""
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body))
        payload = json.loads(body)
        model = str(payload.get("model", ""))
        if model.startswith("status-"):
            status = int(model.split("-", 1)[1])
            return web.json_response({"error": f"mock status {status}"}, status=status)
        chat = request.path == "/api/chat"
        text = _last_text(payload) if chat else str(payload.get("prompt", ""))
        pieces = (
            [f"w{i} " for i in range(int(model[7:]))]
            if model.startswith("stream-") and model[7:].isdigit()
            else [text]
        )
        prompt_count = max(1, len(json.dumps(payload)) // 4)

        def line(piece: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": "2024-01-01T00:00:00Z"}
            if chat:
                out["message"] = {"role": "assistant", "content": piece}
            else:
                out["response"] = piece
            out["done"] = done
            if done:
                out.update(done_reason="stop", prompt_eval_count=prompt_count)
                out["eval_count"] = len(pieces)
            return out

        if payload.get("stream") is False:
            return web.json_response(line("".join(pieces), True))
        response = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(json.dumps(line(piece, False)).encode() + b"\n")
        await response.write(json.dumps(line("", True)).encode() + b"\n")
        await response.write_eof()
        return response

    async def _ollama_embed(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body))
        payload = json.loads(body)
        inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        return web.json_response(
            {
                "model": payload["model"],
                "embeddings": [mock_vector(text, DEFAULT_DIMENSIONS) for text in inputs],
                "prompt_eval_count": sum(max(1, len(text) // 4) for text in inputs),
            }
        )

    async def _show(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body))
        model = str(json.loads(body).get("model", ""))
        return web.json_response(
            {
                "modelfile": f"FROM {model}",
                "details": {"family": "llama", "parameter_size": "1.2B"},
                "model_info": {"llama.context_length": 131072},
                "capabilities": ["completion", "tools"],
            }
        )

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(request.path, dict(request.headers), b""))
        models = [{"name": name, "model": name, "size": 1} for name in self.tags]
        return web.json_response({"models": models})

    async def _embeddings(
        self, request: web.Request, model_from_path: str | None = None
    ) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path_qs, dict(request.headers), body))
        try:
            payload = json.loads(body)
        except ValueError:
            return web.json_response(_BAD_JSON, status=400)
        if model_from_path is not None:
            payload["model"] = model_from_path
        model = str(payload.get("model", ""))
        if model.startswith("status-"):
            status = int(model.split("-", 1)[1])
            return web.json_response(_error_body(status), status=status)
        raw = payload.get("input", "")
        if isinstance(raw, str):
            texts = [raw]
        elif raw and all(isinstance(v, int) for v in raw):
            texts = [" ".join(map(str, raw))]
        else:
            texts = [v if isinstance(v, str) else " ".join(map(str, v)) for v in raw]
        dimensions = int(payload.get("dimensions") or DEFAULT_DIMENSIONS)
        as_base64 = payload.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = mock_vector(text, dimensions)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = max(1, sum(len(t) for t in texts) // 4)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


@contextmanager
def running_upstream() -> Iterator[MockUpstream]:
    mock = MockUpstream().start()
    try:
        yield mock
    finally:
        mock.stop()
