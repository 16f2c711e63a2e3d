"""Wire-level building blocks: prebuilt headers, request/response values, ids.

Handlers never speak ASGI or RSGI: they get a :class:`Request` and return a
:class:`Response`. ``server/asgi.py`` and ``server/rsgi.py`` translate both
ways; ``server/core.py`` does everything in between.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from gandalf.app.cache import CACHE_HEADER
from gandalf.domain import CANCEL_DISCONNECT, Identity, replace_ratelimits
from gandalf.errors import GatewayError
from gandalf.server.types import Message, Receive

Headers = tuple[tuple[bytes, bytes], ...]

JSON_CT = (b"content-type", b"application/json")
JSON_HEADERS: Headers = (JSON_CT,)
SSE_HEADERS: Headers = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)

KEEPALIVE = b": keep-alive\n\n"
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")

HEALTH_OK = b'{"status":"ok"}'
READY_OK = b'{"status":"ready"}'

_SANE_ID = re.compile(rb"[A-Za-z0-9._:+=/-]{1,128}")


class Request:
    """What a handler sees: method, path, the header pairs, the body bytes and
    (on endpoints that authenticate) the caller's identity.

    Headers are read through :meth:`header` only, whichever interface
    delivered the request: an adapter whose headers are not lower-case bytes
    pairs subclasses this and overrides :meth:`header`. ``authorization`` and
    ``api_key`` are picked out by the adapter in its one pass over the headers.
    ``body`` and ``identity`` are filled in by the server core: the identity
    first, the body only once the caller is known.
    """

    __slots__ = (
        "api_key",
        "authorization",
        "body",
        "headers",
        "identity",
        "method",
        "path",
        "query",
        "receive",
        "request_id",
        "started",
        "streams",
        "task",
    )

    def __init__(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],  # lower-case names, as ASGI gives them
        body: bytes,
        request_id: str,
        authorization: bytes | None = None,
        api_key: bytes | None = None,
        query: bytes = b"",
        started: float = 0.0,
        receive: Receive | None = None,
        streams: StreamWatcher | None = None,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.request_id = request_id
        self.authorization = authorization
        self.api_key = api_key
        self.query = query
        self.started = started  # time.perf_counter() at arrival
        self.receive = receive  # for handlers that must learn of a disconnect
        self.streams = streams  # the worker's StreamWatcher
        # The task serving this request, as the adapter already looked it up:
        # asyncio.current_task() is plain Python on 3.11, and track/untrack
        # would otherwise call it twice more per request.
        self.task = task
        self.identity: Identity | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case bytes), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def watch(self) -> ClientWatch | None:
        """A stream's watch for the client leaving (it cancels this task with
        CANCEL_DISCONNECT, which cancels the upstream call, and keeps the
        stream alive); the caller must ``stop()`` it, or hand it to the relay
        in ``Response.watch``. None when the request has no receive side."""
        receive = self.receive
        streams = self.streams
        if receive is None or streams is None:
            return None
        task = self.task or asyncio.current_task()
        assert task is not None
        return streams.watch(receive, task)

    def track(self) -> None:
        """Watch a non-streamed call for the client leaving (a dict entry
        until it outlives ``listen_after``); end with :meth:`untrack`."""
        receive = self.receive
        streams = self.streams
        if receive is not None and streams is not None:
            task = self.task or asyncio.current_task()
            assert task is not None
            streams.track(receive, task)

    def untrack(self) -> None:
        streams = self.streams
        if streams is not None:
            task = self.task or asyncio.current_task()
            assert task is not None
            streams.untrack(task)


class ByteStream(Protocol):
    """A streamed response body.

    Iterating yields the bytes to send. ``aclose(status)`` ends it early (or
    confirms its end) and says how it ended for accounting: 499 client gone,
    503 server shutting down. Closing twice is harmless.
    """

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self, status: int) -> None: ...


class StreamWatcher:
    """One per worker: looks after every open stream with a single timer.

    Each tick (every ``tick`` seconds, only while streams are open) it starts
    the disconnect watch of streams older than ``listen_after`` and sends
    ``: keep-alive`` on streams silent for their interval. A stream that ends
    within ``listen_after`` (most of a benchmark's, few of a model's) never
    pays for a receive task or a timer of its own; a client that leaves is
    still noticed within ``listen_after + tick`` seconds (well under 1 s).

    Non-streamed calls are tracked even more cheaply (:meth:`track`: a dict
    entry) and get a :class:`ClientWatch` only once they outlive
    ``listen_after``: a client that leaves a slow completion cancels it too.
    """

    __slots__ = (
        "_calls",
        "_handle",
        "_loop",
        "_promoted",
        "_watches",
        "listen_after",
        "tick",
    )

    def __init__(self, *, listen_after: float = 0.3, tick: float = 0.2) -> None:
        self.listen_after = listen_after
        self.tick = tick
        self._watches: set[ClientWatch] = set()
        self._calls: dict[asyncio.Task[Any], tuple[Receive, float]] = {}  # not watched yet
        self._promoted: dict[asyncio.Task[Any], ClientWatch] = {}  # tracked calls now watched
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, receive: Receive, task: asyncio.Task[Any]) -> ClientWatch:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        watch = ClientWatch(self, receive, task, loop)
        self._watches.add(watch)
        if self.listen_after <= 0:
            watch.check(watch.started, watch.started)
        if self._handle is None:
            self._handle = loop.call_later(self.tick, self._tick)
        return watch

    def discard(self, watch: ClientWatch) -> None:
        self._watches.discard(watch)

    def track(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        """Watch a non-streamed call for its client leaving, until :meth:`untrack`."""
        if self.listen_after <= 0:
            self._promoted[task] = self.watch(receive, task)
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._calls[task] = (receive, loop.time())
        if self._handle is None:
            self._handle = loop.call_later(self.tick, self._tick)

    def untrack(self, task: asyncio.Task[Any]) -> None:
        if self._calls.pop(task, None) is None:
            watch = self._promoted.pop(task, None)
            if watch is not None:
                watch.stop()

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        listen_from = now - self.listen_after
        calls = self._calls
        if calls:
            for task, (receive, started) in [
                (task, entry) for task, entry in calls.items() if entry[1] <= listen_from
            ]:
                del calls[task]
                watch = ClientWatch(self, receive, task, loop)
                watch.started = started
                self._watches.add(watch)
                self._promoted[task] = watch
        for watch in list(self._watches):
            watch.check(now, listen_from)
        more = self._watches or calls
        self._handle = loop.call_later(self.tick, self._tick) if more else None


class ClientWatch:
    """One stream's link to its client: learns the moment the client goes away
    (granian answers ``receive()`` with ``http.disconnect``; the watch then
    cancels the request task with CANCEL_DISCONNECT, which cancels the upstream
    call) and keeps a silent stream alive. Driven by its StreamWatcher.

    Created by a streaming handler before it calls the upstream, so a client
    that gives up even before the first byte is noticed too.
    """

    __slots__ = (
        "_event",
        "_interval",
        "_loop",
        "_owner",
        "_pending",
        "_receive",
        "_seen",
        "_send",
        "_task",
        "disconnected",
        "last_chunk",
        "last_sent",
        "sending",
        "started",
    )

    def __init__(
        self,
        owner: StreamWatcher,
        receive: Receive,
        task: asyncio.Task[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._owner = owner
        self._loop = loop
        self._receive = receive
        self._task = task
        self._send: Callable[[bytes], Awaitable[None]] | None = None
        self._interval = 0.0
        self._event = KEEPALIVE
        # The last chunk written: a keep-alive goes out only after a whole event
        # (relayed native streams are cut where the upstream's reads fell).
        self.last_chunk = b"\n\n"
        # ``last_chunk`` as the last tick saw it: when the relay stored another
        # since, chunks went out and the silence starts again at this tick (up
        # to one tick late, never early), which spares the relay a clock
        # reading per chunk.
        self._seen = self.last_chunk
        self._pending: asyncio.Future[Message] | None = None
        self.started = self.last_sent = loop.time()
        self.disconnected = False
        self.sending: asyncio.Task[None] | None = None

    def keep_alive(
        self,
        write: Callable[[bytes], Awaitable[None]],
        interval: float,
        event: bytes = KEEPALIVE,
    ) -> None:
        """The response started: ``write`` ``event`` when idle ``interval`` s
        (and the stream is between events: see ``last_chunk``)."""
        self._send = write
        self._interval = interval
        self._event = event
        self.last_sent = self._loop.time()

    def check(self, now: float, listen_from: float) -> None:
        if self._pending is None and self.started <= listen_from and self._receive is not None:
            self._pending = pending = asyncio.ensure_future(self._receive())
            pending.add_done_callback(self._received)
        interval = self._interval
        chunk = self.last_chunk
        if chunk is not self._seen:
            self._seen = chunk
            self.last_sent = now
        elif (
            interval > 0
            and self.sending is None
            and now - self.last_sent >= interval
            and chunk.endswith(_EVENT_ENDS)
        ):
            self.sending = self._loop.create_task(self._send_keepalive())

    def _received(self, pending: asyncio.Future[Message]) -> None:
        if self._pending is not pending or pending.cancelled() or pending.exception() is not None:
            return
        if pending.result()["type"] == "http.disconnect":
            self.disconnected = True
            self._task.cancel(CANCEL_DISCONNECT)
        else:  # a stray body message: listen again at the next tick
            self._pending = None

    async def _send_keepalive(self) -> None:
        assert self._send is not None
        try:
            await self._send(self._event)
            self.last_sent = self._loop.time()
        except OSError:
            pass  # the client is gone: the receive side will say so
        finally:
            self.sending = None

    def stop(self) -> None:
        self._owner.discard(self)
        pending = self._pending
        if pending is not None:
            pending.cancel()
        # granian's receive future may keep its done-callbacks (our bound method)
        # in native memory the cycle collector cannot see: drop every reference
        # to the request (its receive, send and task) so that no cycle survives.
        self._pending = None
        self._receive = self._send = self._task = None  # type: ignore[assignment]


class Response:
    """A handler's answer: status, header pairs and a body (bytes or a stream).

    ``content-length`` (for bytes bodies) and ``x-request-id`` are added by the
    adapter (ASGI or RSGI); ``headers`` carries the rest (content-type included).
    """

    __slots__ = ("body", "error_event", "headers", "keepalive", "status", "stream", "watch")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Headers = JSON_HEADERS,
        stream: ByteStream | None = None,
        watch: ClientWatch | None = None,
        error_event: Callable[[GatewayError], bytes] | None = None,
        keepalive: bool | bytes = True,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.stream = stream
        self.watch = watch
        # A stream's in-band error after the headers went out (default: an
        # OpenAI-shaped ``data:`` event); ``keepalive``: what a silent stream
        # sends every ``server.stream_keepalive`` s: True an SSE comment, bytes
        # that event (an API's own, e.g. Anthropic's ping), False nothing (formats
        # a keep-alive would corrupt: NDJSON, JSON arrays, Gemini's SSE).
        self.error_event = error_event
        self.keepalive = keepalive


def sane_request_id(value: bytes) -> str | None:
    """The caller's x-request-id if it is short and harmless, else None."""
    if _SANE_ID.fullmatch(value) is None:
        return None
    return value.decode("ascii")


