"""app/live.py: the watcher of admin changes, driven step by step (no sleeps),
and what applying them does to a worker's key cache, tenancy, routes and
budgets, against a real store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

import pytest

from gandalf.app.cache import CachedAnswer, InProcessCache
from gandalf.app.health import HealthRegistry
from gandalf.app.live import Live, Pending, RouteBuilder, Watcher, pending_of
from gandalf.app.router import RouteTable
from gandalf.auth.apikey import KeyCache, generate_key, hash_key
from gandalf.domain import (
    ApiKey,
    Budget,
    Change,
    Organization,
    ProviderConfig,
    Route,
    Scope,
    Target,
    Tenancy,
    Usage,
)
from gandalf.errors import AuthenticationError, ModelNotFound
from gandalf.provider.registry import ProviderRegistry
from gandalf.storage.sqlite import SqliteStore

# ----------------------------------------------------------------- the watcher


class Feed:
    def __init__(self) -> None:
        self.log: list[Change] = []
        self.fail = False

    def add(self, kind: str, id: str | None = None) -> None:
        self.log.append(Change(len(self.log) + 1, kind, id))

    async def change_version(self) -> int:
        return len(self.log)

    async def changes_since(self, version: int, limit: int = 100) -> list[Change]:
        if self.fail:
            raise RuntimeError("database is locked")
        return [c for c in self.log if c.version > version][:limit]


class Applied:
    def __init__(self) -> None:
        self.seen: list[Pending] = []
        self.fail = False

    async def __call__(self, pending: Pending) -> None:
        if self.fail:
            raise RuntimeError("reload failed")
        self.seen.append(pending)


def test_pending_sums_up_the_changes() -> None:
    changes = [Change(4, "key", "h1"), Change(5, "key", "h2"), Change(6, "routes")]
    pending = pending_of(changes, 3, 100)
    assert (pending.keys, pending.all_keys, pending.routes) == ({"h1", "h2"}, False, True)
    assert not pending.tenancy and not pending.everything
    assert pending_of([Change(4, "tenancy", "o1")], 3, 100).tenancy
    assert pending_of([Change(4, "key")], 3, 100).all_keys
    assert pending_of([Change(4, "quota")], 3, 100).everything  # an unknown kind
    assert pending_of([Change(5, "key", "h")], 3, 100).everything  # 4 was pruned unseen
    assert pending_of([Change(4, "key", "h"), Change(5, "key", "h")], 3, 2).everything  # full


def test_step_applies_what_changed_and_advances_only_when_applied() -> None:
    feed, applied = Feed(), Applied()
    watcher = Watcher(feed, applied, version=0)

    async def scenario() -> None:
        assert await watcher.step() is None
        feed.add("key", "h1")
        feed.add("routes")
        pending = await watcher.step()
        assert pending is not None and pending.keys == {"h1"} and pending.routes
        assert watcher.version == 2
        assert await watcher.step() is None
        feed.add("tenancy", "o1")
        applied.fail = True
        with pytest.raises(RuntimeError):
            await watcher.step()
        assert watcher.version == 2  # not applied: read again next time
        applied.fail = False
        again = await watcher.step()
        assert again is not None and again.tenancy and watcher.version == 3

    asyncio.run(scenario())
    assert len(applied.seen) == 2


def test_a_pruned_log_or_a_flood_reloads_everything_up_to_the_newest() -> None:
    feed, applied = Feed(), Applied()
    watcher = Watcher(feed, applied, version=0, batch=3)
    for n in range(5):
        feed.add("key", f"h{n}")

    async def scenario() -> None:
        pending = await watcher.step()
        assert pending is not None and pending.everything
        assert watcher.version == 5

    asyncio.run(scenario())


def test_the_loop_survives_failures_and_polls_every_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """run() driven through its injected sleep: each tick is one poll."""
    feed, applied = Feed(), Applied()
    delays: list[float] = []
    ticks: asyncio.Queue[None] = asyncio.Queue()
    asleep = asyncio.Event()

    async def sleep(delay: float) -> None:
        delays.append(delay)
        asleep.set()
        await ticks.get()

    async def tick() -> None:
        asleep.clear()
        ticks.put_nowait(None)
        async with asyncio.timeout(5):
            await asleep.wait()  # the poll after the tick is done

    async def scenario() -> None:
        watcher = Watcher(feed, applied, version=0, interval=0.25, sleep=sleep)
        watcher.start()
        async with asyncio.timeout(5):
            await asleep.wait()
        feed.fail = True
        feed.add("routes")
        await tick()
        assert applied.seen == [] and watcher.version == 0
        feed.fail = False
        await tick()
        assert len(applied.seen) == 1 and watcher.version == 1
        await watcher.close()

    with caplog.at_level(logging.WARNING, logger="gandalf.live"):
        asyncio.run(scenario())
    assert delays == [0.25, 0.25, 0.25]
    assert "applying admin changes failed" in caplog.text
    assert "database is locked" in caplog.text


# ----------------------------------------------------------------- applying


class Service:
    def __init__(self, routes: RouteTable) -> None:
        self.routes = routes


class Governor:
    def __init__(self) -> None:
        self.rebuilt: list[list[Scope]] = []

    async def rebuild(
        self, source: object, scopes: Iterable[Scope], now: float | None = None
    ) -> dict[tuple[str, str], float]:
        self.rebuilt.append(list(scopes))
        return {}


class World:
    """A worker's state over a real store, with a watcher at the store's version."""

    def __init__(self, store: SqliteStore, version: int) -> None:
        configs = [ProviderConfig(name="fake", type="fake", models=("fake-model",))]
        registry = ProviderRegistry.build(configs)
        self.health = HealthRegistry()
        self.builder = RouteBuilder(registry.providers, registry.disabled, configs, {}, self.health)
        self.store = store
        self.keys = KeyCache(store, ttl=3600.0, negative_ttl=3600.0, tenancy=Tenancy())
        table = self.builder.table(self.builder.routes([]))
        self.services = (Service(table), Service(table))
        self.governor = Governor()
        self.live = Live(
            store,
            self.keys,
            self.services,
            self.builder,
            self.tenancy,
            governor=self.governor,
        )
        self.watcher = Watcher(store, self.live.apply, version=version)

    async def tenancy(self) -> Tenancy:
        return Tenancy(await self.store.list_orgs(), await self.store.list_teams())


def with_world(tmp_path: Path, test: object) -> None:
    async def main() -> None:
        store = SqliteStore(str(tmp_path / "g.db"))
        await store.open()
        try:
            world = World(store, await store.change_version())
            await test(world)  # type: ignore[operator]
        finally:
            await store.close()

    asyncio.run(main())


def api_key(plaintext: str, **fields: object) -> ApiKey:
    values: dict[str, object] = {
        "id": "k1",
        "name": "svc",
        "key_hash": hash_key(plaintext),
        "prefix": plaintext[:8],
    }
    values.update(fields)
    return ApiKey(**values)  # type: ignore[arg-type]


def test_a_revoked_key_is_refused_after_one_step_not_after_the_ttl(tmp_path: Path) -> None:
    secret = generate_key()

    async def test(world: World) -> None:
        await world.store.create_key(api_key(secret))
        await world.watcher.step()
        assert (await world.keys.load(secret)).key_id == "k1"
        assert world.keys.cached(secret) is not None  # cached for an hour
        await world.store.revoke_key("k1")
        pending = await world.watcher.step()
        assert pending is not None and pending.keys == {hash_key(secret)}
        assert world.keys.cached(secret) is None
        with pytest.raises(AuthenticationError):
            await world.keys.load(secret)

    with_world(tmp_path, test)


def test_a_key_tried_before_it_existed_works_once_created(tmp_path: Path) -> None:
    secret = generate_key()

    async def test(world: World) -> None:
        with pytest.raises(AuthenticationError):
            await world.keys.load(secret)  # cached as unknown for an hour
        await world.store.create_key(api_key(secret, budget=Budget(usd=5.0)))
        await world.watcher.step()
        assert (await world.keys.load(secret)).key_id == "k1"
        # its budget's spend so far was read back, once
        assert world.governor.rebuilt == [[Scope(kind="key", id="k1", budget=Budget(usd=5.0))]]
        await world.store.create_key(api_key(generate_key(), id="k2"))
        await world.watcher.step()
        assert len(world.governor.rebuilt) == 1  # no budget: nothing to read

    with_world(tmp_path, test)


def test_a_new_route_is_served_by_every_service_and_breakers_survive(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        before = world.services[0].routes
        with pytest.raises(ModelNotFound):
            before.resolve("smart")
        route = Route(
            model_alias="smart",
            targets=(Target(provider="fake", model="fake-model"),),
            source="api",
        )
        await world.store.upsert_route(route)
        pending = await world.watcher.step()
        assert pending is not None and pending.routes
        table = world.services[0].routes
        assert table is world.services[1].routes is not before  # swapped whole, in both
        assert table.resolve("smart").targets[0][0].model == "fake-model"
        assert table.health is world.health
        assert "fake-model" in table  # offered routes are kept
        await world.store.delete_route("smart")
        await world.watcher.step()
        with pytest.raises(ModelNotFound):
            world.services[1].routes.resolve("smart")

    with_world(tmp_path, test)


def test_a_live_route_change_keeps_cache_settings_and_empties_the_cache(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        cache = InProcessCache(100, 1 << 20)
        builder = world.builder
        builder.cache = cache  # as wiring builds it when a cache is configured
        await cache.put(b"k", CachedAnswer(b"{}", Usage(), "fake", "fake-model"), 60.0)
        cached = Route(
            model_alias="cached",
            targets=(Target(provider="fake", model="fake-model"),),
            source="api",
            cache=True,
            cache_ttl=7.0,
        )
        await world.store.upsert_route(cached)
        await world.watcher.step()
        entry = world.services[0].routes.resolve("cached")
        assert entry.cache is not None and entry.cache.ttl == 7.0
        assert await cache.get(b"k") is None  # a route changed: its old answers are gone

    with_world(tmp_path, test)


def test_a_cache_purge_empties_every_workers_cache(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        cache = InProcessCache(100, 1 << 20)
        world.builder.cache = cache
        table = world.builder.table(world.builder.routes([]))
        for service in world.services:
            service.routes = table
        await cache.put(b"k", CachedAnswer(b"{}", Usage(), "fake", "fake-model"), 60.0)
        await world.store.log_cache_purge()  # what another worker's purge writes
        pending = await world.watcher.step()
        assert pending is not None and pending.cache and not pending.routes
        assert world.services[0].routes is table  # nothing rebuilt
        assert await cache.get(b"k") is None

    with_world(tmp_path, test)


def test_a_route_to_a_provider_this_worker_does_not_run_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(world: World) -> None:
        targets = (Target(provider="newcomer", model="x"), Target(provider="fake", model="m"))
        await world.store.upsert_route(Route(model_alias="mixed", targets=targets, source="api"))
        only = (Target(provider="newcomer", model="x"),)
        await world.store.upsert_route(Route(model_alias="orphan", targets=only, source="api"))
        await world.watcher.step()
        table = world.services[0].routes
        assert [t.provider for t, _ in table.resolve("mixed").targets] == ["fake"]
        assert "orphan" not in table

    with caplog.at_level(logging.WARNING, logger="gandalf.live"):
        with_world(tmp_path, test)
    assert "route 'orphan' names provider(s) newcomer" in caplog.text
    assert "the route is skipped" in caplog.text
    assert "a new provider needs a restart" in caplog.text


def test_an_org_change_reloads_tenancy_and_every_identity(tmp_path: Path) -> None:
    secret = generate_key()

    async def test(world: World) -> None:
        await world.store.create_org(Organization(id="acme", name="Acme"))
        await world.store.create_key(api_key(secret, org_id="acme"))
        await world.watcher.step()
        assert world.keys.tenancy is not None and "acme" in world.keys.tenancy.orgs
        await world.keys.load(secret)
        await world.store.upsert_config_tenants(
            [Organization(id="acme", name="Acme", rpm=5, budget=Budget(usd=1.0))], []
        )
        pending = await world.watcher.step()
        assert pending is not None and pending.tenancy
        assert world.keys.cached(secret) is None  # rebuilt against the new org at next use
        identity = await world.keys.load(secret)
        assert [(s.kind, s.rpm) for s in identity.scopes] == [("org", 5)]
        assert world.governor.rebuilt[-1] == [Scope(kind="org", id="acme", budget=Budget(usd=1.0))]

    with_world(tmp_path, test)
