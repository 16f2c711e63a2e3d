"""Storage for routing and resilience: migration 2 (route policy, usage attempts)."""

from __future__ import annotations

from gandalf.domain import Route, Target
from gandalf.storage.protocol import Store
from tests.stores import execute, migrations_of
from tests.test_storage import make_usage, run

TARGETS = (Target(provider="a", model="m", priority=1), Target(provider="b", model="m", priority=2))


def test_routes_keep_their_policy(store_dsn: str) -> None:
    routes = [
        Route(model_alias="plain", targets=TARGETS),
        Route(
            model_alias="tuned",
            targets=TARGETS,
            strategy="least_latency",
            max_attempts=5,
            coalesce=True,
        ),
    ]

    async def check(store: Store) -> None:
        await store.reconcile([], routes)
        assert await store.list_routes() == routes
        changed = Route(model_alias="tuned", targets=TARGETS, strategy="weighted", max_attempts=2)
        await store.reconcile([], [routes[0], changed])
        assert await store.list_routes() == [routes[0], changed]

    run(check, store_dsn)


def test_usage_records_keep_their_attempts(store_dsn: str) -> None:
    async def check(store: Store) -> None:
        for n, attempts in enumerate((1, 3, 0), start=1):
            store.record_usage(make_usage(n, attempts=attempts))
        await store.flush()
        assert [r.attempts for r in await store.list_usage()] == [1, 3, 0]

    run(check, store_dsn)


def test_a_version_1_database_is_upgraded_in_place(store_dsn: str) -> None:
    db = store_dsn

    async def old(store: Store) -> None:
        await store.flush()

    run(old, db, migrations=migrations_of(db)[:1])  # a version 1 database
    execute(
        db,
        "INSERT INTO routes (model_alias, targets, strategy, source, updated_at) "
        "VALUES ('r', '[{\"provider\":\"a\",\"model\":\"m\"}]', 'priority', 'config', 1);"
        "INSERT INTO usage_records (request_id, model_alias, status, created_at) "
        "VALUES ('req-old', 'r', 200, 1)",
    )

    async def new(store: Store) -> None:
        (route,) = await store.list_routes()
        assert (route.max_attempts, route.coalesce) == (None, False)
        (usage,) = await store.list_usage()
        assert (usage.request_id, usage.attempts) == ("req-old", 1)

    run(new, db)
