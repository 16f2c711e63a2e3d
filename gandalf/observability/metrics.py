"""Prometheus metrics: recorded per worker in plain Python, merged at scrape time.

Recording (the hot path) touches no lock, no file and no prometheus-client
object: a request's end is one dict lookup by a label tuple and a few list
additions (a histogram bucket found with ``bisect``), ~1 µs. Everything else
(cumulating buckets, merging workers, the text format) happens when
``/metrics`` is scraped.

Workers are processes (granian). ``gandalf serve`` creates a directory and
names it in ``GANDALF_METRICS_DIR``; each worker replaces its own snapshot
file there (``<pid>.json``, written to a temporary name then renamed, so a
reader never sees half a file) every :data:`SNAPSHOT_INTERVAL` seconds and at
shutdown. The worker that answers a scrape sums its own live numbers with
every other worker's last snapshot:

- counters and histograms from every file, a dead worker's included, so a
  total never goes backwards when a worker is replaced (its last second of
  counts may be missing: what it did after its last snapshot);
- gauges (``gandalf_inflight_requests``, ``gandalf_breaker_state``) only
  from live workers: a file whose pid no longer exists (``os.kill(pid, 0)``)
  or that is older than :data:`STALE_AFTER` seconds adds no gauge.

Without ``GANDALF_METRICS_DIR`` (one process: tests, ``create_app``) a scrape
shows this worker alone.

Labels are bounded: ``endpoint`` (the kind of call: chat, embeddings, a
native API, or the exact path of a request no model call was made for: one
of the server's own paths, else ``other``), ``route`` (the model alias),
``provider``, ``model`` (the target model) and ``status`` (``2xx``..``5xx``);
a key's id only when ``server.metrics_key_id`` is on, never a secret. A route
alias comes from the client, so past :data:`MAX_SERIES` label sets new ones
are counted under ``route="other"``.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from gandalf.domain import UsageRecord

__all__ = [
    "DURATION_BUCKETS",
    "ENV_METRICS_DIR",
    "MAX_SERIES",
    "TTFT_BUCKETS",
    "Metrics",
    "serve_metrics",
]

ENV_METRICS_DIR = "GANDALF_METRICS_DIR"
SNAPSHOT_INTERVAL = 1.0
STALE_AFTER = 10.0  # a live worker rewrites its file every second
MAX_SERIES = 5_000

# Seconds. A model call takes from a few ms (a cache, an embedding) to minutes (a long answer).
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
# Time to first token: tens of ms to tens of seconds (a reasoning model thinks first).
TTFT_BUCKETS: tuple[float, ...] = (
    0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0,
)  # fmt: skip

_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
_NB = len(DURATION_BUCKETS) + 1  # the last slot: +Inf
_NT = len(TTFT_BUCKETS) + 1
# A request series: [count, duration sum, buckets..., prompt, completion, cached, reasoning, cost]
_TOKENS = 2 + _NB
_COST = _TOKENS + 4
_SERIES_LEN = _COST + 1
# The token slots one by one (an index computed per request is bytecode per request).
_PROMPT, _COMPLETION, _CACHED, _REASONING = range(_TOKENS, _COST)
# A status's class label; anything outside 0..599 counts as a 5xx.
_CLASS_OF = {status: _CLASSES[status // 100] for status in range(600)}
_LABELS = ("endpoint", "route", "provider", "model", "status")
_KEY_LABELS = (*_LABELS, "key_id")
_UPSTREAM_LABELS = ("provider", "model", "outcome")
_TTFT_LABELS = ("route", "provider", "model")
_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}

Labels = tuple[str, ...]


def _new_series() -> list[float]:
    """A request series' zeros: floats, but ints where the token counts go (a
    snapshot writes them all as floats)."""
    series: list[float] = [0.0] * _SERIES_LEN
    series[_TOKENS:_COST] = [0] * (_COST - _TOKENS)
    return series


class Metrics:
    """One worker's metrics. Call the recording methods from the event loop's
    thread; :meth:`exposition` may be called from anywhere in the worker.

    ``paths``: the server's exact paths (a request without a model call is
    labelled by its path only when it is one of them). ``key_id``: add a
    ``key_id`` label (the operator opted in). ``gauges``: called at scrape
    time for ``(inflight, breakers, usage_dropped)`` of this worker, where
    ``breakers`` are ``(provider, state)`` pairs; set by whoever owns them
    (the server core and the composition root). ``directory``: where workers'
    snapshots meet (None: this worker alone).
    """

    __slots__ = (
        "_cache",
        "_ratelimited",
        "_series",
        "_timer",
        "_ttft",
        "_upstream",
        "directory",
        "gauges",
        "key_id",
        "paths",
        "pid",
    )

    def __init__(
        self,
        *,
        paths: Iterable[str] = (),
        key_id: bool = False,
        directory: str | None = None,
        gauges: Callable[[], tuple[int, Sequence[tuple[str, str]], int]] | None = None,
    ) -> None:
        self.paths = frozenset(paths)
        self.key_id = key_id
        self.directory = directory
        self.gauges = gauges
        self.pid = os.getpid()
        self._series: dict[Labels, list[float]] = {}
        self._upstream: dict[Labels, list[float]] = {}
        self._ttft: dict[Labels, list[float]] = {}
        self._cache: dict[Labels, int] = {}
        self._ratelimited: dict[Labels, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Write this worker's snapshot now and every :data:`SNAPSHOT_INTERVAL`
        seconds on the running loop (nothing without a directory)."""
        if self.directory is None or self._timer is not None:
            return
        self.pid = os.getpid()  # a worker forked after this object was built
        self._tick()

    def _tick(self) -> None:
        self.save()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(SNAPSHOT_INTERVAL, self._tick)

    def stop(self) -> None:
        """Stop the timer and write the last snapshot."""
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        self.save()

    # ------------------------------------------------------------------ recording

    def request(self, path: str, status: int, seconds: float, record: UsageRecord | None) -> None:
        """One request ended with ``status`` after ``seconds``; ``record``: its
        model call's facts (None: it made none, e.g. a 401 or ``/health``)."""
        cls = _CLASS_OF.get(status, "5xx")
        if record is None:
            key: Labels = (path if path in self.paths else "other", "", "", "", cls)
            if self.key_id:
                key = (*key, "")
        else:
            key = (
                record.endpoint,
                record.model_alias,
                record.provider or "",
                record.target_model or "",
                cls,
            )
            if self.key_id:
                key = (*key, record.key_id or "")
        series = self._series.get(key)
        if series is None:
            series = self._new(key)
        # Counts and durations are floats and add floats (a float plus an int takes
        # the interpreter's slow path); token counts are ints and add ints until
        # the snapshot (see _new).
        series[0] += 1.0
        series[1] += seconds
        series[2 + bisect_left(DURATION_BUCKETS, seconds)] += 1.0
        if record is not None and not record.cache_hit:  # a hit used no tokens upstream
            series[_PROMPT] += record.prompt_tokens
            series[_COMPLETION] += record.completion_tokens
            series[_CACHED] += record.cached_prompt_tokens
            series[_REASONING] += record.reasoning_tokens
            cost = record.cost_usd
            if cost:
                series[_COST] += cost
            if status == 429 and record.provider is None:
                # Refused by the gateway's own limits or budgets (an upstream's
                # 429 names its provider).
                self._count(self._ratelimited, (key[1],))

    def _new(self, key: Labels) -> list[float]:
        if len(self._series) >= MAX_SERIES:
            key = (key[0], "other", *key[2:])
            series = self._series.get(key)
            if series is not None:
                return series
        series = _new_series()
        self._series[key] = series
        return series

    def upstream(self, provider: str, model: str, seconds: float, ok: bool) -> None:
        """One upstream attempt took ``seconds`` (to its answer; a stream: to its headers)."""
        key = (provider, model, "success" if ok else "error")
        values = self._upstream.get(key)
        if values is None:
            values = self._upstream[key] = [0.0] * (2 + _NB)
        values[0] += 1
        values[1] += seconds
        values[2 + bisect_left(DURATION_BUCKETS, seconds)] += 1

    def first_token(self, route: str, provider: str, model: str, seconds: float) -> None:
        """A stream's first chunk reached the client ``seconds`` after the request arrived."""
        key = (route, provider, model)
        values = self._ttft.get(key)
        if values is None:
            if len(self._ttft) >= MAX_SERIES:
                key = ("other", provider, model)
                values = self._ttft.get(key)
            if values is None:
                values = self._ttft[key] = [0.0] * (2 + _NT)
        values[0] += 1
        values[1] += seconds
        values[2 + bisect_left(TTFT_BUCKETS, seconds)] += 1

    def cache_result(self, route: str, result: str) -> None:
        """A response-cache lookup on ``route`` gave ``result`` (hit, miss, ...)."""
        self._count(self._cache, (route, result))

    @staticmethod
    def _count(table: dict[Labels, int], key: Labels) -> None:
        if key not in table and len(table) >= MAX_SERIES:
            key = ("other", *key[1:])
        table[key] = table.get(key, 0) + 1

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> dict[str, object]:
        """This worker's numbers, as a JSON-ready dict (the snapshot file's content)."""
        inflight, breakers, dropped = self.gauges() if self.gauges is not None else (0, (), 0)
        return {
            "pid": self.pid,
            "ts": time.time(),
            "key_id": self.key_id,
            "series": [[list(k), [float(x) for x in v]] for k, v in self._series.items()],
            "upstream": [[list(k), v] for k, v in self._upstream.items()],
            "ttft": [[list(k), v] for k, v in self._ttft.items()],
            "cache": [[list(k), v] for k, v in self._cache.items()],
            "ratelimited": [[list(k), v] for k, v in self._ratelimited.items()],
            "inflight": inflight,
            "breakers": [[name, _BREAKER_STATES.get(state, 2)] for name, state in breakers],
            "dropped": dropped,
        }

    def save(self) -> None:
        """Replace this worker's snapshot file (no-op without a directory).
        Atomic: written to a temporary name, then renamed over the old one."""
        directory = self.directory
        if directory is None:
            return
        final = os.path.join(directory, f"{self.pid}.json")
        temporary = final + ".tmp"
        try:
            with open(temporary, "wb") as out:
                out.write(orjson.dumps(self.snapshot()))
            os.replace(temporary, final)
        except OSError:
            pass  # the directory is gone (the server is stopping): nothing to keep

    def _others(self) -> list[tuple[dict[str, object], bool]]:
        """Every other worker's last snapshot, with whether that worker is live."""
        directory = self.directory
        if directory is None:
            return []
        found: list[tuple[dict[str, object], bool]] = []
        try:
            names = os.listdir(directory)
        except OSError:
            return found
        now = time.time()
        for name in names:
            if not name.endswith(".json") or name == f"{self.pid}.json":
                continue
            try:
                with open(os.path.join(directory, name), "rb") as source:
                    snapshot = orjson.loads(source.read())
            except (OSError, orjson.JSONDecodeError):
                continue
            if not isinstance(snapshot, dict):
                continue
            found.append((snapshot, _alive(snapshot.get("pid"), snapshot.get("ts"), now)))
        return found

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        """The Prometheus text format (version 0.0.4) of every worker merged."""
        mine = self.snapshot()
        snapshots = [(mine, True), *self._others()]
        series: dict[Labels, list[float]] = {}
        upstream: dict[Labels, list[float]] = {}
        ttft: dict[Labels, list[float]] = {}
        cache: dict[Labels, float] = {}
        ratelimited: dict[Labels, float] = {}
        breakers: dict[str, int] = {}
        inflight = 0.0
        dropped = 0.0
        width = len(_KEY_LABELS) if self.key_id else len(_LABELS)
        for snapshot, live in snapshots:
            _merge(series, snapshot.get("series"), width)
            _merge(upstream, snapshot.get("upstream"), len(_UPSTREAM_LABELS))
            _merge(ttft, snapshot.get("ttft"), len(_TTFT_LABELS))
            _merge_counts(cache, snapshot.get("cache"), 2)
            _merge_counts(ratelimited, snapshot.get("ratelimited"), 1)
            dropped += _number(snapshot.get("dropped"))
            if live:
                inflight += _number(snapshot.get("inflight"))
                for pair in snapshot.get("breakers") or ():  # type: ignore[attr-defined]
                    if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str):
                        state = int(_number(pair[1]))
                        breakers[pair[0]] = max(breakers.get(pair[0], 0), state)
        names = _KEY_LABELS if self.key_id else _LABELS
        out: list[str] = []
        _header(out, "gandalf_requests_total", "counter", "Requests served, by outcome.")
        for key, values in sorted(series.items()):
            out.append(f"gandalf_requests_total{_labels(names, key)} {_fmt(values[0])}")
        _header(
            out,
            "gandalf_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to the end of its answer.",
        )
        for key, values in sorted(series.items()):
            _histogram(
                out, "gandalf_request_duration_seconds", names, key, values, DURATION_BUCKETS
            )
        _header(
            out,
            "gandalf_upstream_duration_seconds",
            "histogram",
            "One upstream attempt, to its answer (a stream: to its response headers).",
        )
        for key, values in sorted(upstream.items()):
            _histogram(
                out,
                "gandalf_upstream_duration_seconds",
                _UPSTREAM_LABELS,
                key,
                values,
                DURATION_BUCKETS,
            )
        _header(
            out,
            "gandalf_time_to_first_token_seconds",
            "histogram",
            "Time from a streamed request's arrival to its first chunk relayed.",
        )
        for key, values in sorted(ttft.items()):
            _histogram(
                out, "gandalf_time_to_first_token_seconds", _TTFT_LABELS, key, values, TTFT_BUCKETS
            )
        _header(out, "gandalf_tokens_total", "counter", "Tokens used, by type.")
        token_names = (*names[:4], "type") if not self.key_id else (*names[:4], "key_id", "type")
        for key, values in sorted(series.items()):
            base = key[:4] if not self.key_id else (*key[:4], key[5])
            for offset, kind in enumerate(("prompt", "completion", "cached", "reasoning")):
                count = values[_TOKENS + offset]
                if count:
                    labels = _labels(token_names, (*base, kind))
                    out.append(f"gandalf_tokens_total{labels} {_fmt(count)}")
        _header(out, "gandalf_cost_usd_total", "counter", "USD spent (priced models only).")
        for key, values in sorted(series.items()):
            if values[_COST]:
                base = key[:4] if not self.key_id else (*key[:4], key[5])
                labels = _labels(names[:4] if not self.key_id else token_names[:-1], base)
                out.append(f"gandalf_cost_usd_total{labels} {values[_COST]!r}")
        _header(
            out,
            "gandalf_ratelimit_rejections_total",
            "counter",
            "Requests refused by the gateway's rate limits or budgets.",
        )
        for key, count in sorted(ratelimited.items()):
            labels = _labels(("route",), key)
            out.append(f"gandalf_ratelimit_rejections_total{labels} {_fmt(count)}")
        _header(
            out, "gandalf_cache_requests_total", "counter", "Response-cache lookups, by result."
        )
        for key, count in sorted(cache.items()):
            labels = _labels(("route", "result"), key)
            out.append(f"gandalf_cache_requests_total{labels} {_fmt(count)}")
        _header(
            out,
            "gandalf_breaker_state",
            "gauge",
            "A provider's circuit breaker: 0 closed, 1 half open, 2 open (the workers' worst).",
        )
        for name, state in sorted(breakers.items()):
            out.append(f"gandalf_breaker_state{_labels(('provider',), (name,))} {state}")
        _header(out, "gandalf_inflight_requests", "gauge", "Requests in flight, all workers.")
        out.append(f"gandalf_inflight_requests {_fmt(inflight)}")
        _header(
            out,
            "gandalf_usage_dropped_total",
            "counter",
            "Usage records dropped because the writer's queue was full.",
        )
        out.append(f"gandalf_usage_dropped_total {_fmt(dropped)}")
        out.append("")
        return "\n".join(out).encode()


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def serve_metrics(host: str, port: int, directory: str, *, key_id: bool) -> ThreadingHTTPServer:
    """``server.metrics_addr``: ``GET /metrics`` on its own address, answered by
    ``gandalf serve``'s main process from the workers' snapshot files (so never
    by a worker, and never on the API's listener), in a daemon thread. Anything
    else is a 404. The caller ``shutdown()`` s it when the server stops."""
    metrics = Metrics(key_id=key_id, directory=directory)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.exposition()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes are not access-logged

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="gandalf-metrics", daemon=True).start()
    return server