_random = random.Random(os.urandom(32))  # seeded once; ids need uniqueness, not secrecy
_getrandbits = _random.getrandbits
# Forked workers must not share one sequence.
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))
_time_ns = time.time_ns
# The variant's hex digit (binary 10xx) from any hex digit's low two bits.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


class _Millis:
    """The current millisecond and its id prefix ("tttttttt-tttt-7"), kept
    because requests arriving in the same millisecond share it."""

    __slots__ = ("ms", "prefix")

    def __init__(self) -> None:
        self.ms = -1
        self.prefix = ""


_millis = _Millis()


def uuid7() -> str:
    """A UUIDv7 string: 48-bit unix milliseconds, version 7, variant 10, 74 random bits.

    The random bits come from a PRNG seeded from os.urandom at import: a
    getrandom() syscall per request measured ~5 us on this VM, more than the
    rest of the id. The time prefix is formatted once per millisecond, and
    76 random bits are formatted as 19 hex digits in one go: 3 for after
    the version, 1 whose low 2 bits pick the variant digit, 3 more, then 12
    (callgrind: 11.2k -> 7.2k instructions per id against one 128-bit int
    formatted and sliced five times).
    """
    ms = _time_ns() // 1_000_000
    millis = _millis
    if ms != millis.ms:
        millis.ms = ms
        millis.prefix = "%08x-%04x-7" % (ms >> 16, ms & 0xFFFF)  # noqa: UP031 - faster
    h = "%019x" % _getrandbits(76)  # noqa: UP031 - measurably faster than format() here
    return f"{millis.prefix}{h[:3]}-{_VARIANT[h[3]]}{h[4:7]}-{h[7:]}"


def relay_with_limits(
    upstream: Sequence[tuple[bytes, bytes]],
    limits: Sequence[tuple[bytes, bytes]],
    limits_at: int = -1,
) -> Headers:
    """The upstream's relayed headers, then the gateway's ``x-ratelimit-*``
    (the governor's, for a caller it limits). The upstream's own
    ``x-ratelimit-*`` describe the gateway's account with the provider, not
    the caller's: they are dropped when the gateway sends its own, so a
    client never reads two values for one header. ``limits_at`` (0 or more):
    the upstream's are the headers from there on (``ProviderReply.limits_at``),
    cut off with a slice; -1: found by name. ``limits`` may end with the
    response cache's ``x-gandalf-cache``; when it is all there is (the
    caller has no limits), the upstream's stay."""
    if not limits:
        return tuple(upstream)
    if limits[0][0] == CACHE_HEADER:  # the cache's label alone
        return (*upstream, *limits)
    if limits_at >= 0:
        return (*upstream[:limits_at], *limits)
    return replace_ratelimits(upstream, limits)
