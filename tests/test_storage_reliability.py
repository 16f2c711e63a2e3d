"""SqliteStore under pressure: a write lock held by another process, overflow, file modes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from gandalf.storage.sqlite import SqliteStore
from tests.test_storage import make_usage


class Sleeps:
    """The writer's injected retry sleep: records each delay, yields once, and
    runs ``on_sleep`` (e.g. releasing a lock) on the ``at``-th call."""

    def __init__(self, at: int = 0, on_sleep: Callable[[], object] | None = None) -> None:
        self.delays: list[float] = []
        self.at = at
        self.on_sleep = on_sleep

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) == self.at and self.on_sleep is not None:
            self.on_sleep()
        await asyncio.sleep(0)


def hold_write_lock(db: str) -> sqlite3.Connection:
    """Another process's writer: holds the write lock until rolled back."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_usage_survives_a_write_lock_held_longer_than_busy_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = str(tmp_path / "gandalf.db")
    holder: list[sqlite3.Connection] = []
    # The lock is released during the writer's third backoff: two attempts
    # failed on busy_timeout (10 ms each) before it.
    sleeps = Sleeps(at=3, on_sleep=lambda: holder[0].rollback())

    async def main() -> None:
        store = SqliteStore(
            db, busy_timeout_ms=10, retry_sleep=sleeps, rng=random.Random(7), usage_linger=0
        )
        await store.open()
        try:
            holder.append(hold_write_lock(db))
            records = [make_usage(n) for n in range(300)]
            for rec in records:
                store.record_usage(rec)
            await store.flush()
            assert store.usage_written == 300
            assert store.usage_failed == 0 and store.dropped_usage == 0
            assert await store.list_usage(limit=1000) == records
        finally:
            holder[0].close()
            await store.close()

    with caplog.at_level(logging.WARNING, logger="gandalf.storage"):
        asyncio.run(main())
    assert len(sleeps.delays) == 3
    # Exponential with jitter: each delay within [base * 2**n / 2, base * 2**n].
    for n, delay in enumerate(sleeps.delays):
        assert 0.05 * 2**n <= delay <= 0.1 * 2**n
    messages = [r.getMessage() for r in caplog.records if r.name == "gandalf.storage"]
    assert any("database is locked" in m and "retrying" in m for m in messages), messages


def test_queue_overflow_while_retrying_is_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = str(tmp_path / "gandalf.db")
    holder: list[sqlite3.Connection] = []
    stuck = asyncio.Event()
    release = asyncio.Event()

    async def sleep(delay: float) -> None:
        stuck.set()
        await release.wait()
        holder[0].rollback()

    async def main() -> None:
        store = SqliteStore(
            db, busy_timeout_ms=10, retry_sleep=sleep, queue_size=10, batch_size=5, usage_linger=0
        )
        await store.open()
        try:
            holder.append(hold_write_lock(db))
            for n in range(5):
                store.record_usage(make_usage(n))
            await stuck.wait()  # the writer holds the first 5 and waits to retry them
            for n in range(5, 20):
                store.record_usage(make_usage(n))
            assert store.dropped_usage == 5  # 10 more fit in the queue; 5 did not
            release.set()
            await store.flush()
            assert store.usage_written == 15
            written = [r.request_id for r in await store.list_usage(limit=100)]
            assert written == [f"req-{n}" for n in range(15)]
        finally:
            holder[0].close()
            await store.close()

    with caplog.at_level(logging.WARNING, logger="gandalf.storage"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "gandalf.storage"]
    assert "usage queue full or closed: 1 usage records dropped so far" in messages


def test_shutdown_gives_up_on_a_lock_that_never_goes_and_says_what_was_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = str(tmp_path / "gandalf.db")

    async def main() -> None:
        store = SqliteStore(db, busy_timeout_ms=10, usage_linger=0, batch_size=4)
        await store.open()
        holder = hold_write_lock(db)
        try:
            for n in range(10):
                store.record_usage(make_usage(n))
            await asyncio.wait_for(store.close(timeout=0.2), 5)
        finally:
            holder.close()
        assert store.usage_written == 0
        assert store.dropped_usage == 10

    with caplog.at_level(logging.ERROR, logger="gandalf.storage"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "gandalf.storage"]
    assert "store closed with 10 usage records unwritten" in messages


def test_a_permanent_error_is_not_retried(tmp_path: Path) -> None:
    sleeps = Sleeps()

    async def main() -> None:
        store = SqliteStore(str(tmp_path / "gandalf.db"), retry_sleep=sleeps)
        await store.open()
        try:
            store.record_usage(make_usage(1, request_id=["not", "bindable"]))
            await store.flush()
            assert (store.usage_failed, store.usage_written) == (1, 0)
        finally:
            await store.close()

    asyncio.run(main())
    assert sleeps.delays == []


# --------------------------------------------------------------------------- file modes


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_database_files_are_private(tmp_path: Path) -> None:
    db = str(tmp_path / "gandalf.db")
    old = os.umask(0o022)
    try:

        async def main() -> None:
            store = SqliteStore(db)
            await store.open()
            try:
                store.record_usage(make_usage(1))
                await store.flush()
                for path in (db, db + "-wal", db + "-shm"):
                    assert _mode(path) == 0o600, path
            finally:
                await store.close()

        asyncio.run(main())
    finally:
        os.umask(old)


def test_existing_database_files_are_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = str(tmp_path / "gandalf.db")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t (x)")
    for path in (db, db + "-wal", db + "-shm"):
        Path(path).touch()
        os.chmod(path, 0o644)

    async def main() -> None:
        store = SqliteStore(db)
        await store.open()
        try:
            for path in (db, db + "-wal", db + "-shm"):
                assert _mode(path) == 0o600, path
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="gandalf.storage"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "gandalf.storage"]
    assert f"database file {db} was readable by others (mode 644): now 600" in messages
