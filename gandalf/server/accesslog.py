"""The access log: one JSON line per request on stderr, written in batches.

A line is one JSON object, nothing before the ``{``, with the fields (in order)
``ts`` (Unix seconds, 3 decimals), ``level`` (``"info"`` below status 500,
``"error"`` from 500), ``request_id``, ``trace_id`` (from the client's W3C
``traceparent``, else null), ``method``, ``path``, ``status``, ``ms`` (the
time the request took, 2 decimals), then the facts of the model call it made
(null / 0 when it made none: a 401, ``/health``): ``key_id``, ``org``,
``team``, ``route`` (the model alias asked for), ``provider``, ``model`` (the
target model), ``attempts`` (upstream attempts), ``tokens``
(``{"prompt","completion","total"}``), ``cost_usd`` (null: unpriced) and
``cache`` (the response cache's verdict, null when it was not consulted).
Every string goes through orjson, which escapes every control character, so a
client cannot forge or break lines. ``log.level`` above ``info`` keeps only
the ``error`` lines (the server core decides; this writer writes what it gets).

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

from gandalf.domain import UsageRecord

# Past this many buffered bytes a line is written at once, not at the loop's next turn.
FLUSH_BYTES = 64 * 1024

_HEAD = (
    b'{"ts":%.3f,"level":"%b","request_id":%b,"trace_id":%b,"method":%b,"path":%b,'
    b'"status":%d,"ms":%.2f,'
)
# Who served whom: the same few combinations over and over, so each is encoded once.
_WHO = b'"key_id":%b,"org":%b,"team":%b,"route":%b,"provider":%b,"model":%b,'
_FACTS = (
    b'%b"attempts":%d,"tokens":{"prompt":%d,"completion":%d,"total":%d},"cost_usd":%b,"cache":%b}\n'
)
_LINE = _HEAD + _FACTS
_NO_FACTS = (
    b'"key_id":null,"org":null,"team":null,"route":null,"provider":null,"model":null,'
    b'"attempts":0,"tokens":null,"cost_usd":null,"cache":%b}\n'
)
_BARE = _HEAD + _NO_FACTS
_NULL = b"null"
_dumps = orjson.dumps
# The methods clients send, already encoded; anything else goes through orjson.
_METHODS = {m: _dumps(m) for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}


_os_write = os.write  # tests replace it

# Keys, tenants, routes, providers and models repeat: their JSON is kept, up to a bound.
_ENCODED_MAX = 4096


def valid_traceparent(traceparent: bytes | str) -> str | None:
    """``traceparent`` as a header value to forward, or None when it is not a
    valid W3C traceparent (see :func:`trace_id_of`)."""
    if trace_id_of(traceparent) is _NULL:
        return None
    if isinstance(traceparent, bytes):
        return traceparent.decode("latin-1")
    return traceparent


def trace_id_of(traceparent: bytes | str | None) -> bytes:
    """The JSON of the trace id in a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``,
    lower-case hex, trace id not all zeros), or ``null`` when there is none or it is
    malformed. A string is checked the same way (RSGI gives headers as ``str``)."""
    if traceparent is None:
        return _NULL
    if isinstance(traceparent, str):
        traceparent = traceparent.encode("latin-1", "replace")
    # Plain byte tests (a regex costs ~0.4 µs here): three dashes, where they belong,
    # and only lower-case hex digits besides.
    if (
        len(traceparent) < 55
        or traceparent[2] != 45
        or traceparent[35] != 45
        or traceparent[52] != 45
        or traceparent.count(45, 0, 55) != 3
        or (len(traceparent) > 55 and traceparent[55] != 45)
        or traceparent[:55].translate(None, _HEX_DASH)
    ):
        return _NULL
    trace_id = traceparent[3:35]
    if trace_id == _ZERO_TRACE:
        return _NULL
    return b'"' + trace_id + b'"'


_HEX_DASH = b"0123456789abcdef-"
_ZERO_TRACE = b"0" * 32


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

    __slots__ = ("_buffer", "_encoded", "_pending", "_who", "write")

    def __init__(self, write: Callable[[bytes], object] = write_stderr) -> None:
        self.write = write
        self._buffer = bytearray()
        self._pending: asyncio.Handle | None = None  # the scheduled flush, if any
        self._encoded: dict[str | None, bytes] = {None: _NULL}
        self._who: dict[tuple[str | None, ...], bytes] = {}

    def _encode(self, value: str | None) -> bytes:
        encoded = self._encoded.get(value)
        if encoded is None:
            encoded = _dumps(value)
            if len(self._encoded) < _ENCODED_MAX:
                self._encoded[value] = encoded
        return encoded

    def record(
        self,
        method: str,
        path: str,
        status: int,
        started: float,
        request_id: str,
        facts: UsageRecord | None = None,
        trace_id: bytes = _NULL,
        cache: str | None = None,
    ) -> None:
        """Buffer the line for one request (``started``: its ``time.perf_counter()``;
        ``facts``: its model call's, None when it made none; ``trace_id``: JSON, from
        :func:`trace_id_of`; ``cache``: the response cache's verdict)."""
        buffer = self._buffer
        _encode = self._encode
        if facts is None:
            buffer += _BARE % (
                time.time(),
                b"info" if status < 500 else b"error",
                _dumps(request_id),
                trace_id,
                _METHODS.get(method) or _dumps(method),
                _dumps(path),
                status,
                (time.perf_counter() - started) * 1000.0,
                _NULL if cache is None else _encode(cache),
            )
        else:
            key = (
                facts.key_id,
                facts.org_id,
                facts.team_id,
                facts.model_alias,
                facts.provider,
                facts.target_model,
            )
            who = self._who.get(key)
            if who is None:
                who = self._encode_who(key)
            buffer += _LINE % (
                time.time(),
                b"info" if status < 500 else b"error",
                _dumps(request_id),
                trace_id,
                _METHODS.get(method) or _dumps(method),
                _dumps(path),
                status,
                (time.perf_counter() - started) * 1000.0,
                who,
                facts.attempts,
                facts.prompt_tokens,
                facts.completion_tokens,
                facts.total_tokens,
                _dumps(facts.cost_usd),
                _NULL if cache is None else _encode(cache),
            )
        if len(buffer) >= FLUSH_BYTES:
            self.flush()
        elif self._pending is None:
            try:
                self._pending = asyncio.get_running_loop().call_soon(self._flush_soon)
            except RuntimeError:  # no loop running: nobody would flush later
                self.flush()

    def _encode_who(self, key: tuple[str | None, ...]) -> bytes:
        who: bytes = _WHO % tuple(self._encode(value) for value in key)
        if len(self._who) < _ENCODED_MAX:
            self._who[key] = who
        return who

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