def _alive(pid: object, ts: object, now: float) -> bool:
    if not isinstance(pid, int) or not isinstance(ts, (int, float)) or now - ts > STALE_AFTER:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else: a worker is ours, but be lenient
    return True


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _merge(into: dict[Labels, list[float]], rows: object, width: int) -> None:
    if not isinstance(rows, list):
        return
    for row in rows:
        if not (isinstance(row, list) and len(row) == 2):
            continue
        labels, values = row
        if not (isinstance(labels, list) and len(labels) == width and isinstance(values, list)):
            continue  # written under other settings (a reload changed the label set)
        key = tuple(str(label) for label in labels)
        have = into.get(key)
        if have is None:
            into[key] = [_number(v) for v in values]
        elif len(have) == len(values):
            for index, value in enumerate(values):
                have[index] += _number(value)


def _merge_counts(into: dict[Labels, float], rows: object, width: int) -> None:
    if not isinstance(rows, list):
        return
    for row in rows:
        if (
            isinstance(row, list)
            and len(row) == 2
            and isinstance(row[0], list)
            and len(row[0]) == width
        ):
            key = tuple(str(label) for label in row[0])
            into[key] = into.get(key, 0.0) + _number(row[1])


def _header(out: list[str], name: str, kind: str, text: str) -> None:
    out.append(f"# HELP {name} {text}")
    out.append(f"# TYPE {name} {kind}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)) + "}"


def _fmt(value: float) -> str:
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def _histogram(
    out: list[str],
    name: str,
    names: Sequence[str],
    key: Labels,
    values: list[float],
    buckets: Sequence[float],
) -> None:
    base = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, key, strict=True))
    total = 0.0
    for index, bound in enumerate(buckets):
        total += values[2 + index]
        out.append(f'{name}_bucket{{{base},le="{bound!r}"}} {_fmt(total)}')
    out.append(f'{name}_bucket{{{base},le="+Inf"}} {_fmt(values[0])}')
    out.append(f"{name}_sum{{{base}}} {values[1]!r}")
    out.append(f"{name}_count{{{base}}} {_fmt(values[0])}")
