"""Drive an ASGI app directly: no server, no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson

from gandalf.server.types import ASGIApp, Message


class Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        raw = name.lower().encode()
        for key, value in self.headers:
            if key == raw:
                return value.decode()
        return None

    def json(self) -> Any:
        return orjson.loads(self.body)


async def call(
    app: ASGIApp,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    chunks: Sequence[bytes] | None = None,
    json: Any = None,
    query: str = "",
    stay: bool = False,
) -> Reply:
    """One request through ``app``. ``chunks`` sends the body in several messages.

    Once the body is sent, ``receive`` reports a disconnect at once, unless
    ``stay``: then only once the whole response was sent, as a client that
    reads its answer to the end (a stream slower than the server's disconnect
    watch would otherwise be cancelled as if the client had left)."""
    if json is not None:
        body = orjson.dumps(json)
    parts = list(chunks) if chunks is not None else [body]
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": raw_headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }
    inbox: list[Message] = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]
    sent: list[Message] = []
    done = asyncio.Event()

    async def receive() -> Message:
        if inbox:
            return inbox.pop(0)
        if stay:
            await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(scope, receive, send)
    assert sent and sent[0]["type"] == "http.response.start", sent
    body_out = b"".join(m.get("body", b"") for m in sent[1:])
    return Reply(sent[0]["status"], list(sent[0]["headers"]), body_out)
