"""The thinnest passthrough on Gandalf's own stack: the "what the stack allows" reference.

granian (worker processes, uvloop) + one aiohttp ClientSession per worker (keep-alive, no
low connection cap). ``POST /v1/chat/completions`` is forwarded as-is to ``--upstream``: body
bytes and content-type go up; status, content-type and body come back. A
``text/event-stream`` answer is relayed chunk by chunk as it arrives; anything else is read
whole and returned. No auth, no parsing, no usage records.

Two variants of the same passthrough, one per granian interface (``--interface``):

- ``asgi`` (default, :data:`app`): ASGI messages, lifespan owns the session;
- ``rsgi`` (:data:`rsgi_app`): granian's native RSGI protocol, ``__rsgi_init__`` /
  ``__rsgi_del__`` own the session.

Run: ``python bench/baseline.py --port 0 --upstream http://127.0.0.1:PORT [--workers 1]
[--interface asgi|rsgi]`` prints one stdout line ``baseline listening on
http://127.0.0.1:PORT`` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LISTEN_PREFIX = "baseline listening on http://"
_UPSTREAM_ENV = "GANDALF_BENCH_BASELINE_UPSTREAM"

_NOT_FOUND_START: Message = {
    "type": "http.response.start",
    "status": 404,
    "headers": [(b"content-type", b"application/json")],
}
_NOT_FOUND_BODY: Message = {
    "type": "http.response.body",
    "body": b'{"error":{"message":"not found","type":"invalid_request_error",'
    b'"param":null,"code":"not_found"}}',
}
_BAD_GATEWAY_START: Message = {
    "type": "http.response.start",
    "status": 502,
    "headers": [(b"content-type", b"application/json")],
}
_BAD_GATEWAY_BODY: Message = {
    "type": "http.response.body",
    "body": b'{"error":{"message":"upstream failed","type":"upstream_error",'
    b'"param":null,"code":"upstream_error"}}',
}
_EMPTY_BODY: Message = {"type": "http.response.body", "body": b"", "more_body": False}


def _upstream_url() -> str:
    return os.environ.get(_UPSTREAM_ENV, "").rstrip("/") + "/v1/chat/completions"


async def _open_session() -> Any:
    """The one aiohttp session per worker, identical for both interfaces."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


class BaselineApp:
    """ASGI app; lifespan owns the aiohttp session (one per worker process)."""

    def __init__(self) -> None:
        self.session: Any = None
        self.url = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
                await self._forward(scope, receive, send)
            else:
                await send(_NOT_FOUND_START)
                await send(_NOT_FOUND_BODY)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.url = _upstream_url()
                self.session = await _open_session()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        content_type = b"application/json"
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
                break
        try:
            async with self.session.post(
                self.url, data=body, headers={"Content-Type": content_type.decode("latin-1")}
            ) as resp:
                resp_type = resp.headers.get("Content-Type", "application/json")
                headers = [(b"content-type", resp_type.encode("latin-1"))]
                if resp_type.startswith("text/event-stream"):
                    await send(
                        {"type": "http.response.start", "status": resp.status, "headers": headers}
                    )
                    async for chunk in resp.content.iter_any():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send(_EMPTY_BODY)
                    return
                payload = await resp.read()
        except Exception:
            await send(_BAD_GATEWAY_START)
            await send(_BAD_GATEWAY_BODY)
            return
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


app = BaselineApp()

_JSON_STR_HEADERS = [("content-type", "application/json")]


class BaselineRSGI:
    """The same passthrough on granian's RSGI protocol; one aiohttp session per worker."""

    def __init__(self) -> None:
        self.session: Any = None
        self.url = ""

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.url = _upstream_url()
        self.session = loop.run_until_complete(_open_session())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.session is not None:
            loop.run_until_complete(self.session.close())

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            return
        if scope.path != "/v1/chat/completions" or scope.method != "POST":
            protocol.response_bytes(404, _JSON_STR_HEADERS, _NOT_FOUND_BODY["body"])
            return
        body = await protocol()
        content_type = scope.headers.get("content-type", "application/json")
        streaming = False
        try:
            async with self.session.post(
                self.url, data=body, headers={"Content-Type": content_type}
            ) as resp:
                resp_type = resp.headers.get("Content-Type", "application/json")
                headers = [("content-type", resp_type)]
                if resp_type.startswith("text/event-stream"):
                    streaming = True
                    transport = protocol.response_stream(resp.status, headers)
                    async for chunk in resp.content.iter_any():
                        await transport.send_bytes(chunk)
                    return
                payload = await resp.read()
        except Exception:
            if not streaming:  # once streaming, the status is sent: just stop
                protocol.response_bytes(502, _JSON_STR_HEADERS, _BAD_GATEWAY_BODY["body"])
            return
        protocol.response_bytes(resp.status, headers, payload)


rsgi_app = BaselineRSGI()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def main(argv: Sequence[str] | None = None) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    parser = argparse.ArgumentParser(description="Thinnest granian+aiohttp passthrough.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--interface", choices=("asgi", "rsgi"), default="asgi", help="granian interface"
    )
    args = parser.parse_args(argv)
    rsgi = args.interface == "rsgi"
    port = args.port or _free_port(args.host)
    os.environ[_UPSTREAM_ENV] = args.upstream
    server = Granian(
        "baseline:rsgi_app" if rsgi else "baseline:app",
        address=args.host,
        port=port,
        interface=Interfaces.RSGI if rsgi else Interfaces.ASGI,
        workers=args.workers,
        loop=Loops.uvloop,
        websockets=False,
        log_enabled=False,
        backlog=2048,
        working_dir=Path(__file__).resolve().parent,
    )

    def announce() -> None:
        sys.stdout.write(f"{LISTEN_PREFIX}{args.host}:{port}\n")
        sys.stdout.flush()

    server.on_startup(announce)
    server.serve()


if __name__ == "__main__":
    main()
