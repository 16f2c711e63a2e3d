"""Storage for routing and resilience: migration 2 (route policy, usage attempts)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from gandalf.domain import Route, Target
from gandalf.storage.sqlite import MIGRATIONS, SqliteStore
from tests.test_storage import make_usage, run

TARGETS = (Target(provider="a", model="m", priority=1), Target(provider="b", model="m", priority=2))


def test_routes_keep_their_policy(tmp_path: Path) -> None:
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

    async def check(store: SqliteStore) -> None:
        await store.reconcile([], routes)
        assert await store.list_routes() == routes
        changed = Route(model_alias="tuned", targets=TARGETS, strategy="weighted", max_attempts=2)
        await store.reconcile([], [routes[0], changed])
        assert await store.list_routes() == [routes[0], changed]

    run(check, str(tmp_path / "gandalf.db"))


def test_usage_records_keep_their_attempts(tmp_path: Path) -> None:
    async def check(store: SqliteStore) -> None:
        for n, attempts in enumerate((1, 3, 0), start=1):
            store.record_usage(make_usage(n, attempts=attempts))
        await store.flush()
        assert [r.attempts for r in await store.list_usage()] == [1, 3, 0]

    run(check, str(tmp_path / "gandalf.db"))


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    db = str(tmp_path / "gandalf.db")

    async def old(store: SqliteStore) -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(
                "INSERT INTO routes (model_alias, targets, strategy, source, updated_at) "
                "VALUES ('r', '[{\"provider\":\"a\",\"model\":\"m\"}]', 'priority', 'config', 1)"
            )
            conn.execute(
                "INSERT INTO usage_records (request_id, model_alias, status, created_at) "
                "VALUES ('req-old', 'r', 200, 1)"
            )
            conn.commit()

    run(old, db, migrations=MIGRATIONS[:1])

    async def new(store: SqliteStore) -> None:
        (route,) = await store.list_routes()
        assert (route.max_attempts, route.coalesce) == (None, False)
        (usage,) = await store.list_usage()
        assert (usage.request_id, usage.attempts) == ("req-old", 1)

    run(new, db)
