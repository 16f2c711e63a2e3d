"""The ASGI callable: lifespan, the dispatch table, and the one error boundary.

Import has no side effects: all state is built by the ``build`` coroutine at
``lifespan.startup`` (once per worker process) and torn down at shutdown,
after in-flight requests have drained (bounded by ``shutdown_timeout``).

Per request: one pass over the headers, one dict lookup to dispatch, one
capped body read, the handler, and one start + one body message.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType
from typing import Any

import orjson

from gandalf.domain import CANCEL_DISCONNECT
from gandalf.errors import BodyTooLarge, GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from gandalf.server.handlers import Endpoint
from gandalf.server.stream import SHUTDOWN, ASGIWriter, relay
from gandalf.server.types import Receive, Scope, Send
from gandalf.server.wire import (
    JSON_CT,
    JSON_HEADERS,
    Request,
    Response,
    StreamWatcher,
    sane_request_id,
    uuid7,
)

logger = logging.getLogger("gandalf.server")
access_logger = logging.getLogger("gandalf.access")

_INTERNAL = GatewayError("The gateway hit an internal error; it has been logged.")
_SHUTDOWN_BODY = (
    b'{"error":{"message":"Gandalf is shutting down and could not finish this request in '
    b'time.","type":"service_unavailable","param":null,"code":"server_shutdown"}}'
)
NOT_READY_BODY = GatewayError("Gandalf is starting or stopping.").body()
_START = "http.response.start"
_BODY = "http.response.body"


class ClientDisconnected(Exception):
    """The client went away before its request body arrived."""


class Runtime:
    """What lifespan startup builds: the endpoints and how to close everything."""

    __slots__ = ("close", "endpoints", "prefixes")

    def __init__(
        self,
        endpoints: dict[str, Endpoint],
        close: Callable[[], Awaitable[None]],
        prefixes: Sequence[tuple[str, Endpoint]] = (),
    ) -> None:
        self.endpoints = endpoints
        self.close = close
        # Paths that carry a value (Gemini's /v1beta/models/{model}:method), tried
        # in order only when no exact path matched.
        self.prefixes = tuple(prefixes)


class GandalfApp:
    """``await app(scope, receive, send)``. One instance per worker process."""

    def __init__(
        self,
        build: Callable[[], Awaitable[Runtime]],
        *,
        max_body_bytes: int = 4 * 1024 * 1024,
        shutdown_timeout: float = 30.0,
        access_log: bool = True,
        stream_keepalive: float = 15.0,
        handle_signals: bool = False,
    ) -> None:
        """``handle_signals``: in a server worker, start the drain deadline on
        SIGTERM/SIGINT (granian keeps serving in-flight requests until they end,
        so the app itself must bound them by ``shutdown_timeout``)."""
        self._build = build
        self._max_body = max_body_bytes
        self._shutdown_timeout = shutdown_timeout
        self._access_log = access_log
        self._keepalive = stream_keepalive
        self._stream_watcher = StreamWatcher(tick=min(0.2, stream_keepalive / 2))
        self._active: set[asyncio.Task[Any]] = set()  # every request in flight
        self._handle_signals = handle_signals
        self._previous_handlers: dict[int, Any] = {}
        self._deadline: asyncio.TimerHandle | None = None
        self._endpoints: dict[str, Endpoint] | None = None
        self._runtime: Runtime | None = None
        self._idle: asyncio.Event | None = None

    @property
    def inflight(self) -> int:
        return len(self._active)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # ------------------------------------------------------------------ http

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        caller_id = authorization = api_key = length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                length = value
            elif name == b"x-api-key":
                api_key = value
            elif name == b"x-request-id":
                caller_id = value
        request_id = (caller_id is not None and sane_request_id(caller_id)) or uuid7()
        if self._endpoints is None:
            await _send(send, 503, NOT_READY_BODY, JSON_HEADERS, request_id)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        task = asyncio.current_task()
        assert task is not None
        active = self._active
        active.add(task)
        try:
            response = await self._respond(
                task,
                method,
                path,
                scope["headers"],
                request_id,
                authorization,
                api_key,
                length,
                scope.get("query_string", b""),
                started,
                self._read_body,
                receive,
            )
            if response is None:
                return
            if response.stream is None:
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
                    self._keepalive,
                    self._stream_watcher,
                )
        finally:
            active.discard(task)
            if not active and self._idle is not None:
                self._idle.set()
        if self._access_log:
            self._log_access(method, path, status, started, request_id)

    def _prefixed(self, path: str) -> Endpoint:
        runtime = self._runtime
        if runtime is not None:
            for prefix, endpoint in runtime.prefixes:
                if path.startswith(prefix):
                    return endpoint
        raise NotFound(f"Unknown path: {path[:200]}")

    async def _respond(
        self,
        task: asyncio.Task[Any],
        method: str,
        path: str,
        headers: Any,
        request_id: str,
        authorization: bytes | None,
        api_key: bytes | None,
        length: bytes | None,
        query: bytes,
        started: float,
        read_body: Callable[[Any, bytes | None], Awaitable[bytes]],
        receive: Receive,
    ) -> Response | None:
        """Dispatch, run the handler and turn every failure into a response.
        Shared by the ASGI and RSGI entry points; None: the client is gone."""
        endpoints = self._endpoints
        assert endpoints is not None
        endpoint = None
        try:
            endpoint = endpoints.get(path)
            if endpoint is None:
                endpoint = self._prefixed(path)
            handler = endpoint.methods.get(method)
            if handler is None:
                raise MethodNotAllowed(
                    f"Method {method} is not allowed on {path}; use {endpoint.allow}.",
                    allow=endpoint.allow,
                )
            body = await read_body(receive, length) if endpoint.reads_body else b""
            return await handler(
                Request(
                    method,
                    path,
                    headers,
                    body,
                    request_id,
                    authorization,
                    api_key,
                    query,
                    started,
                    receive,
                    self._stream_watcher,
                )
            )
        except GatewayError as exc:
            extra = exc.headers()
            render = endpoint.render if endpoint is not None else None
            return Response(
                exc.status,
                exc.body() if render is None else render(exc),
                (JSON_CT, *extra) if extra else JSON_HEADERS,
            )
        except ClientDisconnected:
            return None
        except asyncio.CancelledError as exc:
            reason = exc.args[0] if exc.args else None
            if reason == CANCEL_DISCONNECT:
                task.uncancel()  # the client is gone: nobody to answer
                return None
            if reason != SHUTDOWN:
                raise
            task.uncancel()  # the shutdown deadline passed: answer, then stop
            return Response(503, _SHUTDOWN_BODY)
        except Exception:
            logger.exception("internal error handling %s %s (request %s)", method, path, request_id)
            return Response(500, _INTERNAL.body())

    def _log_access(
        self, method: str, path: str, status: int, started: float, request_id: str
    ) -> None:
        access_logger.info(
            "%s",
            orjson.dumps(
                {
                    "ts": round(time.time(), 3),
                    "method": method,
                    "path": path,
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000.0, 2),
                    "request_id": request_id,
                }
            ).decode(),
        )

    async def _read_body(self, receive: Receive, length: bytes | None) -> bytes:
        limit = self._max_body
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise InvalidRequest("Invalid Content-Length header.") from None
            if declared > limit:
                raise too_large(limit)
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnected
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > limit:
                raise too_large(limit)
            return body
        chunks = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # ------------------------------------------------------------------ lifespan

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                try:
                    runtime = await self._build()
                except BaseException as exc:
                    logger.error("start-up failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    raise
                self._runtime = runtime
                self._endpoints = runtime.endpoints
                if self._handle_signals:
                    self._worker_ready(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:
                    logger.exception("shutdown failed")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Build state without a server (tests, benchmarks)."""
        runtime = await self._build()
        self._runtime = runtime
        self._endpoints = runtime.endpoints

    def start_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        """Build state on ``loop`` before it runs (RSGI's ``__rsgi_init__``)."""
        loop.run_until_complete(self.startup())
        if self._handle_signals:
            self._worker_ready(loop)

    def _worker_ready(self, loop: asyncio.AbstractEventLoop) -> None:
        """A server worker finished building its state."""
        self._install_signal_drain(loop)
        # Everything built so far lives as long as the worker: move it out of the
        # collector's way (measured ~3% CPU per request under load).
        gc.collect()
        gc.freeze()

    def _install_signal_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Chain a Python-level SIGTERM/SIGINT handler in front of the event
        loop's: the loop's own handlers (granian's) still run, through the
        signal wakeup fd and the previous handler, which is called too."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            self._previous_handlers[signum] = previous

            def handler(num: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.begin_drain)
                if callable(previous):
                    previous(num, frame)

            signal.signal(signum, handler)

    def _restore_signals(self) -> None:
        for signum, previous in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._previous_handlers.clear()

    def begin_drain(self) -> None:
        """The server stopped accepting: in-flight requests get ``shutdown_timeout``
        to finish; after that, streams end with an error event and other
        requests are answered 503."""
        if self._deadline is None:
            loop = asyncio.get_running_loop()
            logger.info(
                "draining %d in-flight request(s), at most %.1fs",
                len(self._active),
                self._shutdown_timeout,
            )
            self._deadline = loop.call_later(self._shutdown_timeout, self._cut_off)

    def _cut_off(self) -> None:
        if self._active:
            logger.warning(
                "shutdown timeout: ending %d request(s) still in flight", len(self._active)
            )
        for task in list(self._active):
            task.cancel(SHUTDOWN)

    async def shutdown(self) -> None:
        """Wait for in-flight requests (bounded), then close everything. Idempotent."""
        runtime = self._runtime
        if runtime is None:
            return
        self._restore_signals()
        if self._active:
            self.begin_drain()
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), self._shutdown_timeout + 5.0)
            except TimeoutError:
                logger.error(
                    "%d request(s) did not end after the shutdown timeout", len(self._active)
                )
        if self._deadline is not None:
            self._deadline.cancel()
        self._runtime = None
        self._endpoints = None
        await runtime.close()


def too_large(limit: int) -> BodyTooLarge:
    """The 413 for a body over ``limit`` bytes (both entry points)."""
    return BodyTooLarge(f"Request body is larger than the limit of {limit} bytes.")


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
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": _BODY, "body": body})
