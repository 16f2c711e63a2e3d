"""In-process micro-benchmarks: the ASGI app called directly, no sockets.

Run with ``just bench-micro`` (not part of the test suite). Each benchmark
round drives ``BATCH`` = 1,000 requests through the app on one event loop, so
the "ms per round" pytest-benchmark prints reads directly as **microseconds
per request**. ``extra_info`` carries the same figure explicitly.

What is measured:

- ``null_app``: the harness alone (an ASGI app that answers a constant), so
  the cost of building scopes and the receive/send callables is known.
- ``healthz``: dispatch + request id + fixed response.
- ``chat_fake``: the whole non-streaming hot path with the built-in fake
  provider: header scan, key cache hit, msgspec decode, route lookup, the fake
  adapter's answer, usage record queued (and written by the writer task).
- ``stream_fake``: a whole streamed completion with the fake provider: the same,
  plus the disconnect watch, the SSE relay and 9 body messages per request.

Allocations per request are counted by memray (``trace_python_allocators``:
every pymalloc and malloc call, from every thread, so the usage writer's work
counts too): total allocations for 2,000 requests minus those for 500, over
1,500 (the difference cancels set-up costs and the writer's bounded tail).
Retained memory per request comes from tracemalloc (net traced bytes after
5,000 requests, after a warm-up): a leak detector, noisy by the usage queue's
backlog; bench/soak.py is the real leak check.
Results go to ``bench/results/micro.json``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import ProviderConfig, Route, Target
from gandalf.server.asgi import GandalfApp
from gandalf.server.types import ASGIApp, Message
from gandalf.wiring import create_app

BATCH = 1000
KEY = "gnd_" + "m" * 43
CHAT_BODY = orjson.dumps(
    {"model": "bench-model", "messages": [{"role": "user", "content": "Hello, how are you today?"}]}
)
STREAM_BODY = orjson.dumps(
    {
        "model": "bench-model",
        "stream": True,
        "messages": [{"role": "user", "content": "Hello, how are you today?"}],
    }
)
RESULTS = Path(__file__).resolve().parent / "results"


def bench_config() -> GandalfConfig:
    return GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="fake", type="fake"),),
        routes=(
            Route(model_alias="bench-model", targets=(Target(provider="fake", model="fake-1"),)),
        ),
        keys=(KeyEntry(name="bench", key=KEY, role="service_account"),),
    )


class Driver:
    """Sends requests like granian does: a fresh scope dict per request."""

    def __init__(self, app: ASGIApp, method: str, path: str, body: bytes) -> None:
        self.app = app
        self.template: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": ("127.0.0.1", 8080),
            "client": ("127.0.0.1", 50000),
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [
                (b"host", b"127.0.0.1:8080"),
                (b"user-agent", b"bench"),
                (b"content-type", b"application/json"),
                (b"authorization", b"Bearer " + KEY.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
        self.request: Message = {"type": "http.request", "body": body, "more_body": False}
        self.statuses: dict[int, int] = {}
        self.chunks = 0  # body messages sent, over every run

    async def run(self, n: int) -> None:
        app, template, request = self.app, self.template, self.request
        status = 0
        chunks = 0
        loop = asyncio.get_running_loop()
        delivered = False

        async def receive() -> Message:
            # Like granian: the body once, then nothing until the client leaves
            # (which it never does here).
            nonlocal delivered
            if delivered:
                return await loop.create_future()  # type: ignore[no-any-return]
            delivered = True
            return request

        async def send(message: Message) -> None:
            nonlocal status, chunks
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                chunks += 1

        for _ in range(n):
            delivered = False
            await app(dict(template), receive, send)
        self.statuses[status] = self.statuses.get(status, 0) + n
        self.chunks += chunks


async def null_app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    try:
        import uvloop

        new_loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        new_loop = asyncio.new_event_loop()
    yield new_loop
    new_loop.close()


@pytest.fixture(scope="module")
def app(loop: asyncio.AbstractEventLoop) -> Iterator[GandalfApp]:
    gandalf = create_app(bench_config(), access_log=False)
    loop.run_until_complete(gandalf.startup())
    yield gandalf
    loop.run_until_complete(gandalf.shutdown())


def _record(name: str, **values: Any) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "micro.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(name, {}).update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _bench(benchmark: Any, loop: asyncio.AbstractEventLoop, driver: Driver, name: str) -> None:
    loop.run_until_complete(driver.run(BATCH))  # warm caches, connections, the key cache
    benchmark.pedantic(
        lambda: loop.run_until_complete(driver.run(BATCH)), rounds=15, warmup_rounds=2
    )
    per_request_us = benchmark.stats.stats.median / BATCH * 1e6
    benchmark.extra_info["us_per_request"] = round(per_request_us, 2)
    _record(name, us_per_request=round(per_request_us, 2))
    assert set(driver.statuses) == {200}, driver.statuses


def test_null_app(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    _bench(benchmark, loop, Driver(null_app, "GET", "/", b""), "null_app")


def test_healthz(benchmark: Any, loop: asyncio.AbstractEventLoop, app: GandalfApp) -> None:
    _bench(benchmark, loop, Driver(app, "GET", "/healthz", b""), "healthz")


def test_chat_fake(benchmark: Any, loop: asyncio.AbstractEventLoop, app: GandalfApp) -> None:
    _bench(benchmark, loop, Driver(app, "POST", "/v1/chat/completions", CHAT_BODY), "chat_fake")


def test_stream_fake(benchmark: Any, loop: asyncio.AbstractEventLoop, app: GandalfApp) -> None:
    """A whole streamed completion (9 SSE events from the fake provider) per request."""
    _bench(benchmark, loop, Driver(app, "POST", "/v1/chat/completions", STREAM_BODY), "stream_fake")


# ---------------------------------------------------------------------------- allocations


def _memray_allocations(loop: asyncio.AbstractEventLoop, driver: Driver, n: int) -> int:
    import memray

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trace.bin")
        gc.collect()
        with memray.Tracker(out, trace_python_allocators=True):
            loop.run_until_complete(driver.run(n))
        return int(memray.FileReader(out).metadata.total_allocations)


def _retained_bytes(loop: asyncio.AbstractEventLoop, run: Callable[[int], None], n: int) -> float:
    run(n)  # warm-up
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    run(n)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n


@pytest.mark.parametrize(
    ("name", "method", "path", "body"),
    [
        ("null_app", "GET", "/", b""),
        ("healthz", "GET", "/healthz", b""),
        ("chat_fake", "POST", "/v1/chat/completions", CHAT_BODY),
        ("stream_fake", "POST", "/v1/chat/completions", STREAM_BODY),
    ],
)
def test_allocations_per_request(
    loop: asyncio.AbstractEventLoop,
    app: GandalfApp,
    name: str,
    method: str,
    path: str,
    body: bytes,
) -> None:
    pytest.importorskip("memray")
    driver = Driver(null_app if name == "null_app" else app, method, path, body)
    loop.run_until_complete(driver.run(500))
    small = _memray_allocations(loop, driver, 500)
    large = _memray_allocations(loop, driver, 2000)
    per_request = (large - small) / 1500
    retained = _retained_bytes(loop, lambda n: loop.run_until_complete(driver.run(n)), 5000)
    _record(
        name,
        allocations_per_request=round(per_request, 1),
        retained_bytes_per_request=round(retained, 2),
    )
    print(
        f"\n{name}: {per_request:.1f} allocations/request (memray), "
        f"{retained:.2f} retained bytes/request (tracemalloc)"
    )
    assert set(driver.statuses) == {200}
