"""A trivial HTTP/1.1 server on 127.0.0.1 that answers every request at once with
a fixed chat completion (or, for ``"stream":true``, a fixed SSE stream of
``chunks`` content chunks with usage): what the built-in client is measured
against to know its own ceiling, so a report never presents the load
generator's limit as the target's.

It runs in its own process on granian, as the gateway does (``python -m
gandalf.benchkit.trivial --port 0`` prints ``trivial listening on
http://127.0.0.1:PORT``), so its work shares neither the client's core nor its
event loop, and it answers several times faster than the client can ask;
:func:`serve` starts a plain asyncio version in the current loop (tests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

LISTEN_PREFIX = "trivial listening on http://"


def _answers(chunks: int) -> tuple[bytes, bytes]:
    usage = {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks}
    plain = orjson.dumps(
        {
            "id": "chatcmpl-trivial",
            "object": "chat.completion",
            "created": 0,
            "model": "trivial",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "tok " * chunks},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )
    head = b'data: {"id":"chatcmpl-trivial","object":"chat.completion.chunk","choices":'
    events = [
        head + b'[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n'
        for _ in range(chunks)
    ]
    events.append(head + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    events.append(head + b'[],"usage":' + orjson.dumps(usage) + b"}\n\n")
    events.append(b"data: [DONE]\n\n")
    sse = b"".join(events)

    def response(content_type: bytes, body: bytes) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: "
            + content_type
            + b"\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    return response(b"application/json", plain), response(b"text/event-stream", sse)


class _Protocol(asyncio.Protocol):
    __slots__ = ("_buf", "_plain", "_sse", "_transport")

    def __init__(self, plain: bytes, sse: bytes) -> None:
        self._buf = b""
        self._plain = plain
        self._sse = sse
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0].strip() or b"0")
            total = end + 4 + length
            if len(self._buf) < total:
                return
            body = self._buf[end + 4 : total]
            self._buf = self._buf[total:]
            stream = b'"stream":true' in body or b'"stream": true' in body
            self._transport.write(self._sse if stream else self._plain)


async def serve(port: int = 0, chunks: int = 20) -> tuple[asyncio.Server, int]:
    """Start the server in the running loop; return it and its port."""
    plain, sse = _answers(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Protocol(plain, sse), "127.0.0.1", port, backlog=4096
    )
    bound: int = server.sockets[0].getsockname()[1]
    return server, bound


class _RSGIApp:
    """The same answers on granian's RSGI interface (the subprocess): granian's
    Rust runtime does the HTTP, so the server stays far above the client."""

    def __init__(self, chunks: int) -> None:
        plain, sse = _answers(chunks)
        self.plain = plain.split(b"\r\n\r\n", 1)[1]
        self.sse = sse.split(b"\r\n\r\n", 1)[1]

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        body = await proto()
        if b'"stream":true' in body or b'"stream": true' in body:
            proto.response_bytes(200, [("content-type", "text/event-stream")], self.sse)
        else:
            proto.response_bytes(200, [("content-type", "application/json")], self.plain)


async def _main(port: int, chunks: int) -> None:
    import signal

    from granian.constants import Interfaces
    from granian.server.embed import Server

    if not port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    server = Server(
        _RSGIApp(chunks),
        address="127.0.0.1",
        port=port,
        interface=Interfaces.RSGI,
        websockets=False,
        log_enabled=False,
        backlog=4096,
    )

    def announce() -> None:
        sys.stdout.write(f"{LISTEN_PREFIX}127.0.0.1:{port}\n")
        sys.stdout.flush()

    server.on_startup(announce)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.serve()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="trivial chat completions server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(_main(args.port, args.chunks))
    except KeyboardInterrupt:
        pass


def start_process(chunks: int = 20, timeout: float = 15.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start the server as a subprocess; return it and its port (the caller stops it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gandalf.benchkit.trivial", "--chunks", str(chunks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                stop_process(proc)
                raise RuntimeError("the trivial server did not start")
            if sel.select(left):
                piece = os.read(proc.stdout.fileno(), 4096)
                if not piece:
                    stop_process(proc)
                    raise RuntimeError("the trivial server closed its stdout")
                buf += piece
    finally:
        sel.close()
    return proc, int(buf.split(b"\n", 1)[0].rsplit(b":", 1)[1])


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


if __name__ == "__main__":
    main()
