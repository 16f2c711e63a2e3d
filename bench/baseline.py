"""The thinnest passthrough on Gandalf's own stack: the "what the stack allows" reference.

granian (ASGI interface, worker processes, uvloop) + one aiohttp ClientSession per worker
(keep-alive, no low connection cap). ``POST /v1/chat/completions`` is forwarded as-is to
``--upstream``: body bytes and content-type go up; status, content-type and body come back.
An ``text/event-stream`` answer is relayed chunk by chunk as it arrives (``more_body``);
anything else is read whole and returned. No auth, no parsing, no usage records.

Run: ``python bench/baseline.py --port 0 --upstream http://127.0.0.1:PORT [--workers 1]``
prints one stdout line ``baseline listening on http://127.0.0.1:PORT`` once bound.
"""

from __future__ import annotations

import argparse
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
        import aiohttp

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                upstream = os.environ.get(_UPSTREAM_ENV, "").rstrip("/")
                self.url = upstream + "/v1/chat/completions"
                connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0)
                self.session = aiohttp.ClientSession(
                    connector=connector,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent",),
                )
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
    args = parser.parse_args(argv)
    port = args.port or _free_port(args.host)
    os.environ[_UPSTREAM_ENV] = args.upstream
    server = Granian(
        "baseline:app",
        address=args.host,
        port=port,
        interface=Interfaces.ASGI,
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
