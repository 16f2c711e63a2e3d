"""The stores against real engines: an SQLite file, a private in-memory SQLite
database and a fresh PostgreSQL database (the ``dsn`` fixture); tests that take
``db_file`` are about SQLite's file itself."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gandalf.domain import ApiKey, Organization, ProviderConfig, Route, Target, Team, UsageRecord
from gandalf.storage._writer import BatchedWriter
from gandalf.storage.protocol import Store
from gandalf.storage.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore, StorageError
from tests.stores import make_store, postgres_database

SECRET = "sk-live-PLAINTEXT-never-in-db-0123456789"


def run(test: Callable[[Store], Awaitable[None]], dsn: str, **options: object) -> None:
    """Open a store on ``dsn``, run ``test`` with it, always close it."""

    async def main() -> None:
        store = make_store(dsn, **options)
        await store.open()
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


@pytest.fixture(params=["file", "memory", "postgres"])
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        with postgres_database() as database:
            yield database
    else:
        yield str(tmp_path / "gandalf.db") if request.param == "file" else ":memory:"


@pytest.fixture
def db_file(tmp_path: Path) -> str:
    return str(tmp_path / "gandalf.db")


def make_key(n: int = 1, **fields: object) -> ApiKey:
    values: dict[str, object] = {
        "id": f"key-{n}",
        "name": f"key {n}",
        "key_hash": f"{n:064x}",
        "prefix": f"gnd_{n:04d}",
        "created_at": 1000.0 + n,
    }
    values.update(fields)
    return ApiKey(**values)  # type: ignore[arg-type]


def make_usage(n: int, **fields: object) -> UsageRecord:
    values: dict[str, object] = {
        "request_id": f"req-{n}",
        "key_id": "key-1",
        "org_id": "default",
        "model_alias": "gpt-4o",
        "target_model": "gpt-4o-2024",
        "provider": "openai",
        "prompt_tokens": n,
        "completion_tokens": 2 * n,
        "total_tokens": 3 * n,
        "latency_ms": 1.25,
        "status": 200,
        "created_at": 2000.0 + n,
    }
    values.update(fields)
    return UsageRecord(**values)  # type: ignore[arg-type]


def provider(name: str, **fields: object) -> ProviderConfig:
    values: dict[str, object] = {"name": name, "type": "openai", "models": ("gpt-4o",)}
    values.update(fields)
    return ProviderConfig(**values)  # type: ignore[arg-type]


def route(alias: str, *targets: Target, source: str = "config") -> Route:
    return Route(model_alias=alias, targets=targets, source=source)


# --------------------------------------------------------------------------- schema and migrations


def test_schema_applied_and_version_recorded(db_file: str) -> None:
    async def check(store: Store) -> None:
        assert await store.count_keys() == 0
        assert await store.list_routes() == []

    run(check, db_file)
    with sqlite3.connect(db_file) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = conn.execute("SELECT version FROM schema_version").fetchall()
        mode = conn.execute("PRAGMA journal_mode").fetchone()
    conn.close()
    expected = {"schema_version", "organizations", "teams", "providers", "routes", "api_keys"}
    assert expected | {"usage_records"} <= tables
    assert versions == [(SCHEMA_VERSION,)] == [(len(MIGRATIONS),)]
    assert mode == ("wal",)


def test_reopen_keeps_data_and_migration_is_idempotent(db_file: str) -> None:
    async def write(store: Store) -> None:
        await store.create_key(make_key(1))

    async def read(store: Store) -> None:
        assert await store.get_key("key-1") == make_key(1)

    run(write, db_file)
    run(read, db_file)
    run(read, db_file)
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


def test_missing_migrations_are_applied_without_losing_data(db_file: str) -> None:
    upgrade = "ALTER TABLE api_keys ADD COLUMN note TEXT; -- a comment; with semicolons\n"

    async def write(store: Store) -> None:
        await store.create_key(make_key(1))

    async def read(store: Store) -> None:
        assert await store.get_key("key-1") == make_key(1)

    run(write, db_file)
    run(read, db_file, migrations=(*MIGRATIONS, upgrade))
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION + 1,)
        ]
        assert conn.execute("SELECT note FROM api_keys").fetchall() == [(None,)]
    conn.close()


def test_newer_database_is_refused(db_file: str) -> None:
    async def nothing(store: Store) -> None:
        return None

    run(nothing, db_file)
    with sqlite3.connect(db_file) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()

    async def main() -> None:
        store = SqliteStore(db_file)
        with pytest.raises(StorageError, match="version 99, newer"):
            await store.open()
        assert not await store.ping()
        await store.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- keys


def test_key_round_trip(dsn: str) -> None:
    async def check(store: Store) -> None:
        first = make_key(1, allowed_models=("gpt-4o", "claude"), expires_at=5000.0, role="admin")
        second = make_key(2, org_id="acme", team_id="red", source="api")
        await store.create_key(first)
        await store.create_key(second)

        assert await store.get_key_by_hash(first.key_hash) == first
        assert await store.get_key("key-2") == second
        assert await store.get_key_by_hash("0" * 64) is None
        assert await store.get_key("nope") is None
        assert await store.list_keys() == [first, second]
        assert await store.list_keys(org_id="acme") == [second]
        assert await store.count_keys() == 2

        assert await store.revoke_key("key-1") is True
        assert await store.revoke_key("missing") is False
        revoked = await store.get_key_by_hash(first.key_hash)
        assert revoked is not None and revoked.revoked

    run(check, dsn)


def test_created_at_zero_means_now(dsn: str) -> None:
    async def check(store: Store) -> None:
        await store.create_key(make_key(1, created_at=0.0))
        key = await store.get_key("key-1")
        assert key is not None and key.created_at == 42.0

    run(check, dsn, clock=lambda: 42.0)


def test_failing_write_raises_to_its_caller_and_writer_goes_on(dsn: str) -> None:
    async def check(store: Store) -> None:
        await store.create_key(make_key(1))
        with pytest.raises(StorageError, match="hash exists"):
            await store.create_key(make_key(2, key_hash=make_key(1).key_hash))
        with pytest.raises(StorageError, match=r"(?i)foreign key"):
            await store.create_team(Team(id="t1", org_id="no-such-org", name="t"))
        store.record_usage(make_usage(1))
        await store.create_key(make_key(3))
        assert [k.id for k in await store.list_keys()] == ["key-1", "key-3"]
        assert await store.list_teams() == []
        assert len(await store.list_usage()) == 1

    run(check, dsn)


def test_revoke_config_keys_except_touches_only_config_keys_not_kept(dsn: str) -> None:
    async def check(store: Store) -> None:
        await store.upsert_config_key(make_key(1, source="config"))
        await store.upsert_config_key(make_key(2, source="config"))
        await store.create_key(make_key(3, source="cli"))
        assert await store.revoke_config_keys_except([make_key(2).key_hash]) == 1
        revoked = {k.id: k.revoked for k in await store.list_keys()}
        assert revoked == {"key-1": True, "key-2": False, "key-3": False}
        assert await store.revoke_config_keys_except([]) == 1  # key-1 is not counted twice
        assert (await store.get_key("key-3")) == make_key(3, source="cli")

    run(check, dsn)


def test_upsert_config_key_is_idempotent(dsn: str) -> None:
    async def check(store: Store) -> None:
        key = make_key(1, source="config", role="admin")
        assert await store.upsert_config_key(key) is True
        assert await store.upsert_config_key(key) is False
        assert await store.revoke_key(key.id)

        again = make_key(1, id="other-id", created_at=9999.0, role="member", source="config")
        assert await store.upsert_config_key(again) is False
        stored = await store.get_key_by_hash(key.key_hash)
        assert stored is not None
        assert (stored.id, stored.created_at, stored.revoked) == (key.id, key.created_at, True)
        assert stored.role == "member"
        assert await store.count_keys() == 1

    run(check, dsn)


# --------------------------------------------------------------------------- providers and routes


def test_reconcile(dsn: str) -> None:
    a1 = Target(provider="openai", model="gpt-4o", priority=2)
    a2 = Target(provider="fake", model="echo", priority=1)

    async def check(store: Store) -> None:
        await store.upsert_route(route("mine", a2, source="cli"))
        await store.reconcile(
            [provider("openai", api_key_ref="${OPENAI_API_KEY}"), provider("fake", type="fake")],
            [route("gpt-4o", a1, a2), route("old", a2)],
        )
        routes = {r.model_alias: r for r in await store.list_routes()}
        assert set(routes) == {"gpt-4o", "old", "mine"}
        assert routes["gpt-4o"].targets == (a2, a1)  # ordered by priority
        assert routes["mine"].source == "cli"

        await store.reconcile(
            [provider("openai", base_url="https://example.test/v1", enabled=False)],
            [route("gpt-4o", a1)],
        )
        routes = {r.model_alias: r for r in await store.list_routes()}
        assert set(routes) == {"gpt-4o", "mine"}
        assert routes["gpt-4o"].targets == (a1,)
        assert routes["mine"] == route("mine", a2, source="cli")
        providers = await store.list_providers()
        assert providers == [provider("openai", base_url="https://example.test/v1", enabled=False)]

    run(check, dsn)


def test_provider_and_route_crud(dsn: str) -> None:
    target = Target(provider="p", model="m", weight=3)

    async def check(store: Store) -> None:
        p = provider("p", source="api", api_key_ref="${P_KEY}", priority=3, latency_ms=5)
        await store.upsert_provider(p)
        await store.upsert_route(route("r", target, source="api"))
        assert await store.list_providers() == [p]
        assert await store.list_routes() == [route("r", target, source="api")]
        await store.reconcile([], [])  # config rows only: api rows survive
        assert await store.list_providers() == [p]
        assert await store.delete_provider("p") is True
        assert await store.delete_provider("p") is False
        assert await store.delete_route("r") is True
        assert await store.delete_route("r") is False
        assert await store.list_providers() == [] and await store.list_routes() == []

    run(check, dsn)


def test_provider_secret_is_never_written(db_file: str) -> None:
    def leaked() -> list[str]:
        files = [Path(db_file), Path(db_file + "-wal")]
        return [str(f) for f in files if f.exists() and SECRET.encode() in f.read_bytes()]

    def wal_has_data() -> bool:
        wal = Path(db_file + "-wal")
        return wal.exists() and wal.stat().st_size > 0

    async def check(store: Store) -> None:
        referenced = provider("openai", api_key=SECRET, api_key_ref="${OPENAI_API_KEY}")
        literal = provider("literal", api_key=SECRET, api_key_ref=SECRET)
        await store.reconcile([referenced, literal], [])
        await store.upsert_provider(provider("api", api_key=SECRET, source="api"))
        assert wal_has_data()  # the check below really covers the WAL too
        assert leaked() == []
        stored = {p.name: p for p in await store.list_providers()}
        assert stored["openai"].api_key == "" and stored["openai"].api_key_ref == (
            "${OPENAI_API_KEY}"
        )
        assert stored["literal"].api_key_ref is None

    run(check, db_file)
    assert leaked() == []


# --------------------------------------------------------------------------- orgs and teams


def test_orgs_and_teams(dsn: str) -> None:
    async def check(store: Store) -> None:
        await store.ensure_org("default", "Default")
        await store.ensure_org("default", "Renamed")  # present: left alone
        await store.create_org(Organization(id="acme", name="Acme", created_at=5.0))
        with pytest.raises(StorageError):
            await store.create_org(Organization(id="acme", name="Again"))
        assert await store.list_orgs() == [
            Organization(id="acme", name="Acme", created_at=5.0),
            Organization(id="default", name="Default", created_at=7.0),
        ]
        red = Team(id="red", org_id="acme", name="Red", created_at=1.0)
        blue = Team(id="blue", org_id="default", name="Blue", created_at=2.0)
        await store.create_team(red)
        await store.create_team(blue)
        assert await store.list_teams() == [red, blue]
        assert await store.list_teams(org_id="acme") == [red]
        assert await store.delete_team("red") is True
        assert await store.delete_team("red") is False

    run(check, dsn, clock=lambda: 7.0)


# --------------------------------------------------------------------------- usage


def test_usage_is_flushed_on_close(db_file: str) -> None:
    records = [make_usage(n) for n in range(1000)]

    async def write(store: Store) -> None:
        for rec in records:
            store.record_usage(rec)

    async def main() -> None:
        store = SqliteStore(db_file, batch_size=128)
        await store.open()
        await write(store)
        await store.close()
        assert store.usage_written == 1000
        assert store.dropped_usage == 0 and store.usage_failed == 0

    asyncio.run(main())

    async def read(store: Store) -> None:
        stored = await store.list_usage(limit=5000)
        assert stored == records
        assert await store.list_usage(limit=2) == records[-2:]  # newest last

    run(read, db_file)


def test_full_queue_drops_and_counts(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]

    async def check(store: Store) -> None:
        # No await between these calls: the writer cannot drain, the queue fills at 10.
        for n in range(15):
            store.record_usage(make_usage(n))
        assert store.dropped_usage == 5
        now[0] += 0.5
        store.record_usage(make_usage(15))
        now[0] += 1.0
        store.record_usage(make_usage(16))
        assert store.dropped_usage == 7
        await store.flush()
        assert store.usage_written == 10
        assert [r.request_id for r in await store.list_usage()] == [f"req-{n}" for n in range(10)]

    with caplog.at_level(logging.WARNING, logger="gandalf.storage"):
        run(check, dsn, queue_size=10, clock=lambda: now[0])
    warnings = [r.getMessage() for r in caplog.records if r.name == "gandalf.storage"]
    assert warnings == [
        "usage queue full or closed: 1 usage records dropped so far",
        "usage queue full or closed: 7 usage records dropped so far",
    ]


def test_failed_usage_batch_is_counted_and_writer_goes_on(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def check(store: Store) -> None:
        store.record_usage(make_usage(1, request_id=["not", "bindable"]))
        await store.flush()
        store.record_usage(make_usage(2))
        await store.flush()
        assert (store.usage_failed, store.usage_written) == (1, 1)
        assert [r.request_id for r in await store.list_usage()] == ["req-2"]

    with caplog.at_level(logging.ERROR, logger="gandalf.storage"):
        run(check, dsn)
    assert [r.getMessage() for r in caplog.records] == ["writing a batch of 1 usage records failed"]


def test_writes_keep_their_order_with_usage(dsn: str) -> None:
    """A write op runs after the usage queued before it and before the usage queued after."""

    async def check(store: Store) -> None:
        async def count_usage_rows(conn: object) -> int:
            # Runs in the writer's turn: what it committed so far, read by a reader.
            return len(await store.list_usage())

        async def record_second() -> None:
            store.record_usage(make_usage(2))

        store.record_usage(make_usage(1))
        # gather starts its tasks in order: the op is queued before the second record.
        assert isinstance(store, BatchedWriter)  # every store's writer
        seen, _ = await asyncio.gather(store._write(count_usage_rows), record_second())
        assert seen == 1
        await store.flush()
        assert store.usage_written == 2

    run(check, dsn)


# --------------------------------------------------------------------------- lifecycle


def test_ping_and_close(dsn: str) -> None:
    async def main() -> None:
        store = make_store(dsn)
        assert await store.ping() is False
        with pytest.raises(StorageError, match="not open"):
            await store.list_keys()
        await store.open()
        assert await store.ping() is True
        await asyncio.gather(store.close(), store.close())
        await store.close()
        assert await store.ping() is False
        with pytest.raises(StorageError):
            await store.create_key(make_key(1))
        with pytest.raises(StorageError):
            await store.list_keys()
        store.record_usage(make_usage(1))
        assert store.dropped_usage == 1

    asyncio.run(main())


def test_readers_see_writes_made_through_the_writer(dsn: str) -> None:
    async def check(store: Store) -> None:
        for n in range(1, 6):
            await store.create_key(make_key(n))
            store.record_usage(make_usage(n))
        await store.flush()
        found = await asyncio.gather(*(store.get_key(f"key-{n}") for n in range(1, 6)))
        assert found == [make_key(n) for n in range(1, 6)]
        counts = await asyncio.gather(*(store.count_keys() for _ in range(8)))
        assert counts == [5] * 8
        assert len(await store.list_usage()) == 5

    run(check, dsn, readers=3)


def test_memory_stores_are_private() -> None:
    async def main() -> None:
        one, two = SqliteStore(":memory:"), SqliteStore(":memory:")
        await one.open()
        await two.open()
        try:
            await one.create_key(make_key(1))
            assert await one.count_keys() == 1
            assert await two.count_keys() == 0
        finally:
            await one.close()
            await two.close()

    asyncio.run(main())


def test_two_stores_share_one_file(db_file: str) -> None:
    """Two processes' stores on one file: both write, each sees the other's rows."""

    async def main() -> None:
        one, two = SqliteStore(db_file), SqliteStore(db_file)
        await one.open()
        await two.open()
        try:
            for n in range(50):
                (one if n % 2 else two).record_usage(make_usage(n))
            await asyncio.gather(one.create_key(make_key(1)), two.create_key(make_key(2)))
            await asyncio.gather(one.flush(), two.flush())
            assert await one.count_keys() == await two.count_keys() == 2
            assert len(await two.list_usage()) == 50
        finally:
            await one.close()
            await two.close()

    asyncio.run(main())


def test_close_abandons_what_cannot_drain_in_time(dsn: str) -> None:
    """A writer stuck past the close timeout is cancelled; queued work fails, never hangs."""

    async def main() -> None:
        store = make_store(dsn)
        await store.open()
        never = asyncio.Event()

        async def stuck(conn: object) -> None:
            await never.wait()

        async def close_now() -> None:
            store.record_usage(make_usage(1))
            await store.close(timeout=0.05)

        # gather starts its tasks in order: both writes are queued before close begins.
        assert isinstance(store, BatchedWriter)  # every store's writer
        results = await asyncio.gather(
            store._write(stuck),
            store.create_key(make_key(1)),
            close_now(),
            return_exceptions=True,
        )
        for result in results[:2]:
            assert isinstance(result, StorageError)
            assert "closed before the write ran" in str(result)
        assert results[2] is None
        assert store.dropped_usage == 1 and store.usage_written == 0

    asyncio.run(main())


def test_usage_batch_runs_on_the_writer_connection_thread(db_file: str) -> None:
    """The usage batch's transaction is one call on the writer connection's
    thread through aiosqlite's private ``Connection._execute`` and ``_conn``
    (storage/sqlite.py ``_on_thread``): this fails loudly if aiosqlite changes
    either. A batch that fails is rolled back there, leaving no transaction."""
    import threading

    import aiosqlite
    import msgspec

    from gandalf.storage.sqlite import _on_thread

    async def main() -> None:
        store = SqliteStore(db_file, readers=1)
        await store.open()
        try:
            conn = store._writer_conn
            assert isinstance(conn, aiosqlite.Connection)
            seen: list[tuple[object, object]] = []

            def probe(db: sqlite3.Connection, batch: list[UsageRecord]) -> None:
                seen.append((threading.current_thread(), db))
                assert batch == []

            await _on_thread(conn, probe, [])
            assert seen == [(conn._thread, conn._conn)]
            assert seen[0][0] is not threading.current_thread()

            bad = UsageRecord(
                request_id="r", key_id="k", org_id="o", model_alias="m", target_model="m",
                provider="p", prompt_tokens=1, completion_tokens=1, total_tokens=2,
                latency_ms=1.0, status=200, created_at=1.0, cost_usd=object(),  # type: ignore[arg-type]
            )  # fmt: skip
            with pytest.raises(sqlite3.ProgrammingError):
                await store._commit_usage(conn, [bad])
            assert not conn.in_transaction
            store.record_usage(msgspec.structs.replace(bad, cost_usd=0.5))
            await store.flush()
            assert [r.cost_usd for r in await store.list_usage()] == [0.5]
        finally:
            await store.close()

    asyncio.run(main())


def test_none_and_bool_bind_as_null_and_integer(db_file: str) -> None:
    """``open`` registers sqlite3 adapters for None and bool (a cheaper path
    than sqlite3's failing adapter lookup): they must store what sqlite3
    stored without them, NULL and the integers 0 / 1, typed so."""

    async def main() -> None:
        store = SqliteStore(db_file, readers=1)
        await store.open()
        try:
            for hit in (True, False):
                store.record_usage(
                    UsageRecord(
                        request_id=f"r-{hit}", key_id="k", org_id=None, model_alias="m",
                        target_model=None, provider=None, prompt_tokens=1, completion_tokens=1,
                        total_tokens=2, latency_ms=1.0, status=200, created_at=1.0,
                        cache_hit=hit,
                    )
                )  # fmt: skip
            await store.flush()
        finally:
            await store.close()

    asyncio.run(main())
    with sqlite3.connect(db_file) as conn:
        rows = conn.execute(
            "SELECT cache_hit, typeof(cache_hit), typeof(team_id), typeof(cost_usd), "
            "typeof(saved_usd), typeof(org_id) FROM usage_records ORDER BY id"
        ).fetchall()
        assert conn.execute("SELECT ?, typeof(?), typeof(?)", (True, False, None)).fetchall() == [
            (1, "integer", "null")
        ]
    assert rows == [
        (1, "integer", "null", "null", "null", "null"),
        (0, "integer", "null", "null", "null", "null"),
    ]
