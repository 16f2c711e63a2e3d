"""Stores for the tests that hold every backend to one contract.

``make_store(dsn, **options)`` builds the store a DSN names (as
``wiring.make_store`` does, plus the test-only options both engines accept);
``postgres_database()`` creates a fresh PostgreSQL database on the server of
``tests/services.py`` and drops it afterwards; the ``store_dsn`` fixture in
``conftest.py`` gives a test each backend in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

from gandalf.storage.postgres import PostgresStore, is_postgres_dsn
from gandalf.storage.protocol import Store
from gandalf.storage.sqlite import SqliteStore
from tests.services import postgres_dsn

BACKENDS = ("sqlite", "postgres")


def make_store(dsn: str, **options: Any) -> Store:
    """The store for ``dsn`` with ``options``; ``readers`` becomes PostgreSQL's ``pool_size``."""
    if is_postgres_dsn(dsn):
        readers = options.pop("readers", None)
        if readers is not None:
            options["pool_size"] = readers + 1
        return PostgresStore(dsn, **options)
    return SqliteStore(dsn, **options)


def with_database(dsn: str, name: str) -> str:
    """``dsn`` naming database ``name`` instead."""
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


async def _admin(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """The DSN of a new, empty database (skips when PostgreSQL is absent); dropped after."""
    server = postgres_dsn()
    name = f"gandalf_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(server, name)
    finally:
        asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def backend_dsn(backend: str, directory: str) -> Iterator[str]:
    """A fresh database of ``backend``: a file in ``directory``, or a new PostgreSQL database."""
    if backend == "postgres":
        with postgres_database() as dsn:
            yield dsn
    else:
        yield f"{directory}/gandalf.db"


def execute(dsn: str, sql: str) -> None:
    """Run ``sql`` on the database behind ``dsn`` directly (not through a store)."""
    if is_postgres_dsn(dsn):
        asyncio.run(_admin(dsn, sql))
        return
    import sqlite3

    with contextlib.closing(sqlite3.connect(dsn)) as conn:
        conn.executescript(sql)
        conn.commit()


def migrations_of(dsn: str) -> tuple[str, ...]:
    """The schema migrations of the engine behind ``dsn`` (same numbers, same meaning)."""
    if is_postgres_dsn(dsn):
        from gandalf.storage import postgres

        return postgres.MIGRATIONS
    from gandalf.storage import sqlite

    return sqlite.MIGRATIONS
