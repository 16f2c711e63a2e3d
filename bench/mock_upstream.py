"""A fast OpenAI-compatible mock upstream for benchmarks and local load tests.

It must never be the bottleneck of a run, so it speaks granian's native RSGI interface,
embedded in this one process (one Python thread, granian's Rust runtime for the sockets),
and does as little per request as it can: one ``orjson.loads`` of the body, then either a
cached prebuilt response or one ``orjson.dumps``.

Endpoints:
- ``POST /v1/chat/completions``: OpenAI's chat.completion JSON with ``usage``; with
  ``"stream": true`` an SSE stream of ``--chunks`` content chunks, a finish chunk, a usage-only
  chunk (``choices: []``) only when ``stream_options.include_usage`` is true, then ``[DONE]``.
- ``POST /v1/embeddings``: deterministic unit vectors per input string; honours
  ``dimensions`` and ``encoding_format: base64``.
- ``GET /v1/models``: an OpenAI list of a few model ids.

With ``--openai-headers`` chat answers also carry the headers OpenAI's own answers do
(``openai-organization``, ``openai-processing-ms``, ``openai-version``, ``x-request-id`` and
the six ``x-ratelimit-*``), which the gateway relays: a load closer to production than the
default's lone ``content-type`` (the gateway's own ``x-ratelimit-*`` replace the upstream's).

Run: ``python bench/mock_upstream.py --port 0`` prints exactly one stdout line,
``mock_upstream listening on http://127.0.0.1:PORT``, once the socket is bound.
Other scripts use :func:`start_mock` to run it as a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

LISTEN_PREFIX = "mock_upstream listening on http://"
MODELS = ("bench-model", "gpt-4o", "gpt-4o-mini", "text-embedding-3-small")
DEFAULT_EMBED_DIMS = 1536
_CACHE_MAX = 256

_JSON_HEADERS = [("content-type", "application/json")]
_SSE_HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
]
# What OpenAI's answers carry besides content-type (values fixed: the gateway relays them).
_OPENAI_HEADERS = [
    ("openai-organization", "org-mock"),
    ("openai-processing-ms", "212"),
    ("openai-version", "2020-10-01"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999975"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"),
    ("x-request-id", "req_0123456789abcdef0123456789abcdef"),
]
_DONE = b"data: [DONE]\n\n"
_REPLY_WORDS = (
    "Hello",
    "!",
    " I",
    "'m",
    " doing",
    " well",
    ",",
    " thank",
    " you",
    " for",
    " asking",
    ".",
    " How",
    " can",
    " I",
    " help",
    " you",
    " today",
    "?",
    " ",
)


def _error(message: str, code: str) -> bytes:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return orjson.dumps(body)


_NOT_FOUND = _error("Unknown path", "not_found")
_BAD_JSON = _error("Request body is not valid JSON", "invalid_json")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class MockApp:
    """The RSGI application. Responses are cached per model; the cache is bounded."""

    __slots__ = (
        "_models_body",
        "_plain",
        "_streams",
        "chunk_delay",
        "chunks",
        "created",
        "json_headers",
        "latency",
        "sse_headers",
    )

    def __init__(
        self,
        chunks: int = 20,
        latency_ms: float = 0.0,
        chunk_delay_ms: float = 0.0,
        openai_headers: bool = False,
    ) -> None:
        extra = _OPENAI_HEADERS if openai_headers else []
        self.json_headers = [*_JSON_HEADERS, *extra]  # chat answers
        self.sse_headers = [*_SSE_HEADERS, *extra]
        self.chunks = chunks
        self.latency = latency_ms / 1000.0
        self.chunk_delay = chunk_delay_ms / 1000.0
        self.created = int(time.time())
        self._plain: dict[tuple[str, int], bytes] = {}
        self._streams: dict[tuple[str, bool, int], list[bytes]] = {}
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": self.created, "owned_by": "mock"}
                    for m in MODELS
                ],
            }
        )

    # -- response builders (results cached; a bench sends the same few models) --

    def _completion_text(self) -> str:
        return "".join(_REPLY_WORDS[i % len(_REPLY_WORDS)] for i in range(self.chunks))

    def plain_body(self, model: str, prompt_tokens: int) -> bytes:
        key = (model, prompt_tokens)
        body = self._plain.get(key)
        if body is None:
            completion_tokens = self.chunks
            body = orjson.dumps(
                {
                    "id": "chatcmpl-mock0000000000000000000000",
                    "object": "chat.completion",
                    "created": self.created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": self._completion_text(),
                                "refusal": None,
                            },
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                    "system_fingerprint": "fp_mock",
                }
            )
            if len(self._plain) >= _CACHE_MAX:
                self._plain.clear()
            self._plain[key] = body
        return body

    def stream_events(self, model: str, include_usage: bool, prompt_tokens: int) -> list[bytes]:
        key = (model, include_usage, prompt_tokens)
        events = self._streams.get(key)
        if events is not None:
            return events
        base: dict[str, Any] = {
            "id": "chatcmpl-mock0000000000000000000000",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
            "system_fingerprint": "fp_mock",
        }
        events = []
        for i in range(self.chunks):
            delta: dict[str, Any] = {"content": _REPLY_WORDS[i % len(_REPLY_WORDS)]}
            if i == 0:
                delta = {"role": "assistant", "content": delta["content"], "refusal": None}
            chunk = dict(
                base,
                choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            )
            if include_usage:
                chunk["usage"] = None
            events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        final = dict(
            base, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
        )
        if include_usage:
            final["usage"] = None
        events.append(b"data: " + orjson.dumps(final) + b"\n\n")
        if include_usage:
            usage = dict(
                base,
                choices=[],
                usage={
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": self.chunks,
                    "total_tokens": prompt_tokens + self.chunks,
                },
            )
            events.append(b"data: " + orjson.dumps(usage) + b"\n\n")
        events.append(_DONE)
        if len(self._streams) >= _CACHE_MAX:
            self._streams.clear()
        self._streams[key] = events
        return events

    # -- RSGI entry point --

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        path = scope.path
        if path == "/v1/chat/completions" and scope.method == "POST":
            await self._chat(proto)
        elif path == "/v1/embeddings" and scope.method == "POST":
            await self._embeddings(proto)
        elif path == "/v1/models" and scope.method == "GET":
            proto.response_bytes(200, _JSON_HEADERS, self._models_body)
        elif path == "/healthz":
            proto.response_bytes(200, _JSON_HEADERS, b'{"status":"ok"}')
        else:
            proto.response_bytes(404, _JSON_HEADERS, _NOT_FOUND)

    async def _chat(self, proto: Any) -> None:
        raw = await proto()
        try:
            req = orjson.loads(raw)
            model = str(req.get("model") or "bench-model")
        except (orjson.JSONDecodeError, AttributeError):
            proto.response_bytes(400, _JSON_HEADERS, _BAD_JSON)
            return
        # A cheap, deterministic token estimate: about four bytes per token.
        prompt_tokens = max(1, len(raw) // 4)
        if self.latency:
            await asyncio.sleep(self.latency)
        if req.get("stream") is not True:
            proto.response_bytes(200, self.json_headers, self.plain_body(model, prompt_tokens))
            return
        opts = req.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        events = self.stream_events(model, include_usage, prompt_tokens)
        transport = proto.response_stream(200, self.sse_headers)
        delay = self.chunk_delay
        last = len(events) - 1
        for i, event in enumerate(events):
            await transport.send_bytes(event)
            if delay and i < last:
                await asyncio.sleep(delay)

    async def _embeddings(self, proto: Any) -> None:
        raw = await proto()
        try:
            req = orjson.loads(raw)
            inputs = req["input"]
            dims = int(req.get("dimensions") or DEFAULT_EMBED_DIMS)
            model = str(req.get("model") or "text-embedding-3-small")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            proto.response_bytes(400, _JSON_HEADERS, _BAD_JSON)
            return
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        as_b64 = req.get("encoding_format") == "base64"
        if self.latency:
            await asyncio.sleep(self.latency)
        data = []
        tokens = 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += max(1, len(text) // 4)
            vec = embedding_vector(text, dims)
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        body = orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        proto.response_bytes(200, _JSON_HEADERS, body)


def embedding_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text``: same text and dims, same vector."""
    seed = hashlib.blake2b(text.encode(), digest_size=8).digest()
    a, b = struct.unpack("<II", seed)
    vec = [math.sin(a * 1e-6 + (i + 1) * (b % 9973 + 1) * 1e-3) for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


async def _serve(app: MockApp, host: str, port: int) -> None:
    from granian.constants import Interfaces
    from granian.server.embed import Server

    server = Server(
        app,
        address=host,
        port=port,
        interface=Interfaces.RSGI,
        websockets=False,
        log_enabled=False,
        backlog=2048,
    )

    def announce() -> None:
        sys.stdout.write(f"{LISTEN_PREFIX}{host}:{port}\n")
        sys.stdout.flush()

    server.on_startup(announce)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.serve()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fast OpenAI-compatible mock upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before answering")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="delay between stream chunks"
    )
    parser.add_argument(
        "--openai-headers",
        action="store_true",
        help="chat answers carry OpenAI's own headers (x-ratelimit-*, x-request-id, openai-*)",
    )
    args = parser.parse_args(argv)
    port = args.port or free_port(args.host)
    app = MockApp(
        chunks=args.chunks,
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        openai_headers=args.openai_headers,
    )
    try:
        import uvloop

        uvloop.run(_serve(app, args.host, port))
    except ImportError:
        asyncio.run(_serve(app, args.host, port))


