"""In-process cost of observability per request: the ASGI app driven directly
(``test_micro.Driver``, the fake provider), with the young-generation GC threshold
a server worker uses, configurations interleaved over rounds.

Configurations: ``off`` (no metrics, no access log, no tracing), ``metrics``
(``server.metrics``: every request recorded; snapshots not written: one process),
``log`` (the access log with every contract field, written to a temporary file as
a redirected stderr would be), ``both``; ``traced`` (tracing, every trace sampled,
spans handed to an exporter that drops them: the SDK's cost without the network)
and ``traced0`` (tracing with ``sample_ratio: 0``: spans made but not recorded).
Each for a non-streamed chat completion and for a streamed
one (9 SSE events: the first-chunk note for time to first token is in the relay).

    python bench/observability_micro.py [--rounds 7] [--requests 3000]

Prints microseconds per request per configuration (best and median round) and
the difference of the best rounds from ``off``; then, since a few microseconds
drown in a shared machine's noise, the parts alone (timeit, best of 5): what the
server core adds when a request ends (``finished``: the facts taken, the access
line, the metrics), with and without a model call's facts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from test_micro import CHAT_BODY, KEY, STREAM_BODY, Driver

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig, TracingConfig
from gandalf.domain import ModelPrice, ProviderConfig, Route, Target, UsageRecord
from gandalf.observability import facts
from gandalf.observability.metrics import Metrics
from gandalf.server.asgi import GandalfApp
from gandalf.server.core import Runtime, ServerCore
from gandalf.wiring import create_app

CONFIGS = ("off", "metrics", "log", "both")
TRACED = ("traced", "traced0")
_PRICE = (ModelPrice(provider="fake", model="fake-1", input=1.0, output=2.0),)


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def config(name: str) -> GandalfConfig:
    tracing = None
    if name in TRACED:
        ratio = 1.0 if name == "traced" else 0.0
        tracing = TracingConfig(otlp_endpoint="http://127.0.0.1:9/v1/traces", sample_ratio=ratio)
    return GandalfConfig(
        tracing=tracing,
        server=ServerConfig(
            access_log=name in ("log", "both"), metrics=name in ("metrics", "both")
        ),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="fake", type="fake"),),
        routes=(
            Route(model_alias="bench-model", targets=(Target(provider="fake", model="fake-1"),)),
        ),
        keys=(KeyEntry(name="bench", key=KEY, role="service_account"),),
        pricing=_PRICE,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    os.environ.pop("GANDALF_METRICS_DIR", None)
    gc.set_threshold(20_000, 10, 10)  # as Lifecycle.worker_ready sets it
    with tempfile.TemporaryFile() as sink:  # a redirected stderr
        fd = sink.fileno()

        def write(data: bytes) -> None:
            os.write(fd, data)

        ab(args.rounds, args.requests, write)
        parts(write)
    return 0


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    return loop


def ab(rounds: int, requests: int, write: Callable[[bytes], None]) -> None:
    """The whole app, each configuration, chat and stream, interleaved."""
    loop = _loop()
    apps: dict[str, GandalfApp] = {}
    for name in (*CONFIGS, *TRACED):
        app = create_app(config(name), span_exporter=_Drop() if name in TRACED else None)
        app.core.access.write = write
        loop.run_until_complete(app.startup())
        apps[name] = app
    kinds = {"chat": CHAT_BODY, "stream": STREAM_BODY}
    names = (*CONFIGS, *TRACED)
    times: dict[tuple[str, str], list[float]] = {(k, n): [] for k in kinds for n in names}
    try:
        for _ in range(rounds):
            for kind, body in kinds.items():
                for name in names:
                    driver = Driver(apps[name], "POST", "/v1/chat/completions", body)
                    loop.run_until_complete(driver.run(200))  # warm: key cache, label series
                    started = time.perf_counter()
                    loop.run_until_complete(driver.run(requests))
                    elapsed = time.perf_counter() - started
                    times[kind, name].append(elapsed / requests * 1e6)
                    if set(driver.statuses) != {200}:
                        raise SystemExit(f"{kind} {name}: statuses {driver.statuses}")
    finally:
        for app in apps.values():
            loop.run_until_complete(app.shutdown())
        loop.close()
    for kind in kinds:
        base = min(times[kind, "off"])
        for name in names:
            runs = times[kind, name]
            best = min(runs)
            print(
                f"{kind:6} {name:7} best {best:6.1f} us  median {statistics.median(runs):6.1f} us"
                f"  ({best - base:+.2f} us over off)"
            )


def parts(write: Callable[[bytes], None]) -> None:
    """Microseconds per request of what its end costs (ServerCore.finished and
    the pipeline's observe hook), by configuration, in a running loop (the access
    log writes its buffer in batches, as in a server)."""
    record = UsageRecord(
        "01a2343a-6110-78b0-ad61-166da3ca5e9c", "key-1", "default", "bench-model", "fake-1",
        "fake", 12, 30, 42, 1.0, 200, 0.0, "chat", 1, None, 0, 0, 0, 0.000072,
    )  # fmt: skip
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    n = 100_000

    async def never() -> Runtime:
        raise AssertionError("not started")

    async def measure(core: ServerCore) -> tuple[float, float]:
        started = time.perf_counter()
        finished = core.finished
        observe = facts.observe
        observed = core.observed

        def model_call() -> None:
            observe(record)  # Pipeline.account's hook
            if observed:
                finished("POST", "/v1/chat/completions", 200, started, "rid", traceparent)

        def no_model_call() -> None:
            if observed:
                finished("GET", "/healthz", 200, started, "rid")

        call = min(timeit.repeat(model_call, number=n, repeat=5)) / n * 1e6
        bare = min(timeit.repeat(no_model_call, number=n, repeat=5)) / n * 1e6
        core.access.flush()
        return call, bare

    loop = _loop()
    try:
        for name in CONFIGS:
            metrics = Metrics(paths=("/healthz",)) if name in ("metrics", "both") else None
            core = ServerCore(never, access_log=name in ("log", "both"), metrics=metrics)
            core.access.write = write
            call, bare = loop.run_until_complete(measure(core))
            print(f"parts  {name:7} model call {call:5.2f} us   no model call {bare:5.2f} us")
    finally:
        loop.close()


if __name__ == "__main__":
    raise SystemExit(main())
