"""Usage at scale: hourly rollups over a million usage records.

Seeds ``--rows`` raw usage records spread over 30 days (100 keys, 10 teams,
3 orgs, 6 models, 3 providers) into a database at the schema before the
rollups (one ``INSERT ... WITH RECURSIVE`` statement), opens it with every
migration (7 backfills the rollups, 10 rebuilds them per route), then times,
``--repeat`` times each (median and worst):

- ``usage_summary`` over the last 30 days (a window that does not start on
  an hour: both raw edges are read) per key, per model per day, and for every
  other grouping; the same query over the raw table alone for comparison;
- ``spend_since`` for one key, team and org;
- one retention pass (``prune_usage``, 5,000 records) with a 7-day retention.

``--writer N`` instead times the writer: N records queued through
``record_usage`` and flushed (run it with ``PYTHONPATH`` pointing at another
checkout for a before/after of the rollup upsert)::

    PYTHONPATH=. python bench/usage_rollups.py --rows 1000000
    PYTHONPATH=. python bench/usage_rollups.py --writer 200000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gandalf.domain import USAGE_GROUPS, UsageRecord
from gandalf.storage.sqlite import MIGRATIONS, SqliteStore

DAY = 86400.0

# Deterministic spread without Python in the loop: i * a prime modulo the cardinality.
_SEED = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :rows - 1)
INSERT INTO usage_records (
    request_id, key_id, org_id, model_alias, target_model, provider, prompt_tokens,
    completion_tokens, total_tokens, latency_ms, status, created_at, endpoint, attempts,
    team_id, cached_prompt_tokens, cache_write_tokens, reasoning_tokens, cost_usd)
SELECT 'req-' || i, 'key-' || (i * 7919 % 100), 'org-' || (i * 7919 % 100 % 3), 'alias',
    CASE i % 6 WHEN 0 THEN 'gpt-4o' WHEN 1 THEN 'gpt-4o-mini' WHEN 2 THEN 'claude-sonnet-4-5'
        WHEN 3 THEN 'claude-haiku-4-5' WHEN 4 THEN 'gemini-2.5-pro' ELSE 'o3' END,
    CASE i % 3 WHEN 0 THEN 'openai' WHEN 1 THEN 'anthropic' ELSE 'gemini' END,
    10 + i * 31 % 4990, 1 + i * 17 % 799, 11 + i * 31 % 4990 + i * 17 % 799, 120.0,
    CASE WHEN i % 50 = 0 THEN 502 ELSE 200 END, :start + i * :step, 'chat', 1,
    'team-' || (i * 7919 % 100 % 10), CASE WHEN i % 4 = 0 THEN (10 + i * 31 % 4990) / 3 ELSE 0 END,
    0, 0,
    CASE WHEN i % 97 = 0 THEN NULL ELSE ((10 + i * 31 % 4990) * 2.5 + (1 + i * 17 % 799) * 10.0)
        / 1e6 END
FROM n
"""
# The summary as it was before the rollups: one GROUP BY over the raw time range.
_RAW_BY_KEY = (
    "SELECT key_id, COUNT(*), SUM(status >= 400), SUM(prompt_tokens), SUM(completion_tokens), "
    "SUM(total_tokens), SUM(cached_prompt_tokens), SUM(cache_write_tokens), "
    "SUM(reasoning_tokens), TOTAL(cost_usd), SUM(cost_usd IS NULL AND status < 400) "
    "FROM usage_records WHERE created_at >= ? AND created_at < ? GROUP BY key_id"
)


def seed(path: Path, rows: int, now: float) -> None:
    start = now - 30 * DAY
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(_SEED, {"rows": rows, "start": start, "step": 30 * DAY / rows})
        conn.commit()


async def timed(
    label: str,
    repeat: int,
    call: Callable[[], Awaitable[object]],
    describe: Callable[[object], str],
) -> None:
    took: list[float] = []
    result: object = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = await call()
        took.append((time.perf_counter() - start) * 1000)
    print(
        f"{label:<44} median {statistics.median(took):7.1f} ms  worst {max(took):7.1f} ms  "
        f"{describe(result)}"
    )


