"""The Store contract across engines and instances.

The per-method behaviour of every store runs on both engines in the store
test modules (test_storage, test_change_log, test_usage_query,
test_usage_rollups, test_storage_resilience, through ``store_dsn``). Here:
that both classes implement the whole Protocol with the same signatures, and
what only several stores on one database show (two gateway instances on one
PostgreSQL, two processes on one SQLite file): each sees the other's writes
and changes, concurrent migrations run once, change versions stay gapless
and ordered, concurrent usage batches are counted once in the rollups. Then
PostgreSQL's own edges: an unreachable server, a newer schema, which errors a
usage batch waits out, the DSN's password in messages.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import random
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from gandalf import wiring
from gandalf.config import parse_config
from gandalf.domain import ApiKey, Change, Organization, Route, Target, UsageRecord
from gandalf.errors import ConfigError
from gandalf.storage import postgres
from gandalf.storage._rollups import PG_SPEND_SELECTS, PG_SUMMARY_SELECTS, spend_params, split
from gandalf.storage.postgres import PostgresStore, redact
from gandalf.storage.protocol import CannotCreate, StorageError, Store, TenantInUse
from gandalf.storage.sqlite import SqliteStore
from tests.serve import free_port
from tests.stores import execute, make_store, postgres_database

T0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400  # a UTC midnight


def both_are_stores(sqlite: SqliteStore, pg: PostgresStore) -> tuple[Store, Store]:
    """mypy checks here that each class satisfies the Protocol."""
    return sqlite, pg


@pytest.mark.parametrize("engine", [SqliteStore, PostgresStore])
def test_each_store_has_the_whole_protocol_with_its_signatures(engine: type) -> None:
    members = [
        name
        for name in dir(Store)
        if not name.startswith("_") and name not in dir(object) and name != "mro"
    ]
    assert len(members) > 40
    for name in members:
        want, got = getattr(Store, name), getattr(engine, name)
        if isinstance(want, property):
            assert isinstance(got, property), name
            continue
        assert inspect.signature(got) == inspect.signature(want), name
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), name


def test_both_engines_have_the_same_tables_and_columns_at_each_version(tmp_path: Path) -> None:
    """The same version number means the same schema: after all migrations,
    every table has the same columns and the same secondary indexes on SQLite
    and PostgreSQL (one engine's new migration without its twin fails here, as
    does a column spelt apart)."""
    from gandalf.storage import sqlite

    assert len(postgres.MIGRATIONS) == len(sqlite.MIGRATIONS)

    async def columns(store: Store, sql: str) -> dict[str, set[str]]:
        await store.open()
        try:
            tables: dict[str, set[str]] = {}
            if isinstance(store, PostgresStore):
                rows = await store._fetch(sql)
            else:
                assert isinstance(store, SqliteStore)
                rows = await store._fetchall(sql, ())
            for table, column in rows:
                tables.setdefault(table, set()).add(column)
            return tables
        finally:
            await store.close()

    lite = asyncio.run(
        columns(
            SqliteStore(f"{tmp_path}/schema.db"),
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p "
            "WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
        )
    )
    # Indexes made by CREATE INDEX (not those behind a key or UNIQUE constraint).
    lite_indexes = asyncio.run(
        columns(
            SqliteStore(f"{tmp_path}/schema.db"),
            "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL",
        )
    )
    with postgres_database() as dsn:
        pg = asyncio.run(
            columns(
                PostgresStore(dsn),
                "SELECT table_name::text, column_name::text FROM information_schema.columns "
                "WHERE table_schema = 'public'",
            )
        )
        pg_indexes = asyncio.run(
            columns(
                PostgresStore(dsn),
                "SELECT tablename::text, indexname::text FROM pg_indexes "
                "WHERE schemaname = 'public' "
                "AND indexname NOT IN (SELECT conname FROM pg_constraint)",
            )
        )
    pg.pop("change_counter")  # PostgreSQL's change-version counter (SQLite: AUTOINCREMENT)
    assert pg == lite
    assert pg_indexes == lite_indexes
    assert lite_indexes["usage_records"] == {"usage_records_created_at"}
    assert {"responses", "users", "jwt_issuers"} <= set(pg)


def test_errors_are_the_shared_classes(store_dsn: str) -> None:
    async def check(store: Store) -> None:
        await store.create_org(Organization(id="o", name="O"))
        with pytest.raises(CannotCreate):
            await store.create_org(Organization(id="o", name="O"))
        await store.create_key(key(1, org_id="o"))
        with pytest.raises(StorageError):
            await store.create_key(key(1))
        with pytest.raises(TenantInUse):
            await store.delete_org("o")

    run(store_dsn, check)


def key(n: int, **fields: object) -> ApiKey:
    values: dict[str, object] = {
        "id": f"key-{n}",
        "name": f"key {n}",
        "key_hash": f"{n:064x}",
        "prefix": "gnd_abcd",
        "created_at": 1000.0 + n,
    }
    values.update(fields)
    return ApiKey(**values)  # type: ignore[arg-type]


def usage(n: int, key_id: str, at: float, cost: float = 0.25) -> UsageRecord:
    return UsageRecord(
        f"req-{key_id}-{n}", key_id, "o", "alias", "m", "p", 3, 4, 7, 1.0, 200, at, cost_usd=cost
    )


def run(dsn: str, test: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        store = make_store(dsn)
        await store.open()
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


def run_two(dsn: str, test: Callable[[Store, Store], Awaitable[None]]) -> None:
    """Two stores on one database, opened at the same time (two instances starting)."""

    async def main() -> None:
        one, two = make_store(dsn), make_store(dsn)
        await asyncio.gather(one.open(), two.open())
        try:
            await test(one, two)
        finally:
            await asyncio.gather(one.close(), two.close())

    asyncio.run(main())


# --------------------------------------------------------------------------- two instances


def test_two_instances_see_each_others_writes_and_changes(store_dsn: str) -> None:
    async def check(a: Store, b: Store) -> None:
        start = await b.change_version()
        await a.create_key(key(1))
        found = await b.get_key_by_hash(key(1).key_hash)
        assert found is not None and found.id == "key-1"
        assert await b.changes_since(start) == [Change(start + 1, "key", key(1).key_hash)]
        assert await b.revoke_key("key-1")
        again = await a.get_key("key-1")
        assert again is not None and again.revoked
        assert [c.kind for c in await a.changes_since(start)] == ["key", "key"]
        await b.upsert_route(Route(model_alias="r", targets=(Target(provider="p", model="m"),)))
        assert [r.model_alias for r in await a.list_routes()] == ["r"]
        for n in range(10):
            (a if n % 2 else b).record_usage(usage(n, "k", T0 + n))
        await asyncio.gather(a.flush(), b.flush())
        assert len(await a.list_usage()) == len(await b.list_usage()) == 10
        assert await a.spend_since("key", "k", T0) == pytest.approx(2.5)

    run_two(store_dsn, check)


def test_concurrent_writers_keep_change_versions_gapless_and_in_order(store_dsn: str) -> None:
    """Admin writes from two instances at once: a watcher that read up to a
    version never misses a later change (no gaps, nothing committed behind it)."""

    async def check(a: Store, b: Store) -> None:
        start = await a.change_version()
        seen: list[int] = []

        async def watch() -> None:
            version = start
            for _ in range(2000):  # bounded: each poll is one round trip
                for change in await a.changes_since(version):
                    assert change.version == version + 1, (version, change)
                    version = change.version
                    seen.append(version)
                if version >= start + 60:
                    return
                await asyncio.sleep(0)

        writes = [
            (a if n % 2 else b).ensure_org(f"org-{n}", "O")  # each logs a change
            for n in range(60)
        ]
        await asyncio.gather(watch(), *writes)
        assert seen == list(range(start + 1, start + 61))

    run_two(store_dsn, check)


def test_concurrent_usage_batches_are_counted_once_in_the_rollups(store_dsn: str) -> None:
    rng = random.Random(5)
    records = [usage(n, rng.choice(["k1", "k2"]), T0 + rng.random() * 7200) for n in range(600)]

    async def check(a: Store, b: Store) -> None:
        for n, record in enumerate(records):
            (a if n % 2 else b).record_usage(record)
            if n % 50 == 0:
                await asyncio.sleep(0)  # let both writers commit batches meanwhile
        await asyncio.gather(a.flush(), b.flush())
        # Whole hours come from the rollups only: they must equal the raw counts.
        for store in (a, b):
            got = {s.group: s.requests for s in await store.usage_summary("key", T0, T0 + 7200)}
            want = {k: sum(r.key_id == k for r in records) for k in ("k1", "k2")}
            assert got == want
            assert await store.spend_since("key", "k1", T0) == pytest.approx(0.25 * want["k1"])

    run_two(store_dsn, check)


def test_two_instances_starting_at_once_migrate_once(store_dsn: str) -> None:
    async def check(a: Store, b: Store) -> None:
        assert await a.count_keys() == await b.count_keys() == 0

    run_two(store_dsn, check)
    if store_dsn.startswith("postgresql://"):
        rows = asyncio.run(fetch(store_dsn, "SELECT version FROM schema_version"))
        assert rows == [(postgres.SCHEMA_VERSION,)]


async def fetch(dsn: str, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


# --------------------------------------------------------------------------- PostgreSQL's edges


def test_an_unreachable_server_is_a_storage_error_without_the_password() -> None:
    dsn = f"postgresql://gandalf:s3cret-pw@127.0.0.1:{free_port()}/gandalf"

    async def main() -> None:
        store = PostgresStore(dsn, connect_timeout=5)
        with pytest.raises(StorageError, match="cannot connect to PostgreSQL at") as caught:
            await store.open()
        assert "s3cret" not in str(caught.value)
        assert "postgresql://gandalf:***@127.0.0.1:" in str(caught.value)
        assert await store.ping() is False

    asyncio.run(main())


def test_a_newer_database_is_refused() -> None:
    with postgres_database() as dsn:
        run(dsn, lambda store: store.flush())
        execute(dsn, "UPDATE schema_version SET version = 99")

        async def main() -> None:
            store = PostgresStore(dsn)
            newer = f"schema version 99, newer than the {postgres.SCHEMA_VERSION} "
            with pytest.raises(StorageError, match=newer):
                await store.open()

        asyncio.run(main())


def test_which_usage_batch_failures_are_waited_out() -> None:
    def error(sqlstate: str) -> asyncpg.PostgresError:
        exc = asyncpg.PostgresError.new({"C": sqlstate, "M": "x"})
        assert isinstance(exc, asyncpg.PostgresError)
        return exc

    store = PostgresStore("postgresql://localhost/x")
    for code in ("08006", "40P01", "40001", "53100", "57P01"):
        assert store._transient(error(code)), code
    for code in ("22P02", "23505", "42P01"):
        assert not store._transient(error(code)), code
    assert store._transient(ConnectionRefusedError())
    assert not store._transient(ValueError("cannot bind"))


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://u:pw@db:5432/g", "postgresql://u:***@db:5432/g"),
        ("postgresql://u@db/g", "postgresql://u@db/g"),
        ("postgres://:pw@[::1]/g?sslmode=require", "postgres://:***@[::1]/g?sslmode=require"),
    ],
)
def test_messages_never_show_the_password(dsn: str, shown: str) -> None:
    assert redact(dsn) == shown


def test_postgres_without_asyncpg_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No seam for "not installed" but the import system: asyncpg made unimportable.
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    monkeypatch.delitem(sys.modules, "gandalf.storage.postgres")
    config = parse_config("database: {dsn: 'postgresql://db/g'}\n", source="g.yaml", env={})
    with pytest.raises(ConfigError) as caught:
        wiring.make_store(config)
    assert str(caught.value) == (
        "g.yaml: database.dsn: PostgreSQL needs asyncpg: pip install 'gandalf-gateway[postgres]'"
    )
    sqlite = parse_config("database: {dsn: ':memory:'}\n", source="g.yaml", env={})
    assert isinstance(wiring.make_store(sqlite), SqliteStore)  # SQLite needs none of it


def test_postgres_queries_can_read_their_indexes() -> None:
    """As tests/test_usage_query.py checks for SQLite: spend reads the daily
    rollups' covering index (index-only) and its raw rows through created_at;
    summaries read ranges through created_at and the rollups' primary keys.
    Sequential scans are switched off so that the planner's choice on empty
    tables says which index it can use."""
    with postgres_database() as dsn:
        run(dsn, lambda store: store.flush())

        async def plans() -> tuple[dict[str, str], list[str]]:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("SET enable_seqscan = off")
                spend = {
                    kind: " ".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *params))
                    for kind, sql in PG_SPEND_SELECTS.items()
                    for params in [spend_params("x", 0.0)]
                }
                ranges = tuple(itertools.chain.from_iterable(split(10.0, 1e9)))
                summaries = []
                for key in (("key", None), ("route", "day")):
                    rows = await conn.fetch("EXPLAIN " + PG_SUMMARY_SELECTS[key], *ranges, None, 0)
                    summaries.append(" ".join(r[0] for r in rows))
                return spend, summaries
            finally:
                await conn.close()

        spend, summaries = asyncio.run(plans())
    for kind, plan in spend.items():
        assert "Index Scan using usage_records_created_at" in plan, plan
        assert f"Index Only Scan using usage_daily_{kind}_spend" in plan, plan
        assert "Index Scan using usage_hourly_pkey" in plan, plan
    for summary in summaries:
        for index in ("usage_records_created_at", "usage_hourly_pkey", "usage_daily_pkey"):
            assert f"Index Scan using {index}" in summary, summary
        assert "Seq Scan" not in summary
