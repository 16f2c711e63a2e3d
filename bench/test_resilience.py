"""What the routing-and-resilience layer costs when every target is healthy.

Run with ``python -m pytest bench/test_resilience.py -q -s`` (not part of the
test suite). Two measurements, each as ratios taken within one run, with the
variants interleaved round by round so drift on a shared machine hits all alike:

- **service**: ``ProxyService.chat`` alone, in-process, on a provider that
  answers at once with a prebuilt reply, so the routing layer's own cost is as
  visible as it can get. ``plain`` is the pre-resilience service (resolve the
  alias, call the first target, queue the usage record), kept here as the
  reference; ``priority-1`` is a one-target route through today's service;
  ``priority-3`` a three-target failover route (all healthy); ``weighted-3``
  and ``least-latency-3`` the strategies that order their targets per request;
  ``coalesce-3`` a coalescing route with a deterministic request (each call
  runs in a task of its own).
- **app**: the whole non-streaming request through the ASGI app (header scan,
  key cache, decode, route, the built-in fake provider, usage record queued
  and written, response headers), with the plain service vs today's.

Figures are microseconds per request (median over rounds) and ratios to
``plain``; they go to ``bench/results/micro.json`` under ``resilience`` and into
bench/README.md ("Resilience layer").
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import orjson
import pytest
from test_micro import CHAT_BODY, KEY, STREAM_BODY, Driver

from gandalf import bootstrap
from gandalf.app.failover import Outcome
from gandalf.app.health import HealthRegistry
from gandalf.app.proxy import ProxyService
from gandalf.app.router import RouteTable
from gandalf.auth.apikey import KeyCache
from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import (
    ChatCall,
    ChatRequest,
    EmbeddingsCall,
    Identity,
    ProviderConfig,
    ProviderReply,
    Resilience,
    Route,
    Target,
    Usage,
    UsageRecord,
)
from gandalf.errors import PermissionDenied
from gandalf.provider.registry import ProviderRegistry
from gandalf.server.asgi import GandalfApp, Runtime
from gandalf.server.handlers import Api
from gandalf.storage.sqlite import SqliteStore

CALLS = 20_000  # per variant per round (service)
REQUESTS = 2_000  # per variant per round (app)
ROUNDS = 9
RESULTS = Path(__file__).resolve().parent / "results"

_USAGE = Usage(prompt_tokens=10, completion_tokens=20, total_tokens=30)
_BODY = b'{"id":"x","object":"chat.completion","choices":[]}'


class InstantProvider:
    """Answers at once: what is left to measure is the service around it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.config = ProviderConfig(name=name, type="fake")

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def chat(self, call: ChatCall) -> ProviderReply:
        return ProviderReply(body=_BODY, usage=_USAGE)

    async def stream(self, call: ChatCall) -> Any:
        raise NotImplementedError

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply:
        return ProviderReply(body=_BODY, usage=_USAGE)


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    def record_usage(self, record: UsageRecord) -> None:
        self.count += 1