def groups(result: object) -> str:
    assert isinstance(result, list)
    return f"({len(result)} rows, {sum(r.requests for r in result)} requests)"


async def measure(path: Path, now: float, repeat: int) -> None:
    since = now - 30 * DAY - 1234.5  # not on an hour: both edges come from raw rows
    start = time.perf_counter()
    store = SqliteStore(str(path), clock=lambda: now, usage_retention=7 * DAY)
    await store.open()  # applies migrations 7 and 10: the rollup backfills
    print(f"open (migrations, rollup backfill): {time.perf_counter() - start:.1f} s")
    try:
        rolled = (await store._fetchall("SELECT count(*) FROM usage_hourly", ()))[0][0]
        print(f"usage_hourly rows: {rolled}")
        await timed(
            "usage_summary by key, 30 d",
            repeat,
            lambda: store.usage_summary("key", since, now),
            groups,
        )
        await timed(
            "usage_summary by model, bucket=day, 30 d",
            repeat,
            lambda: store.usage_summary("model", since, now, bucket="day"),
            groups,
        )
        await timed(
            "usage_summary total, bucket=hour, 30 d",
            repeat,
            lambda: store.usage_summary(None, since, now, bucket="hour"),
            groups,
        )
        for by in USAGE_GROUPS:
            if by in ("key", "model"):
                continue
            await timed(
                f"usage_summary by {by}, 30 d",
                repeat,
                lambda by=by: store.usage_summary(by, since, now),  # type: ignore[misc]
                groups,
            )
        await timed(
            "raw table alone: by key, 30 d (before)",
            repeat,
            lambda: store._fetchall(_RAW_BY_KEY, (since, now)),
            lambda rows: f"({len(rows)} rows)",  # type: ignore[arg-type]
        )
        for kind, scope in (("key", "key-1"), ("team", "team-1"), ("org", "org-1")):
            await timed(
                f"spend_since {kind}, 30 d",
                repeat,
                lambda kind=kind, scope=scope: store.spend_since(kind, scope, since),  # type: ignore[misc]
                lambda usd: f"(${usd:.2f})",
            )
        await timed(
            "prune_usage: one pass, retention 7 d",
            repeat,
            store.prune_usage,
            lambda n: f"({n} deleted)",
        )
    finally:
        await store.close()


async def writer(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(str(Path(tmp) / "w.db"), queue_size=count + 1)
        await store.open()
        try:
            base = time.time()
            records = [
                UsageRecord(
                    request_id=f"r{i}",
                    key_id=f"key-{i % 100}",
                    org_id=f"org-{i % 3}",
                    model_alias="alias",
                    target_model=f"m{i % 6}",
                    provider=f"p{i % 3}",
                    prompt_tokens=100,
                    completion_tokens=20,
                    total_tokens=120,
                    latency_ms=5.0,
                    status=200,
                    created_at=base + i * 0.01,
                    team_id=f"team-{i % 10}",
                    cost_usd=0.001,
                )
                for i in range(count)
            ]
            start = time.perf_counter()
            cpu = time.process_time()
            for record in records:
                store.record_usage(record)
            await store.flush()
            wall = time.perf_counter() - start
            used = time.process_time() - cpu
            print(
                f"writer: {count} records in {wall:.2f} s ({count / wall:,.0f}/s), "
                f"{used / count * 1e6:.1f} us CPU per record"
            )
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--writer", type=int, default=0, help="time the writer instead")
    args = parser.parse_args()
    if args.writer:
        asyncio.run(writer(args.writer))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "usage.db"
        now = time.time()

        async def create() -> None:  # the schema before the rollups
            store = SqliteStore(str(path), migrations=MIGRATIONS[:6])
            await store.open()
            await store.close()

        asyncio.run(create())
        start = time.perf_counter()
        seed(path, args.rows, now)
        print(f"seeded {args.rows} rows in {time.perf_counter() - start:.1f} s")
        asyncio.run(measure(path, now, args.repeat))


if __name__ == "__main__":
    main()
