"""In-process cost of the response cache per chat request: the ASGI app driven
directly (``test_micro.Driver``, the fake provider), with the young-generation
GC threshold a server worker uses, interleaved over rounds.

Two deterministic bodies (``temperature: 0``) are sent alternately, so every
configuration does the same work apart from the cache:

- ``off``: no ``cache:`` section (nothing on the path but ``entry.cache is None``);
- ``coalesce``: no cache, the route has ``coalesce: true`` (the coalescer a miss reuses);
- ``bypass``: the section present, bodies with ``temperature: 1`` (the
  ``cache-control`` read and the determinism scan, then the upstream);
- ``miss``: the section present, ``max_entries: 1``: each body evicts the
  other, so every request is a miss (key + lookup + coalescer + store + evict);
- ``miss-nostore``: the same with ``cache-control: no-store`` (no store, no evict);
- ``hit``: the section present: every request after the first two is a hit;
- ``stream-off`` / ``stream-hit``: the same two bodies with ``stream: true``.

Then the same at the service level (``ProxyService.chat`` called directly,
no server: far less noise): a plain route, a ``coalesce`` route, a caching
route where every request misses (``max_entries: 1``) and one where every
request hits; then ``cache_key`` alone and the cost of the Protocol's
``await`` on the lookup, against the in-process cache's synchronous ``lookup``.

    python bench/cache_micro.py [--rounds 5] [--requests 3000] [--concurrency 1]

``--concurrency 32``: 32 pairs of distinct bodies in flight at once, as a
loaded worker runs them (the event loop's per-iteration cost is then shared
by every ready request, as at c64, instead of paid by each one alone).

Prints microseconds per request per configuration (best and median round).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_micro import KEY, Driver

from gandalf.app.cache import CachedAnswer, InProcessCache, cache_key
from gandalf.app.proxy import ProxyService
from gandalf.app.requests import decode_chat
from gandalf.app.router import RouteTable
from gandalf.config import CacheConfig, DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import Identity, ProviderConfig, Route, Target, Usage, UsageRecord
from gandalf.provider.fake import FakeProvider
from gandalf.server.asgi import GandalfApp
from gandalf.wiring import create_app

CONFIGS = ("off", "coalesce", "bypass", "miss", "miss-nostore", "hit", "stream-off", "stream-hit")


def body(text: str, *, temperature: float = 0, stream: bool = False) -> bytes:
    payload: dict[str, Any] = {
        "model": "bench-model",
        "messages": [{"role": "user", "content": text}],
        "temperature": temperature,
    }
    if stream:
        payload["stream"] = True
    return orjson.dumps(payload)


def config(name: str) -> GandalfConfig:
    cache = None
    if name in ("bypass", "hit", "stream-hit", "miss-nostore"):
        cache = CacheConfig()
    elif name == "miss":
        cache = CacheConfig(max_entries=1)
    return GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="fake", type="fake"),),
        routes=(
            Route(
                model_alias="bench-model",
                targets=(Target(provider="fake", model="fake-1"),),
                coalesce=name == "coalesce",
            ),
        ),
        keys=(KeyEntry(name="bench", key=KEY, role="service_account"),),
        cache=cache,
    )


def drivers(name: str, app: GandalfApp, index: int = 0) -> tuple[Driver, Driver]:
    temperature = 1.0 if name == "bypass" else 0.0
    stream = name.startswith("stream")
    path = "/v1/chat/completions"
    one = body(f"Hello, how are you today? {index}", temperature=temperature, stream=stream)
    two = body(f"Hello, how are you tonight? {index}", temperature=temperature, stream=stream)
    pair = Driver(app, "POST", path, one), Driver(app, "POST", path, two)
    if name == "miss-nostore":
        for driver in pair:
            driver.template["headers"].append((b"cache-control", b"no-store"))
    return pair


async def alternate(pair: tuple[Driver, Driver], n: int) -> None:
    one, two = pair
    for _ in range(n // 2):
        await one.run(1)
        await two.run(1)


async def together(pairs: list[tuple[Driver, Driver]], n: int) -> None:
    """``n`` requests over every pair at once (each pair its own bodies)."""
    await asyncio.gather(*(alternate(pair, n // len(pairs)) for pair in pairs))


async def await_cost(n: int) -> tuple[float, float]:
    """(sync lookup, awaited get) in ns per call, on a hit."""
    cache = InProcessCache()
    key = cache_key("m", body("x"))
    assert key is not None
    cache.store(key, CachedAnswer(b"{}", Usage(), "p", "m"), 300.0)
    lookup, get = cache.lookup, cache.get
    started = time.perf_counter()
    for _ in range(n):
        lookup(key)
    sync = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(n):
        await get(key)
    awaited = time.perf_counter() - started
    return sync / n * 1e9, awaited / n * 1e9


class _Sink:
    def record_usage(self, record: UsageRecord) -> None:
        pass


_IDENTITY = Identity(
    key_id="k", key_hash="h", name="bench", org_id="default", team_id=None,
    role="service_account", permissions=0xFFFF, allowed_models=None, expires_at=None,
)  # fmt: skip
SERVICE = (("plain", 10), ("coalesce", 10), ("cache", 1), ("cache", 10))


async def service_level(n: int, rounds: int) -> dict[str, list[float]]:
    """us per ``ProxyService.chat`` for each of :data:`SERVICE` (alias,
    max_entries), two bodies alternating."""
    providers = {"fake": FakeProvider(ProviderConfig(name="fake", type="fake"))}
    target = (Target(provider="fake", model="fake-1"),)
    routes = [
        Route(model_alias="plain", targets=target),
        Route(model_alias="coalesce", targets=target, coalesce=True),
        Route(model_alias="cache", targets=target, cache=True),
    ]
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for alias, entries in SERVICE:
            cache = InProcessCache(entries)
            table = RouteTable.build(routes, providers, {}, cache=cache, cache_all=False)
            service = ProxyService(table, _Sink())
            bodies = [body(f"hi {i}").replace(b"bench-model", alias.encode()) for i in range(2)]
            requests = [decode_chat(b) for b in bodies]
            for i in range(200):  # warm
                await service.chat(_IDENTITY, requests[i & 1], bodies[i & 1], "r", 0.0)
            started = time.perf_counter()
            for i in range(n):
                await service.chat(_IDENTITY, requests[i & 1], bodies[i & 1], "r", 0.0)
            name = f"{alias}" + ("" if alias != "cache" else " hit" if entries > 1 else " miss")
            times.setdefault(name, []).append((time.perf_counter() - started) / n * 1e6)
    return times


def key_cost(n: int) -> float:
    """cache_key of the bench body, in ns."""
    payload = body("Hello, how are you today?")
    started = time.perf_counter()
    for _ in range(n):
        cache_key("bench-model", payload)
    return (time.perf_counter() - started) / n * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="request pairs in flight at once (1: one request at a time)",
    )
    args = parser.parse_args()
    gc.set_threshold(20_000, 10, 10)  # as Lifecycle.worker_ready sets it
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    apps: dict[str, GandalfApp] = {}
    pairs: dict[str, list[tuple[Driver, Driver]]] = {}
    for name in CONFIGS:
        app = create_app(config(name), access_log=False)
        loop.run_until_complete(app.startup())
        apps[name] = app
        pairs[name] = [drivers(name, app, i) for i in range(args.concurrency)]
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    try:
        for _ in range(args.rounds):
            for name in CONFIGS:
                warm = max(200, 2 * args.concurrency)
                loop.run_until_complete(together(pairs[name], warm))
                started = time.perf_counter()
                loop.run_until_complete(together(pairs[name], args.requests))
                times[name].append((time.perf_counter() - started) / args.requests * 1e6)
                for pair in pairs[name]:
                    for driver in pair:
                        if set(driver.statuses) != {200}:
                            raise SystemExit(f"{name}: statuses {driver.statuses}")
        sync, awaited = loop.run_until_complete(await_cost(200_000))
        service = loop.run_until_complete(service_level(20_000, args.rounds))
    finally:
        for app in apps.values():
            loop.run_until_complete(app.shutdown())
        loop.close()
    for name in CONFIGS:
        base = min(times["stream-off" if name.startswith("stream") else "off"])
        best = min(times[name])
        print(
            f"{name:12} best {best:6.1f} us  median {statistics.median(times[name]):6.1f} us"
            f"  ({best - base:+.1f} us against off)"
        )
    print("service level (ProxyService.chat, fake provider):")
    plain = min(service["plain"])
    for name, runs in service.items():
        best = min(runs)
        print(
            f"  {name:10} best {best:5.1f} us  median {statistics.median(runs):5.1f} us"
            f"  ({best - plain:+.1f} us against plain)"
        )
    print(f"cache_key (bench body): {key_cost(200_000):.0f} ns")
    print(f"lookup on a hit: sync {sync:.0f} ns, awaited {awaited:.0f} ns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