class PlainProxy:
    """The chat path as it was before failover existed (the reference)."""

    def __init__(self, routes: RouteTable, sink: Any) -> None:
        self.routes = routes
        self._sink = sink
        self._clock = time.time

    async def chat(
        self, identity: Identity, request: ChatRequest, body: bytes, request_id: str, started: float
    ) -> Outcome[ProviderReply]:
        alias = request.model
        target = provider = None
        try:
            entry = self.routes.resolve(alias)
            if not identity.may_use(alias):
                raise PermissionDenied(f"not allowed: '{alias}'", param="model")
            target, provider = entry.targets[0]
            reply = await provider.chat(
                ChatCall(
                    body=body, request=request, alias=alias, target=target, request_id=request_id
                )
            )
        except BaseException:
            self._sink.record_usage(
                UsageRecord(
                    request_id,
                    identity.key_id,
                    identity.org_id,
                    alias,
                    target.model if target is not None else None,
                    provider.name if provider is not None else None,
                    0,
                    0,
                    0,
                    (time.perf_counter() - started) * 1000.0,
                    500,
                    self._clock(),
                )
            )
            raise
        usage = reply.usage
        self._sink.record_usage(
            UsageRecord(
                request_id,
                identity.key_id,
                identity.org_id,
                alias,
                target.model,
                provider.name,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                (time.perf_counter() - started) * 1000.0,
                reply.status,
                self._clock(),
            )
        )
        return Outcome(reply, entry.slots[0], 1)  # what the server reads

    async def chat_stream(
        self, identity: Identity, request: ChatRequest, body: bytes, request_id: str, started: float
    ) -> Outcome[PlainStream]:
        alias = request.model
        target = provider = None
        try:
            entry = self.routes.resolve(alias)
            if not identity.may_use(alias):
                raise PermissionDenied(f"not allowed: '{alias}'", param="model")
            target, provider = entry.targets[0]
            stream = await provider.stream(
                ChatCall(
                    body=body, request=request, alias=alias, target=target, request_id=request_id
                )
            )
        except BaseException:
            self._sink.record_usage(self._usage(identity, alias, request_id, started, 500))
            raise
        plain = PlainStream(stream, self, identity, alias, request_id, started)
        return Outcome(plain, entry.slots[0], 1)  # what the server reads

    def _usage(
        self,
        identity: Identity,
        alias: str,
        request_id: str,
        started: float,
        status: int,
        usage: Usage | None = None,
    ) -> UsageRecord:
        usage = usage or Usage()
        return UsageRecord(
            request_id,
            identity.key_id,
            identity.org_id,
            alias,
            None,
            None,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            (time.perf_counter() - started) * 1000.0,
            status,
            self._clock(),
        )


class PlainStream:
    """The stream wrapper as it was (usage recorded on close), for ``PlainProxy``."""

    headers: tuple[tuple[bytes, bytes], ...] = ()  # no upstream headers to relay

    def __init__(
        self,
        stream: Any,
        proxy: PlainProxy,
        identity: Identity,
        alias: str,
        request_id: str,
        started: float,
    ) -> None:
        self._stream = stream
        self._proxy = proxy
        self._identity = identity
        self._alias = alias
        self._request_id = request_id
        self._started = started
        self._done = False

    def __aiter__(self) -> Any:
        return self._stream.__aiter__()

    async def aclose(self, status: int) -> None:
        if not self._done:
            self._done = True
            self._proxy._sink.record_usage(
                self._proxy._usage(
                    self._identity,
                    self._alias,
                    self._request_id,
                    self._started,
                    status,
                    self._stream.usage,
                )
            )
        await self._stream.aclose()


IDENTITY = Identity(
    key_id="k",
    key_hash="h",
    name="bench",
    org_id="default",
    team_id=None,
    role="service_account",
    permissions=0b11,
    allowed_models=None,
    expires_at=None,
)


def _route(alias: str, count: int, strategy: str = "priority", coalesce: bool = False) -> Route:
    return Route(
        model_alias=alias,
        targets=tuple(
            Target(provider=f"p{i}", model=f"m{i}", priority=1 if strategy != "priority" else i)
            for i in range(count)
        ),
        strategy=strategy,
        coalesce=coalesce,
    )


def _table() -> RouteTable:
    providers = {f"p{i}": InstantProvider(f"p{i}") for i in range(3)}
    routes = [
        _route("priority-1", 1),
        _route("priority-3", 3),
        _route("weighted-3", 3, "weighted"),
        _route("least-latency-3", 3, "least_latency"),
        _route("coalesce-3", 3, coalesce=True),
    ]
    return RouteTable.build(routes, providers, {}, health=HealthRegistry(Resilience()))


def _request(alias: str, **extra: Any) -> tuple[ChatRequest, bytes]:
    body = orjson.dumps(
        {"model": alias, "messages": [{"role": "user", "content": "Hello"}], **extra}
    )
    return msgspec.json.decode(body, type=ChatRequest), body


Variant = Callable[[int], Awaitable[None]]


