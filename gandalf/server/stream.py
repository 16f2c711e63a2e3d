"""The SSE writer: relays a ByteStream to the client, chunk by chunk.

Per stream, one watcher task waits on ``receive()``: granian answers it with
``http.disconnect`` the moment the client goes away, and the watcher cancels
the relay (so the upstream read is abandoned and its connection closed at
once). The same watcher sends a ``: keep-alive`` comment (or the response's
own keep-alive event) whenever nothing was sent for ``keepalive`` seconds (as
its tick tells: up to one tick late) and the last chunk ended an event. After
the headers went out, an error can only be told in-band: one
``data: {"error": {...}}`` event, then the end of the body. A stream never
ends silently on an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from gandalf.domain import CANCEL_DISCONNECT, CANCEL_SHUTDOWN, LastChunk
from gandalf.errors import GatewayError
from gandalf.observability.facts import first_chunk
from gandalf.server.types import Message, Receive, Send
from gandalf.server.wire import Response, StreamWatcher

logger = logging.getLogger("gandalf.server")

DISCONNECT = CANCEL_DISCONNECT
SHUTDOWN = CANCEL_SHUTDOWN

_BODY = "http.response.body"
_END: Message = {"type": _BODY, "body": b"", "more_body": False}
_SHUTDOWN_EVENT = (
    b'data: {"error":{"message":"Gandalf is shutting down; the stream was ended before it '
    b'finished.","type":"service_unavailable","param":null,"code":"server_shutdown"}}\n\n'
)
_INTERNAL_EVENT = (
    b'data: {"error":{"message":"The gateway hit an internal error; it has been logged.",'
    b'"type":"internal_error","param":null,"code":"internal_error"}}\n\n'
)


class BodyWriter(Protocol):
    """Where a stream's bytes go: one per interface (ASGI messages, RSGI transport).

    ``write`` is looked up once per stream and called per chunk; ``gone`` lists
    the exceptions a write raises when the client has left.
    """

    gone: tuple[type[BaseException], ...]
    write: Callable[[bytes], Awaitable[None]]  # valid once start() returned

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> Awaitable[None]: ...

    def end(self, last: bytes = b"") -> Awaitable[None]: ...


class ASGIWriter:
    __slots__ = ("send", "write")

    gone: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, send: Send) -> None:
        self.send = send
        self.write: Callable[[bytes], Awaitable[None]] = self._write

    # Each returns send's own awaitable: no coroutine frame of ours per message.
    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> Awaitable[None]:
        return self.send({"type": "http.response.start", "status": status, "headers": headers})

    def _write(self, chunk: bytes) -> Awaitable[None]:
        return self.send({"type": _BODY, "body": chunk, "more_body": True})

    def end(self, last: bytes = b"") -> Awaitable[None]:
        return self.send({"type": _BODY, "body": last, "more_body": False} if last else _END)


async def relay(
    writer: BodyWriter,
    receive: Receive,
    response: Response,
    request_id: bytes,
    keepalive: float,
    streams: StreamWatcher,
    task: asyncio.Task[Any] | None = None,
) -> int:
    """Send ``response`` (which has a stream) and return the status it ended with:
    its own on success, the error's after a failure, 499 or 503 when cut short.
    ``task``: the request's task when the caller holds it (``current_task()``
    is plain Python on 3.11)."""
    stream = response.stream
    assert stream is not None
    if task is None:
        task = asyncio.current_task()
        assert task is not None
    watch = response.watch or streams.watch(receive, task)
    status = response.status
    closing = status
    try:
        await writer.start(status, [*response.headers, (b"x-request-id", request_id)])
        write = writer.write
        every = response.keepalive
        if every is True:
            watch.keep_alive(write, keepalive)
        elif every:
            watch.keep_alive(write, keepalive, every)
        else:
            watch.keep_alive(write, 0.0)
        first = True
        ended = False
        async for chunk in stream:
            if watch.sending is not None:  # a keep-alive is being written: let it finish
                await watch.sending
            if chunk.__class__ is LastChunk:  # the end of the body goes with it
                await writer.end(chunk)
                ended = True
            else:
                await write(chunk)
            watch.last_chunk = chunk  # the watcher's tick sees it and restarts the silence clock
            if first:  # time to first token (metrics)
                first = False
                first_chunk()
        if not ended:
            await writer.end()
    except asyncio.CancelledError as exc:
        reason = exc.args[0] if exc.args else None
        if reason not in (DISCONNECT, SHUTDOWN):
            closing = 499
            raise  # not ours: the server is tearing the task down
        task.uncancel()
        if reason == DISCONNECT:
            closing = 499
        else:
            closing = 503
            await _end_with(writer, _SHUTDOWN_EVENT)
    except GatewayError as exc:
        closing = exc.status
        in_band = response.error_event
        await _end_with(
            writer, in_band(exc) if in_band is not None else b"data: " + exc.body() + b"\n\n"
        )
    except Exception as exc:
        if isinstance(exc, writer.gone):
            closing = 499  # the client left; the watch may not have noticed yet
        else:
            logger.exception("internal error while streaming (request %s)", request_id.decode())
            closing = 500
            await _end_with(writer, _INTERNAL_EVENT)
    finally:
        watch.stop()
        await stream.aclose(closing)
    return closing


async def _end_with(writer: BodyWriter, event: bytes) -> None:
    with contextlib.suppress(Exception):  # the client may be gone too
        await writer.end(event)
