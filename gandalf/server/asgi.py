"""The ASGI adapter: ASGI messages in, ``wire.Request``; ``wire.Response`` out.

Import has no side effects: all state is built at ``lifespan.startup`` (once
per worker process) by the :class:`~gandalf.server.lifecycle.Lifecycle`, and
torn down at shutdown after in-flight requests have drained. Dispatch,
authentication, the body read, the error boundary and the access log are the
:class:`~gandalf.server.core.ServerCore`'s, shared with the RSGI adapter.

Per request: one pass over the headers, the core, then one start + one body
message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from gandalf.errors import BodyTooLarge, GatewayError, IncompleteBody
from gandalf.observability.metrics import Metrics
from gandalf.server.core import (
    DRAIN_FACTOR,
    DUPLICATE_CREDENTIALS,
    NOT_READY_BODY,
    RequestTracer,
    Runtime,
    ServerCore,
    declared_length,
    drains,
    too_large,
)
from gandalf.server.lifecycle import Lifecycle
from gandalf.server.stream import ASGIWriter, relay
from gandalf.server.types import Receive, Scope, Send
from gandalf.server.wire import JSON_HEADERS, Request, sane_request_id, uuid7

__all__ = ["NOT_READY_BODY", "GandalfApp", "Runtime", "too_large"]

logger = logging.getLogger("gandalf.server")

_START = "http.response.start"
_BODY = "http.response.body"
_INCOMPLETE = "The request body ended before the announced Content-Length arrived."


async def read_asgi_body(request: Request, length: bytes | None, limit: int) -> bytes:
    """The body from ASGI ``http.request`` messages, capped at ``limit`` bytes
    (a larger one is read and dropped first, up to ``DRAIN_FACTOR`` times the
    limit: see core.DRAIN_FACTOR)."""
    receive = request.receive
    assert receive is not None
    try:
        declared_length(length, limit)
    except BodyTooLarge:
        if drains(length, limit):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        raise
    message = await receive()
    if message["type"] != "http.request":
        raise IncompleteBody(_INCOMPLETE)
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    most = limit * DRAIN_FACTOR
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise IncompleteBody(_INCOMPLETE)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > most:
            raise too_large(limit)
        if not message.get("more_body", False):
            if size > limit:
                raise too_large(limit)
            return b"".join(chunks)


class GandalfApp:
    """``await app(scope, receive, send)``. One instance per worker process.

    ``core`` and ``lifecycle`` are public: the RSGI adapter serves the same
    ones (``RSGIApp(app)``)."""

    __slots__ = ("core", "lifecycle")

    def __init__(
        self,
        build: Callable[[], Awaitable[Runtime]],
        *,
        max_body_bytes: int = 4 * 1024 * 1024,
        read_timeout: float = 30.0,
        shutdown_timeout: float = 30.0,
        access_log: bool = True,
        stream_keepalive: float = 15.0,
        handle_signals: bool = False,
        metrics: Metrics | None = None,
        log_info: bool = True,
        tracing: RequestTracer | None = None,
    ) -> None:
        """``handle_signals``: in a server worker, start the drain deadline on
        SIGTERM/SIGINT (see Lifecycle). ``metrics``, ``log_info``: see ServerCore."""
        self.core = ServerCore(
            build,
            max_body_bytes=max_body_bytes,
            read_timeout=read_timeout,
            access_log=access_log,
            stream_keepalive=stream_keepalive,
            metrics=metrics,
            log_info=log_info,
            tracing=tracing,
        )
        self.lifecycle = Lifecycle(
            self.core, shutdown_timeout=shutdown_timeout, handle_signals=handle_signals
        )

    @property
    def inflight(self) -> int:
        return self.core.inflight

    async def startup(self) -> None:
        """Build state without a server (tests, benchmarks)."""
        await self.core.start()

    async def shutdown(self) -> None:
        await self.lifecycle.shutdown()

    def begin_drain(self) -> None:
        self.lifecycle.begin_drain()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # An HTTP request is served here rather than in a method of its own:
        # one coroutine frame less, created per request and passed through at
        # every resume of the request's task.
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        started = time.perf_counter()
        core = self.core
        caller_id = authorization = api_key = length = traceparent = None
        refused: GatewayError | None = None
        headers = scope["headers"]
        for name, value in headers:
            if name == b"authorization":
                if authorization is not None:
                    refused = DUPLICATE_CREDENTIALS
                authorization = value
            elif name == b"content-length":
                length = value
            elif name == b"x-api-key":
                if api_key is not None:
                    refused = DUPLICATE_CREDENTIALS
                api_key = value
            elif name == b"x-request-id":
                caller_id = value
            elif name == b"traceparent":
                traceparent = value
        request_id = (caller_id is not None and sane_request_id(caller_id)) or uuid7()
        method: str = scope["method"]
        path: str = scope["path"]
        status = 499  # until something is sent: the client left first
        if core.endpoints is None:
            status = 503
            await _send(send, 503, NOT_READY_BODY, JSON_HEADERS, request_id)
            if core.observed:
                core.finished(method, path, status, started, request_id, traceparent)
            return
        task = asyncio.current_task()
        assert task is not None
        core.enter(task)
        try:
            response = await core.respond(
                task,
                Request(
                    method,
                    path,
                    headers,
                    b"",
                    request_id,
                    authorization,
                    api_key,
                    scope.get("query_string", b""),
                    started,
                    receive,
                    core.watcher,
                    task,
                ),
                length,
                read_asgi_body,
                refused,
                traceparent,
            )
            if response is None:
                pass  # the client is gone
            elif response.stream is None:
                status = response.status
                body = response.body
                try:
                    await send(
                        {
                            "type": _START,
                            "status": status,
                            "headers": [
                                *response.headers,
                                (b"content-length", b"%d" % len(body)),
                                (b"x-request-id", request_id.encode()),
                            ],
                        }
                    )
                    await send({"type": _BODY, "body": body})
                except OSError:
                    pass  # the client went away; nothing left to tell it
            else:
                status = await relay(
                    ASGIWriter(send),
                    receive,
                    response,
                    request_id.encode(),
                    core.keepalive,
                    core.watcher,
                    task,
                )
        finally:
            core.leave(task)
            if core.observed:
                core.finished(method, path, status, started, request_id, traceparent)

    # ------------------------------------------------------------------ lifespan

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                try:
                    await self.lifecycle.startup()
                except BaseException as exc:
                    logger.error("start-up failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    raise
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                try:
                    await self.lifecycle.shutdown()
                except Exception as exc:
                    logger.exception("shutdown failed")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _send(
    send: Send,
    status: int,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...],
    request_id: str,
) -> None:
    await send(
        {
            "type": _START,
            "status": status,
            "headers": [
                *headers,
                (b"content-length", b"%d" % len(body)),
                (b"x-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": _BODY, "body": body})