def _service_variants() -> dict[str, Variant]:
    table = _table()
    sink = CountingSink()
    plain = PlainProxy(table, sink)
    resilient = ProxyService(table, sink)

    def variant(chat: Callable[..., Awaitable[object]], alias: str, **extra: Any) -> Variant:
        request, body = _request(alias, **extra)

        async def run(n: int) -> None:
            perf = time.perf_counter
            for _ in range(n):
                await chat(IDENTITY, request, body, "req", perf())

        return run

    return {
        "plain": variant(plain.chat, "priority-1"),
        "priority-1": variant(resilient.chat, "priority-1"),
        "priority-3": variant(resilient.chat, "priority-3"),
        "weighted-3": variant(resilient.chat, "weighted-3"),
        "least-latency-3": variant(resilient.chat, "least-latency-3"),
        "coalesce-3": variant(resilient.chat, "coalesce-3", temperature=0),
    }


def _interleaved(
    loop: asyncio.AbstractEventLoop, variants: dict[str, Variant], n: int
) -> dict[str, float]:
    """Median microseconds per call of each variant, rounds interleaved (and rotated)."""
    names = list(variants)
    for name in names:  # warm-up
        loop.run_until_complete(variants[name](n // 10))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(ROUNDS):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            loop.run_until_complete(variants[name](n))
            samples[name].append((time.perf_counter() - started) / n * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def _record(values: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "micro.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("resilience", {}).update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _report(title: str, medians: dict[str, float]) -> dict[str, dict[str, float]]:
    base = medians["plain"]
    print(f"\n{title}: us per request (median of {ROUNDS} rounds), ratio to plain")
    out = {}
    for name, value in medians.items():
        ratio = value / base
        print(f"  {name:16} {value:8.2f} us   x{ratio:.3f}")
        out[name] = {"us_per_request": round(value, 3), "ratio_to_plain": round(ratio, 3)}
    return out


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    try:
        import uvloop

        new_loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        new_loop = asyncio.new_event_loop()
    yield new_loop
    new_loop.close()


def test_service_overhead(loop: asyncio.AbstractEventLoop) -> None:
    medians = _interleaved(loop, _service_variants(), CALLS)
    _record({"service": _report("ProxyService.chat, instant provider", medians)})
    # The healthy fast path: a clock read, a breaker compare, two counters.
    assert medians["priority-3"] < medians["plain"] + 1.0


def _config() -> GandalfConfig:
    return GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(
            ProviderConfig(name="fake", type="fake"),
            ProviderConfig(name="fake2", type="fake"),
        ),
        routes=(
            Route(
                model_alias="bench-model",
                targets=(
                    Target(provider="fake", model="fake-1", priority=1),
                    Target(provider="fake2", model="fake-1", priority=2),
                ),
            ),
        ),
        keys=(KeyEntry(name="bench", key=KEY, role="service_account"),),
    )


def _app(plain: bool) -> GandalfApp:
    config = _config()

    async def build() -> Runtime:
        store = SqliteStore(":memory:")
        await store.open()
        await bootstrap.reconcile(store, config)
        registry = ProviderRegistry.build(list(config.providers))
        await registry.start()
        table = RouteTable.build(
            await store.list_routes(),
            registry.providers,
            registry.disabled,
            health=HealthRegistry(config.resilience),
        )
        proxy = PlainProxy(table, store) if plain else ProxyService(table, store)
        keys = KeyCache(store)
        api = Api(cast(ProxyService, proxy), keys, store)

        async def close() -> None:
            await registry.close()
            await store.close()

        return Runtime(api.endpoints(), close)

    return GandalfApp(build, access_log=False)


@pytest.mark.parametrize(("mode", "body"), [("chat", CHAT_BODY), ("stream", STREAM_BODY)])
def test_app_overhead(loop: asyncio.AbstractEventLoop, mode: str, body: bytes) -> None:
    apps = {"plain": _app(plain=True), "resilient": _app(plain=False)}
    for app in apps.values():
        loop.run_until_complete(app.startup())
    drivers = {
        name: Driver(app, "POST", "/v1/chat/completions", body) for name, app in apps.items()
    }
    try:
        medians = _interleaved(
            loop, {name: driver.run for name, driver in drivers.items()}, REQUESTS
        )
    finally:
        for app in apps.values():
            loop.run_until_complete(app.shutdown())
    for driver in drivers.values():
        assert set(driver.statuses) == {200}, driver.statuses
    title = f"whole {mode} request through the ASGI app (two-target route, fake provider)"
    _record({f"app_{mode}": _report(title, medians)})
