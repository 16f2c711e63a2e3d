"""The access log: one JSON line per request on stderr, written in batches.

A line is ``{"ts":…,"method":…,"path":…,"status":…,"ms":…,"request_id":…}``:
``ts`` is Unix time in seconds (3 decimals), ``ms`` the time the request took
(2 decimals). The three strings go through orjson, which escapes every control
character, so a client cannot forge or break lines.

Why not the ``logging`` module: a record per request (LogRecord, formatter,
handler lock, a write and a flush per line) cost ~0.13 ms of CPU per request,
~15 % of a worker's throughput. Here a line is one bytes template (~1 µs) added
to a buffer; the buffer is written with one ``os.write`` when the event loop
comes round (``call_soon``), or at once when it passes :data:`FLUSH_BYTES`.
:meth:`AccessLog.flush` writes what is left: the lifecycle calls it at
shutdown (after the drain) and a server worker at exit, so no line is lost.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import orjson

# Past this many buffered bytes a line is written at once, not at the loop's next turn.
FLUSH_BYTES = 64 * 1024

_LINE = b'{"ts":%.3f,"method":%b,"path":%b,"status":%d,"ms":%.2f,"request_id":%b}\n'
_dumps = orjson.dumps
# The methods clients send, already encoded; anything else goes through orjson.
_METHODS = {m: _dumps(m) for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}


_os_write = os.write  # tests replace it


def write_stderr(data: bytes) -> None:
    """Write all of ``data`` to file descriptor 2 (a pipe may take it in parts).
    A closed or broken stderr drops the batch: there is nowhere to report it."""
    view = memoryview(data)
    try:
        while view:
            view = view[_os_write(2, view) :]
    except OSError:
        pass


class AccessLog:
    """One per worker (the :class:`~gandalf.server.core.ServerCore` owns it).

    ``write`` receives whole lines, one or more per call, each ending with a
    newline; it is :func:`write_stderr` unless a test passes another sink.
    Not thread-safe: call :meth:`record` from the event loop's thread. A worker
    keeps one loop for its life; whoever ends a loop (the lifecycle's shutdown)
    calls :meth:`flush`, which also forgets a flush scheduled on that loop.
    """

    __slots__ = ("_buffer", "_pending", "write")

    def __init__(self, write: Callable[[bytes], object] = write_stderr) -> None:
        self.write = write
        self._buffer = bytearray()
        self._pending: asyncio.Handle | None = None  # the scheduled flush, if any

    def record(self, method: str, path: str, status: int, started: float, request_id: str) -> None:
        """Buffer the line for one request (``started``: its ``time.perf_counter()``)."""
        buffer = self._buffer
        buffer += _LINE % (
            time.time(),
            _METHODS.get(method) or _dumps(method),
            _dumps(path),
            status,
            (time.perf_counter() - started) * 1000.0,
            _dumps(request_id),
        )
        if len(buffer) >= FLUSH_BYTES:
            self.flush()
        elif self._pending is None:
            try:
                self._pending = asyncio.get_running_loop().call_soon(self._flush_soon)
            except RuntimeError:  # no loop running: nobody would flush later
                self.flush()

    def _flush_soon(self) -> None:
        self._pending = None
        self.flush()

    def flush(self) -> None:
        """Write every buffered line now. Idempotent; safe with no loop running."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            pending.cancel()
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self.write(data)

    @property
    def buffered(self) -> int:
        """Bytes waiting to be written."""
        return len(self._buffer)
