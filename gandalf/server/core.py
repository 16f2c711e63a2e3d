"""The server core: everything between an interface adapter and a handler.

``asgi.py`` and ``rsgi.py`` only translate their interface into a
:class:`~gandalf.server.wire.Request` and a :class:`~gandalf.server.wire.Response`
back; this module does the rest, the same way for both: dispatch (one dict
lookup, then path prefixes), authentication from the headers *before* the body
is read (a caller without a valid key never gets a byte of its body read),
the body read (capped at ``max_body_bytes`` and bounded in time by
``read_timeout``), the handler, the one error boundary, in-flight tracking,
and when a request ends (:meth:`ServerCore.finished`) its access log line
(written by ``accesslog.py``), its metrics and its tracing span, with the
facts its model call left (``observability/facts.py``). Drain and signals
are in ``lifecycle.py``.

Per request: one dict lookup, a cached key check (a dict get), one capped
body read registered with a worker-wide deadline timer, the handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from gandalf.domain import CANCEL_DISCONNECT, CANCEL_SHUTDOWN, UPSTREAM_IDS, UsageRecord
from gandalf.errors import (
    BodyTooLarge,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTimeout,
    printable,
)
from gandalf.observability.facts import take
from gandalf.observability.metrics import Metrics
from gandalf.server.accesslog import NULL, AccessLog, trace_id_of, valid_traceparent
from gandalf.server.handlers import Endpoint
from gandalf.server.wire import JSON_CT, JSON_HEADERS, Request, Response, StreamWatcher

logger = logging.getLogger("gandalf.server")

# Why a request task was cancelled by the read deadline (``task.cancel(msg)``).
CANCEL_READ_TIMEOUT = "request read timeout"

_INTERNAL = GatewayError("The gateway hit an internal error; it has been logged.")
SHUTDOWN_BODY = (
    b'{"error":{"message":"Gandalf is shutting down and could not finish this request in '
    b'time.","type":"service_unavailable","param":null,"code":"server_shutdown"}}'
)
NOT_READY_BODY = GatewayError("Gandalf is starting or stopping.").body()
DUPLICATE_CREDENTIALS = InvalidRequest(
    "The request carries more than one Authorization or x-api-key header; send one."
)

# ``read_body(request, content_length, limit)``: the adapter's body reader. Raises
# BodyTooLarge past ``limit``, IncompleteBody when the client stops sending
# before the body it announced is complete, InvalidRequest for a bad length.
BodyReader = Callable[[Request, "bytes | None", int], Awaitable[bytes]]


class RequestTracer(Protocol):
    """A span per request (observability/tracing.py), when tracing is on."""

    def start_request(self, method: str, path: str, traceparent: bytes | str | None) -> None: ...

    def end_request(self, status: int, facts: UsageRecord | None) -> None: ...


class Runtime:
    """What start-up builds: the endpoints and how to close everything."""

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


# A body over the limit is read to its end and dropped, up to this many times
# the limit, before the 413 goes out. Answered with the body unread, the
# connection cannot carry another request and granian closes it: a pooled
# client (the OpenAI SDK's httpx) can send its next request into that closing
# connection and get "server disconnected" instead of an answer, and a client
# still sending can be reset before it reads the 413. Larger bodies get the
# 413 at once. The drain counts against the body's read timeout like any read.
DRAIN_FACTOR = 4


def drains(length: bytes | None, limit: int) -> bool:
    """Whether a body whose ``content-length`` (valid, over ``limit``:
    :func:`declared_length` refused it) is small enough to read and drop
    before answering 413 (:data:`DRAIN_FACTOR`)."""
    return length is not None and int(length) <= limit * DRAIN_FACTOR


def too_large(limit: int) -> BodyTooLarge:
    """The 413 for a body over ``limit`` bytes (both adapters' readers)."""
    return BodyTooLarge(f"Request body is larger than the limit of {limit} bytes.")


def declared_length(length: bytes | None, limit: int) -> int | None:
    """A request's ``content-length`` as an int (None: not sent); raises
    InvalidRequest when it is not a number, BodyTooLarge when over ``limit``."""
    if length is None:
        return None
    try:
        declared = int(length)
    except ValueError:
        raise InvalidRequest("Invalid Content-Length header.") from None
    if declared < 0:
        raise InvalidRequest("Invalid Content-Length header.")
    if declared > limit:
        raise too_large(limit)
    return declared


class ReadDeadlines:
    """Bounds every body read in a worker by ``timeout`` seconds with one timer.

    ``start(task)`` records the deadline (a dict set, no timer of its own);
    a tick every ``tick`` seconds, only while bodies are being read, cancels
    the tasks past theirs with CANCEL_READ_TIMEOUT, which the core answers
    with a 408. A slow body is cut within ``timeout + tick`` seconds.
    """

    __slots__ = ("_handle", "_loop", "_reading", "tick", "timeout")

    def __init__(self, timeout: float, *, tick: float | None = None) -> None:
        self.timeout = timeout
        self.tick = tick if tick is not None else min(1.0, timeout / 4)
        self._reading: dict[asyncio.Task[Any], float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, task: asyncio.Task[Any]) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._reading[task] = loop.time() + self.timeout
        if self._handle is None:
            self._handle = loop.call_later(self.tick, self._tick)

    def done(self, task: asyncio.Task[Any]) -> None:
        self._reading.pop(task, None)

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        reading = self._reading
        for task in [t for t, deadline in reading.items() if deadline <= now]:
            del reading[task]
            task.cancel(CANCEL_READ_TIMEOUT)
        self._handle = loop.call_later(self.tick, self._tick) if reading else None

    def __len__(self) -> int:
        return len(self._reading)


class ServerCore:
    """One per worker process, shared by whichever adapter serves it.

    Public surface for the adapters: :attr:`endpoints` (None until started:
    answer NOT_READY_BODY with 503), :meth:`enter` / :meth:`leave` around each
    request, :meth:`respond`, :meth:`finished` (when :attr:`observed`),
    :attr:`watcher` and :attr:`keepalive` for streams, :attr:`max_body`.
    For the lifecycle: :meth:`start`, :meth:`stop`, :attr:`inflight`,
    :meth:`cancel_all`, :meth:`wait_idle`.
    """

    __slots__ = (
        "_active",
        "_build",
        "_idle",
        "_runtime",
        "access",
        "access_log",
        "endpoints",
        "keepalive",
        "log_info",
        "max_body",
        "metrics",
        "observed",
        "reads",
        "tracing",
        "watcher",
    )

    def __init__(
        self,
        build: Callable[[], Awaitable[Runtime]],
        *,
        max_body_bytes: int = 4 * 1024 * 1024,
        read_timeout: float = 30.0,
        access_log: bool = True,
        stream_keepalive: float = 15.0,
        metrics: Metrics | None = None,
        log_info: bool = True,
        tracing: RequestTracer | None = None,
    ) -> None:
        """``metrics``: record every request there (None: metrics off);
        ``tracing``: a span per request (None: tracing off);
        ``log_info``: write the access log's ``info`` lines (status below 500),
        not only its ``error`` ones (``log.level`` above info)."""
        self._build = build
        self.max_body = max_body_bytes
        self.access_log = access_log
        self.metrics = metrics
        self.log_info = log_info
        # Anything to do when a request ends (the adapters test this one flag).
        self.tracing = tracing
        self.observed = access_log or metrics is not None or tracing is not None
        self.access = AccessLog()  # record only when access_log; flushed at shutdown
        self.keepalive = stream_keepalive
        self.watcher = StreamWatcher(tick=min(0.2, stream_keepalive / 2))
        self.reads = ReadDeadlines(read_timeout)
        self._active: set[asyncio.Task[Any]] = set()  # every request in flight
        self._idle: asyncio.Event | None = None
        self._runtime: Runtime | None = None
        self.endpoints: dict[str, Endpoint] | None = None

    # ------------------------------------------------------------------ state

    async def start(self) -> None:
        """Build the endpoints (once per worker)."""
        runtime = await self._build()
        self._runtime = runtime
        self.endpoints = runtime.endpoints
        metrics = self.metrics
        if metrics is not None:
            metrics.paths = frozenset(runtime.endpoints)
            metrics.start()

    @property
    def started(self) -> bool:
        return self._runtime is not None

    async def stop(self) -> None:
        """Stop serving and close what start-up built. Idempotent."""
        runtime = self._runtime
        if runtime is None:
            return
        self._runtime = None
        self.endpoints = None
        try:
            await runtime.close()
        finally:
            if self.metrics is not None:
                self.metrics.stop()  # the last snapshot: its counts outlive this worker

    @property
    def inflight(self) -> int:
        return len(self._active)

    def enter(self, task: asyncio.Task[Any]) -> None:
        self._active.add(task)

    def leave(self, task: asyncio.Task[Any]) -> None:
        active = self._active
        active.discard(task)
        if not active and self._idle is not None:
            self._idle.set()

    def cancel_all(self, reason: str) -> int:
        """Cancel every request in flight with ``reason``; how many there were."""
        tasks = list(self._active)
        for task in tasks:
            task.cancel(reason)
        return len(tasks)

    async def wait_idle(self, limit: float) -> bool:
        """Wait until no request is in flight (at most ``limit`` s); False if some still are."""
        if not self._active:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), limit)
        except TimeoutError:
            return False
        return True

    def finished(
        self,
        method: str,
        path: str,
        status: int,
        started: float,
        request_id: str,
        traceparent: bytes | str | None = None,
    ) -> None:
        """A request ended with ``status`` (``started``: its ``perf_counter()``):
        its access log line and its metrics, with the facts its model call left
        (gandalf/observability/facts.py). ``traceparent``: the client's header."""
        facts, cache, first = take()
        if self.access_log and (status >= 500 or self.log_info):
            self.access.record(
                method,
                path,
                status,
                started,
                request_id,
                facts,
                NULL if traceparent is None else trace_id_of(traceparent),
                cache,
            )
        tracing = self.tracing
        if tracing is not None:
            tracing.end_request(status, facts)
        metrics = self.metrics
        if metrics is not None:
            metrics.request(path, status, time.perf_counter() - started, facts)
            if cache is not None and facts is not None:
                metrics.cache_result(facts.model_alias, cache)
            if first and facts is not None:
                model = facts.target_model or ""
                metrics.first_token(facts.model_alias, facts.provider or "", model, first - started)

    # ------------------------------------------------------------------ requests

    def _prefixed(self, path: str) -> Endpoint:
        runtime = self._runtime
        if runtime is not None:
            for prefix, endpoint in runtime.prefixes:
                if path.startswith(prefix):
                    return endpoint
        raise NotFound(f"Unknown path: {printable(path)}")

    async def respond(
        self,
        task: asyncio.Task[Any],
        request: Request,
        length: bytes | None,
        read_body: BodyReader,
        refused: GatewayError | None = None,
        traceparent: bytes | str | None = None,
    ) -> Response | None:
        """Dispatch ``request``, authenticate it, read its body, run the handler
        and turn every failure into a response in the endpoint's error shape.
        None: the client is gone (nobody to answer; log it as 499).

        ``refused``: the adapter found the request unacceptable from its headers
        alone (two credential headers): answered in the endpoint's shape.
        ``traceparent``: the client's W3C header, forwarded upstream when valid
        (with the request id, always: domain.UPSTREAM_IDS)."""
        UPSTREAM_IDS.set(
            (request.request_id, None if traceparent is None else valid_traceparent(traceparent))
        )
        tracing = self.tracing
        if tracing is not None:
            tracing.start_request(request.method, request.path, traceparent)
        endpoints = self.endpoints
        assert endpoints is not None
        endpoint = None
        path = request.path
        try:
            endpoint = endpoints.get(path)
            if endpoint is None:
                endpoint = self._prefixed(path)
            if endpoint.pick is not None:
                endpoint = endpoint.pick(request) or endpoint
            method = request.method
            handler = endpoint.methods.get(method)
            if handler is None:
                raise MethodNotAllowed(
                    f"Method {printable(method, 20)} is not allowed on {printable(path)}; "
                    f"use {endpoint.allow}.",
                    allow=endpoint.allow,
                )
            if refused is not None:
                raise refused
            auth = endpoint.auth
            if auth is not None:
                identity = auth.cached(request)
                if identity is None:
                    identity = await auth.load(request)
                request.identity = identity
            if endpoint.reads_body:
                reads = self.reads
                reads.start(task)
                try:
                    request.body = await read_body(request, length, self.max_body)
                finally:
                    reads.done(task)
            return await handler(request)
        except GatewayError as exc:
            return self.error(exc, endpoint, request.request_id)
        except asyncio.CancelledError as exc:
            reason = exc.args[0] if exc.args else None
            if reason == CANCEL_DISCONNECT:
                task.uncancel()  # the client is gone: nobody to answer
                return None
            if reason == CANCEL_READ_TIMEOUT:
                task.uncancel()
                return self.error(
                    RequestTimeout(
                        f"The request body did not arrive within {self.reads.timeout:g}s."
                    ),
                    endpoint,
                    request.request_id,
                )
            if reason != CANCEL_SHUTDOWN:
                raise
            task.uncancel()  # the shutdown deadline passed: answer, then stop
            return Response(503, SHUTDOWN_BODY)
        except Exception:
            logger.exception(
                "internal error handling %s %s (request %s)",
                printable(request.method, 20),
                printable(path),
                request.request_id,
            )
            return Response(500, _INTERNAL.body())

    @staticmethod
    def error(exc: GatewayError, endpoint: Endpoint | None, request_id: str = "") -> Response:
        """``exc`` as a response, in ``endpoint``'s error shape (OpenAI's if
        None), with the request id in the endpoint's ``id_header`` if it has one."""
        extra = exc.headers()
        if endpoint is None:
            return Response(exc.status, exc.body(), (JSON_CT, *extra) if extra else JSON_HEADERS)
        render = endpoint.render
        id_header = endpoint.id_header
        if id_header is not None and request_id:
            extra = (*extra, (id_header, request_id.encode("latin-1")))
        return Response(
            exc.status,
            exc.body() if render is None else render(exc),
            (JSON_CT, *extra) if extra else JSON_HEADERS,
        )