def read_listen_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> int:
    """Wait for a ``... listening on http://HOST:PORT`` stdout line; return PORT."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise RuntimeError(f"{what} did not report its port (exit={proc.poll()})")
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"{what} closed stdout before reporting its port")
                buf += chunk
    finally:
        sel.close()
    line = buf.split(b"\n", 1)[0].decode()
    return int(line.rsplit(":", 1)[1].strip().rstrip("/"))


def start_mock(
    port: int = 0,
    *,
    chunks: int = 20,
    latency_ms: float = 0.0,
    chunk_delay_ms: float = 0.0,
    cpus: str | None = None,
    timeout: float = 15.0,
    openai_headers: bool = False,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the mock as a subprocess in its own session; return ``(process, port)``.

    ``openai_headers``: chat answers carry OpenAI's headers (``--openai-headers``).
    ``cpus`` (e.g. ``"1"``) pins it with ``taskset -c``. The caller stops it with
    ``proc.terminate()`` (or ``os.killpg(proc.pid, ...)``: it leads its process group).
    Its stderr goes to an anonymous temp file, quoted in the error if it fails to start.
    """
    import tempfile

    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--port",
        str(port),
        "--chunks",
        str(chunks),
        "--latency-ms",
        str(latency_ms),
        "--chunk-delay-ms",
        str(chunk_delay_ms),
        *(["--openai-headers"] if openai_headers else []),
    ]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        try:
            real_port = read_listen_line(proc, timeout, "mock_upstream")
        except BaseException as exc:
            proc.kill()
            proc.wait()
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"{exc}\n{tail}") from exc
    return proc, real_port


if __name__ == "__main__":
    main()
