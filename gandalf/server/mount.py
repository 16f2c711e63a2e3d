"""An ASGI app (the admin API) served by the hand-rolled core, in memory.

The core dispatches ``/admin/v1...`` by prefix to :class:`AsgiMount`, which
builds an ASGI ``http`` scope from the :class:`~gandalf.server.wire.Request`
(authenticated, its body already read and capped by the core), feeds it one
``http.request`` message and collects ``http.response.start`` / ``body`` into a
:class:`~gandalf.server.wire.Response`. So the mounted app works the same under
ASGI and RSGI, and the ``/v1/*`` dispatch is untouched: exact paths are looked
up first, and this prefix is only tried when none matched.

The mounted app sees the caller's :class:`~gandalf.domain.Identity` (None on an
endpoint without auth) and the request id in ``scope["state"]`` (Starlette's
``request.state.identity`` / ``request.state.request_id``).
"""

from __future__ import annotations

from typing import Any

from gandalf.server.handlers import Endpoint, KeyAuth
from gandalf.server.types import ASGIApp, Message
from gandalf.server.wire import Request, Response

# Request headers the mounted app may read: the adapters hold headers
# differently (ASGI pairs, granian's mapping), so a fixed few are copied over.
FORWARDED: tuple[bytes, ...] = (b"content-type", b"accept", b"accept-encoding")
# Response headers the adapters write themselves.
_DROPPED = frozenset({b"content-length", b"x-request-id", b"transfer-encoding", b"connection"})
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class AsgiMount:
    """Calls ``app`` for one request and returns its whole answer (no streams:
    the admin API answers JSON documents)."""

    __slots__ = ("app", "forwarded")

    def __init__(self, app: ASGIApp, forwarded: tuple[bytes, ...] = FORWARDED) -> None:
        self.app = app
        self.forwarded = forwarded

    async def __call__(self, request: Request) -> Response:
        headers = []
        for name in self.forwarded:
            value = request.header(name)
            if value is not None:
                headers.append((name, value))
        body = request.body
        headers.append((b"content-length", b"%d" % len(body)))
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": request.path.encode("utf-8", "surrogateescape"),
            "root_path": "",
            "query_string": request.query,
            "headers": headers,
            "client": None,
            "server": None,
            "state": {"identity": request.identity, "request_id": request.request_id},
        }
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> Message:
            # The body, then (as a server would once the response is sent) a disconnect.
            return pending.pop() if pending else {"type": "http.disconnect"}

        status = 500
        out: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def send(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                out.extend(
                    (bytes(k).lower(), bytes(v))
                    for k, v in message.get("headers", ())
                    if bytes(k).lower() not in _DROPPED
                )
            elif kind == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        # HEAD: the headers of a GET without its body (an HTTP/1.1 client reads none).
        body_out = b"" if request.method == "HEAD" else b"".join(chunks)
        return Response(status, body_out, tuple(out))


def mount(app: ASGIApp, auth: KeyAuth | None, forwarded: tuple[bytes, ...] = FORWARDED) -> Endpoint:
    """An endpoint (every method, body read) that runs ``app`` in memory, the
    caller authenticated by ``auth`` first (None: open, e.g. a schema document).
    ``forwarded``: the request headers ``app`` sees (lower-case names)."""
    handler = AsgiMount(app, forwarded)
    return Endpoint(dict.fromkeys(METHODS, handler), reads_body=True, auth=auth)
