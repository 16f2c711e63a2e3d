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
~15 % of a worker's throughput. Here a line is one bytes template (kept per method,
path, status and facts' who-served-whom, so only what changes is formatted)
added to a list; the lines are written with one ``os.write`` at most
:data:`FLUSH_INTERVAL` after the first of them (a loop timer), or at once when
they pass :data:`FLUSH_BYTES` (nginx's ``buffer=`` / ``flush=``). Writing at
every turn of the loop instead meant a ``write`` to the log file per one or two
requests under load, whose kernel side cost more than building the lines.
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

# Past this many buffered bytes the lines are written at once, not at the timer.
FLUSH_BYTES = 64 * 1024
# Buffered lines are written at most this long (seconds) after the first of them.
FLUSH_INTERVAL = 0.05

# A line is one template per (method, path, status[, who served whom]): those fields
# repeat request after request, so their JSON (and the level the status picks) is
# encoded once into the template, and a line formats only what changes.
_TS = b'{"ts":%.3f,"level":"'
_IDS = b'","request_id":%b,"trace_id":%b,"method":'
_MS = b',"ms":%.2f,'
_FACTS = (
    b'"attempts":%d,"tokens":{"prompt":%d,"completion":%d,"total":%d},"cost_usd":%b,"cache":%b}\n'
)
_NO_FACTS = (
    b'"key_id":null,"org":null,"team":null,"route":null,"provider":null,"model":null,'
    b'"attempts":0,"tokens":null,"cost_usd":null,"cache":%b}\n'
)
_WHO = (b"key_id", b"org", b"team", b"route", b"provider", b"model")
NULL = b"null"  # JSON null; also what trace_id_of gives for no traceparent
_dumps = orjson.dumps
_time = time.time
_perf_counter = time.perf_counter


_os_write = os.write  # tests replace it

# Templates kept (a path comes from the client: past this many, they are built again).
_TEMPLATES_MAX = 4096


def valid_traceparent(traceparent: bytes | str) -> str | None:
    """``traceparent`` as a header value to forward, or None when it is not a
    valid W3C traceparent (see :func:`trace_id_of`)."""
    if trace_id_of(traceparent) is NULL:
        return None
    if isinstance(traceparent, bytes):
        return traceparent.decode("latin-1")
    return traceparent


def trace_id_of(traceparent: bytes | str | None) -> bytes:
    """The JSON of the trace id in a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``,
    lower-case hex, trace id not all zeros), or ``null`` when there is none or it is
    malformed. A string is checked the same way (RSGI gives headers as ``str``)."""
    if traceparent is None:
        return NULL
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
        return NULL
    trace_id = traceparent[3:35]
    if trace_id == _ZERO_TRACE:
        return NULL
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

    __slots__ = ("_lines", "_pending", "_size", "_templates", "interval", "write")

    def __init__(
        self, write: Callable[[bytes], object] = write_stderr, interval: float = FLUSH_INTERVAL
    ) -> None:
        """``interval``: buffered lines are written at most this many seconds after
        the first of them (0: when the loop next comes round)."""
        self.write = write
        self.interval = interval
        # Lines wait in a list, joined once at the flush: no buffer to grow and copy.
        self._lines: list[bytes] = []
        self._size = 0
        self._pending: asyncio.Handle | None = None  # the scheduled flush, if any
        self._templates: dict[tuple[object, ...], bytes] = {}

    def record(
        self,
        method: str,
        path: str,
        status: int,
        started: float,
        request_id: str,
        facts: UsageRecord | None = None,
        trace_id: bytes = NULL,
        cache: str | None = None,
    ) -> None:
        """Buffer the line for one request (``started``: its ``time.perf_counter()``;
        ``facts``: its model call's, None when it made none; ``trace_id``: JSON, from
        :func:`trace_id_of`; ``cache``: the response cache's verdict)."""
        if facts is None:
            key: tuple[object, ...] = (method, path, status)
        else:
            key = (
                method,
                path,
                status,
                facts.key_id,
                facts.org_id,
                facts.team_id,
                facts.model_alias,
                facts.provider,
                facts.target_model,
            )
        template = self._templates.get(key)
        if template is None:
            template = self._template(key, method, path, status)
        if facts is None:
            line = template % (
                _time(),
                _dumps(request_id),
                trace_id,
                (_perf_counter() - started) * 1000.0,
                NULL if cache is None else _dumps(cache),
            )
        else:
            line = template % (
                _time(),
                _dumps(request_id),
                trace_id,
                (_perf_counter() - started) * 1000.0,
                facts.attempts,
                facts.prompt_tokens,
                facts.completion_tokens,
                facts.total_tokens,
                _dumps(facts.cost_usd),
                NULL if cache is None else _dumps(cache),
            )
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._pending is None:
            try:
                loop = asyncio.get_running_loop()
                interval = self.interval
                self._pending = (
                    loop.call_later(interval, self._flush_soon)
                    if interval > 0
                    else loop.call_soon(self._flush_soon)
                )
            except RuntimeError:  # no loop running: nobody would flush later
                self.flush()

    def _template(self, key: tuple[object, ...], method: str, path: str, status: int) -> bytes:
        """The line's template for ``key`` (see :meth:`record`; after the method, the
        path and the status, the facts' who-served-whom, if any), kept for the next."""
        fixed = b'%b,"path":%b,"status":%d' % (_dumps(method), _dumps(path), status)
        if len(key) == 3:
            tail = _NO_FACTS
        else:
            who = b"".join(
                b'"%b":%b,' % (name, _dumps(value))
                for name, value in zip(_WHO, key[3:], strict=True)
            )
            tail = who.replace(b"%", b"%%") + _FACTS
        level = b"info" if status < 500 else b"error"
        # A '%' in a path or a name is a literal in the template.
        template = _TS + level + _IDS + fixed.replace(b"%", b"%%") + _MS + tail
        templates = self._templates
        if len(templates) >= _TEMPLATES_MAX:
            templates.clear()  # start over: whatever repeats comes back at once
        templates[key] = template
        return template

    def _flush_soon(self) -> None:
        self._pending = None
        self.flush()

    def flush(self) -> None:
        """Write every buffered line now. Idempotent; safe with no loop running."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            pending.cancel()
        lines = self._lines
        if lines:
            data = b"".join(lines)
            lines.clear()
            self._size = 0
            self.write(data)

    @property
    def buffered(self) -> int:
        """Bytes waiting to be written."""
        return self._size
