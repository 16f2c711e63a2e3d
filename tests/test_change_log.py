"""The change log (migration 7): every store write that changes keys, orgs,
teams, routes or providers logs one change in its own transaction, so each
worker's watcher (app/live.py) sees it; writes that change nothing log none."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gandalf.domain import ApiKey, Change, Organization, ProviderConfig, Route, Target, Team
from gandalf.storage.protocol import CHANGE_LOG_KEEP, StorageError, Store
from tests.stores import execute, make_store


def run(dsn: str, test: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        store = make_store(dsn)
        await store.open()
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


def key(n: int, **fields: object) -> ApiKey:
    values: dict[str, object] = {
        "id": f"key-{n}",
        "name": f"key {n}",
        "key_hash": f"{n:064x}",
        "prefix": "gnd_abcd",
    }
    values.update(fields)
    return ApiKey(**values)  # type: ignore[arg-type]


async def kinds_after(store: Store, version: int) -> list[tuple[str, str | None]]:
    return [(c.kind, c.id) for c in await store.changes_since(version)]


def test_each_write_logs_its_change(store_dsn: str) -> None:
    async def test(store: Store) -> None:
        assert await store.change_version() == 0
        await store.create_key(key(1))
        assert await store.changes_since(0) == [Change(1, "key", f"{1:064x}")]
        await store.revoke_key("key-1")
        assert await kinds_after(store, 1) == [("key", f"{1:064x}")]
        assert not await store.revoke_key("nobody")
        await store.create_org(Organization(id="o1", name="O"))
        await store.create_team(Team(id="t1", org_id="o1", name="T"))
        await store.delete_team("t1")
        await store.delete_org("o1")
        assert await kinds_after(store, 2) == [
            ("tenancy", "o1"),
            ("tenancy", "t1"),
            ("tenancy", "t1"),
            ("tenancy", "o1"),
        ]
        v = await store.change_version()
        route = Route(model_alias="r", targets=(Target(provider="fake", model="m"),), source="cli")
        await store.upsert_route(route)
        await store.upsert_route(route)  # the same values: nothing changed, nothing logged
        await store.delete_route("r")
        await store.upsert_provider(ProviderConfig(name="p", type="fake", source="cli"))
        await store.delete_provider("p")
        assert not await store.delete_route("r")
        assert await kinds_after(store, v) == [("routes", None)] * 4
        v = await store.change_version()
        provider = ProviderConfig(name="fake", type="fake", models=("m",))
        await store.reconcile([provider], [route])
        assert await kinds_after(store, v) == [("routes", None)]
        await store.reconcile([provider], [route])  # a worker's start-up: no change
        assert await kinds_after(store, v) == [("routes", None)]
        v = await store.change_version()
        assert await store.upsert_config_key(key(2, source="config"))
        assert await store.revoke_config_keys_except([]) == 1
        assert await store.revoke_config_keys_except([]) == 0
        assert await kinds_after(store, v) == [("key", f"{2:064x}"), ("key", None)]

    run(store_dsn, test)


def test_a_failed_write_logs_nothing(store_dsn: str) -> None:
    async def test(store: Store) -> None:
        await store.create_key(key(1))
        with pytest.raises(StorageError):
            await store.create_key(key(1))
        with pytest.raises(StorageError):
            await store.create_team(Team(id="t", org_id="missing", name="T"))
        assert await store.change_version() == 1

    run(store_dsn, test)


def test_the_log_keeps_the_newest_entries_and_versions_never_repeat(store_dsn: str) -> None:
    async def test(store: Store) -> None:
        for n in range(CHANGE_LOG_KEEP + 5):
            await store.ensure_org(f"o{n}", "O")
        newest = await store.change_version()
        assert newest == CHANGE_LOG_KEEP + 5
        first = (await store.changes_since(0, limit=1))[0]
        assert first.version == newest - CHANGE_LOG_KEEP + 1  # a gap: older ones pruned

    run(store_dsn, test)
    execute(store_dsn, "DELETE FROM change_log")  # even emptied, a version is never reused

    async def again(store: Store) -> None:
        await store.ensure_org("late", "O")
        assert await store.change_version() == CHANGE_LOG_KEEP + 6

    run(store_dsn, again)


def test_config_reconciled_again_unchanged_logs_nothing(store_dsn: str) -> None:
    """Every worker reconciles the config at start-up: only real changes reach
    the other workers (each would otherwise drop its whole key cache)."""

    async def test(store: Store) -> None:
        orgs = [Organization(id="o1", name="O", rpm=5)]
        teams = [Team(id="t1", org_id="o1", name="T")]
        await store.upsert_config_tenants(orgs, teams)
        assert await kinds_after(store, 0) == [("tenancy", None)]
        await store.upsert_config_tenants(orgs, teams)
        assert await store.change_version() == 1
        await store.upsert_config_tenants([Organization(id="o1", name="O", rpm=6)], teams)
        assert await store.change_version() == 2
        assert await store.upsert_config_key(key(1, source="config", org_id="o1"))
        assert not await store.upsert_config_key(key(1, source="config", org_id="o1"))
        assert await store.change_version() == 3
        assert not await store.upsert_config_key(key(1, source="config", org_id="o1", rpm=9))
        assert await kinds_after(store, 3) == [("key", f"{1:064x}")]
        stored = await store.get_key("key-1")
        assert stored is not None and stored.rpm == 9

    run(store_dsn, test)


def test_admin_updates_log_their_change(store_dsn: str) -> None:
    # The admin API's PATCHes (a key blocked, an org's or team's limits) reach
    # every worker through the log like creations and deletions.
    async def test(store: Store) -> None:
        await store.create_key(key(2))
        await store.create_org(Organization(id="o2", name="O"))
        await store.create_team(Team(id="t2", org_id="o2", name="T"))
        version = await store.change_version()
        assert await store.update_key(key(2, blocked=True))
        assert await store.update_org(Organization(id="o2", name="O", rpm=5))
        assert await store.update_team(Team(id="t2", org_id="o2", name="T", tpm=50))
        assert not await store.update_key(key(9))  # no such key: nothing changed, nothing logged
        assert await kinds_after(store, version) == [
            ("key", f"{2:064x}"),
            ("tenancy", None),
            ("tenancy", None),
        ]

    run(store_dsn, test)
