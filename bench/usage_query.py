"""How fast ``gandalf usage`` and budget spend queries are over many rows.

Fills a temporary SQLite database (the real schema, all migrations) with
``--rows`` usage records spread over 30 days (100 keys, 10 teams, 3 orgs, 6
models, 3 providers), then times ``SqliteStore.usage_summary`` for each
grouping over the last 7 days and the whole range, and ``spend_since`` for one
key, team and org over the last day and the last 30 days::

    PYTHONPATH=. python bench/usage_query.py --rows 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from gandalf.domain import USAGE_GROUPS, UsageRecord
from gandalf.storage._rows import _USAGE_FIELDS
from gandalf.storage.sqlite import MIGRATIONS, SqliteStore

DAY = 86400.0


async def create(path: Path) -> None:
    """The schema before the rollups (migration 7): rows filled straight into
    the table are rolled up when :func:`measure` opens the database."""
    store = SqliteStore(str(path), migrations=MIGRATIONS[:6])
    await store.open()
    await store.close()


def fill(path: Path, rows: int, now: float) -> None:
    """Insert ``rows`` records straight through sqlite3 (the store's writer is
    built for a steady trickle, not a bulk load)."""
    rng = random.Random(7)
    models = [
        "gpt-4o",
        "gpt-4o-mini",
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
        "gemini-2.5-pro",
        "o3",
    ]
    providers = ["openai", "anthropic", "gemini"]
    start = now - 30 * DAY
    step = 30 * DAY / rows
    placeholders = ", ".join("?" for _ in _USAGE_FIELDS)
    sql = f"INSERT INTO usage_records ({', '.join(_USAGE_FIELDS)}) VALUES ({placeholders})"
    with sqlite3.connect(path) as conn:
        batch: list[tuple[object, ...]] = []
        for i in range(rows):
            key = rng.randrange(100)
            prompt = rng.randrange(10, 5000)
            cached = prompt // 3 if i % 4 == 0 else 0
            completion = rng.randrange(1, 800)
            status = 200 if i % 50 else 502
            record = UsageRecord(
                f"req-{i}",
                f"key-{key}",
                f"org-{key % 3}",
                "alias",
                models[i % len(models)],
                providers[i % len(providers)],
                prompt,
                completion,
                prompt + completion,
                120.0,
                status,
                start + i * step,  # written in time order, as the gateway writes them
                "chat",
                1,
                f"team-{key % 10}",
                cached,
                0,
                0,
                None if i % 97 == 0 else (prompt * 2.5 + completion * 10.0) / 1e6,
            )
            batch.append(tuple(getattr(record, name) for name in _USAGE_FIELDS))
            if len(batch) == 50_000:
                conn.executemany(sql, batch)
                batch.clear()
        conn.executemany(sql, batch)
        conn.commit()


async def measure(path: Path, now: float) -> None:
    store = SqliteStore(str(path))
    await store.open()
    try:
        for since_days in (7, 30):
            for by in USAGE_GROUPS:
                start = time.perf_counter()
                groups = await store.usage_summary(by, now - since_days * DAY)
                took = time.perf_counter() - start
                print(
                    f"usage_summary by {by:<8} since {since_days:>2}d: {took * 1000:8.1f} ms "
                    f"({len(groups)} groups, {sum(g.requests for g in groups)} rows)"
                )
        for kind, scope_id in (("key", "key-1"), ("team", "team-1"), ("org", "org-1")):
            for since_days in (1, 30):
                start = time.perf_counter()
                spent = await store.spend_since(kind, scope_id, now - since_days * DAY)
                took = time.perf_counter() - start
                print(
                    f"spend_since {kind:<4} since {since_days:>2}d: {took * 1000:8.1f} ms "
                    f"(${spent:.2f})"
                )
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", help="keep the database here (reused when it exists)")
    parser.add_argument("--analyze", action="store_true", help="also measure after ANALYZE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.db) if args.db else Path(tmp) / "usage.db"
        if path.exists():  # a database kept from an earlier run: its rows end at its last record
            with sqlite3.connect(path) as conn:
                now = float(conn.execute("SELECT MAX(created_at) FROM usage_records").fetchone()[0])
        else:
            now = time.time()
            asyncio.run(create(path))
            start = time.perf_counter()
            fill(path, args.rows, now)
            print(f"inserted {args.rows} rows in {time.perf_counter() - start:.1f} s")
        asyncio.run(measure(path, now))
        if args.analyze:
            with sqlite3.connect(path) as conn:
                conn.execute("ANALYZE")
            print("after ANALYZE:")
            asyncio.run(measure(path, now))


if __name__ == "__main__":
    main()
