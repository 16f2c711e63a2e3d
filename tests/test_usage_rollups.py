"""Hourly usage rollups (storage/_rollups.py): written with the raw rows,
backfilled by the migration, read for whole hours; raw retention.

The reference everywhere is a plain Python sum over the records themselves
(what summing the raw table answers), compared with what the store answers
from rollups plus raw edges, for random records and random time windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gandalf.app.budget import period_bounds
from gandalf.domain import USAGE_GROUPS, UsageRecord, UsageSummary
from gandalf.storage._rollups import HOUR, SUMMARY_SELECTS, split
from gandalf.storage._rows import _USAGE_FIELDS
from gandalf.storage.postgres import is_postgres_dsn
from gandalf.storage.protocol import Store
from gandalf.storage.sqlite import MIGRATIONS
from tests.stores import execute, make_store, migrations_of

T0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400  # a UTC midnight
COLUMNS = {
    "key": "key_id", "team": "team_id", "org": "org_id", "provider": "provider",
    "route": "model_alias",
}  # fmt: skip
MEASURES = (
    "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens",
    "cached_prompt_tokens", "cache_write_tokens", "reasoning_tokens", "cost_usd", "unpriced",
)  # fmt: skip


def run(
    db: Path | str,
    test: Callable[[Store], Awaitable[None]],
    **options: object,
) -> None:
    async def main() -> None:
        store = make_store(str(db), **options)
        await store.open()
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


def random_records(rng: random.Random, n: int, span: float) -> list[UsageRecord]:
    records = []
    for i in range(n):
        key = rng.choice(["k1", "k2", "k3", None])
        at = T0 + rng.random() * span
        if i % 17 == 0:  # exactly on an hour boundary: the edges must count it once
            at = T0 + HOUR * rng.randrange(int(span // HOUR))
        prompt, completion = rng.randrange(0, 500), rng.randrange(0, 200)
        status = rng.choice([200, 200, 200, 429, 502])
        records.append(
            UsageRecord(
                request_id=f"req-{i}",
                key_id=key,
                org_id=rng.choice(["o1", "o2", None]),
                model_alias=rng.choice(["a1", "a2"]),
                target_model=rng.choice(["m1", "m2", None]),
                provider=rng.choice(["p1", "p2", None]),
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                latency_ms=1.0,
                status=status,
                created_at=at,
                team_id=rng.choice(["t1", None]),
                cached_prompt_tokens=rng.randrange(3),
                cache_write_tokens=rng.randrange(2),
                reasoning_tokens=rng.randrange(4),
                cost_usd=None if rng.random() < 0.2 else rng.randrange(1, 1000) / 1024,
            )
        )
    return records


def reference(
    records: list[UsageRecord],
    by: str | None,
    since: float,
    until: float,
    bucket: str | None,
) -> dict[tuple[float | None, str | None], UsageSummary]:
    out: dict[tuple[float | None, str | None], UsageSummary] = {}
    for r in records:
        if not since <= r.created_at < until:
            continue
        if by is None:
            group = None
        elif by == "model":
            group = r.target_model or r.model_alias
        else:
            group = getattr(r, COLUMNS[by])
        start = None
        if bucket is not None:
            size = HOUR if bucket == "hour" else 86400
            start = float(int(r.created_at) // size * size)
        s = out.setdefault((start, group), UsageSummary(group=group, bucket=start))
        s.requests += 1
        s.errors += r.status >= 400
        s.prompt_tokens += r.prompt_tokens
        s.completion_tokens += r.completion_tokens
        s.total_tokens += r.total_tokens
        s.cached_prompt_tokens += r.cached_prompt_tokens
        s.cache_write_tokens += r.cache_write_tokens
        s.reasoning_tokens += r.reasoning_tokens
        s.cost_usd += r.cost_usd or 0.0
        s.unpriced += r.cost_usd is None and r.status < 400
    return out


def measures(s: UsageSummary) -> tuple[object, ...]:
    return tuple(getattr(s, m) for m in MEASURES)


def windows(rng: random.Random, span: float) -> list[tuple[float, float | None]]:
    """Aligned, unaligned, inside one hour, spanning days, open-ended."""
    found: list[tuple[float, float | None]] = [
        (T0, None),
        (0.0, None),
        (T0 + 2 * HOUR, T0 + 5 * HOUR),
        (T0 + 2 * HOUR + 1.5, T0 + 5 * HOUR - 0.25),
        (T0 + 3 * HOUR + 10, T0 + 3 * HOUR + 2000),  # no whole hour inside
        (T0 + 3 * HOUR + 10, T0 + 4 * HOUR + 10),  # crosses one boundary, no whole hour
    ]
    for _ in range(8):
        a, b = sorted(rng.random() * span for _ in range(2))
        found.append((T0 + a, T0 + b))
    return found


def compare(
    got: list[UsageSummary],
    want: dict[tuple[float | None, str | None], UsageSummary],
) -> None:
    assert len(got) == len(want)
    for row in got:
        ref = want[(row.bucket, row.group)]
        assert measures(row)[:-2] == measures(ref)[:-2]
        assert row.unpriced == ref.unpriced
        assert row.cost_usd == pytest.approx(ref.cost_usd, rel=1e-12, abs=1e-12)


def test_summary_from_rollups_equals_the_raw_sum(store_dsn: str) -> None:
    """Random records in several writer batches over three days; every
    grouping, bucket and window answers what summing the records answers."""
    rng = random.Random(16)
    span = 3 * 86400.0
    records = random_records(rng, 1500, span)

    async def test(store: Store) -> None:
        for start in range(0, len(records), 200):  # several batches, hours upserted twice
            for r in records[start : start + 200]:
                store.record_usage(r)
            await store.flush()
        for since, until in windows(rng, span):
            end = float("inf") if until is None else until
            for by in (None, *USAGE_GROUPS):
                for bucket in (None, "hour", "day"):
                    got = await store.usage_summary(by, since, until, bucket=bucket)
                    compare(got, reference(records, by, since, end, bucket))

    run(store_dsn, test, batch_size=64)


def test_rollups_are_read_for_whole_hours_only(store_dsn: str) -> None:
    """Proof that the rollups answer: rows removed from the raw table behind
    the store's back still count for whole hours, not at the edges."""
    db = store_dsn
    records = [
        UsageRecord(f"r{i}", "k1", "o1", "a", "m", "p", 1, 1, 2, 1.0, 200, T0 + i * 600.0)
        for i in range(12)  # two hours, one record every 10 minutes
    ]

    async def write(store: Store) -> None:
        for r in records:
            store.record_usage(r)
        await store.flush()

    run(db, write)
    execute(db, "DELETE FROM usage_records")

    async def read(store: Store) -> None:
        [whole] = await store.usage_summary("key", T0, T0 + 2 * HOUR)
        assert whole.requests == 12
        # [T0 + 1s, T0 + 2h + 1s): only the hour [T0 + 1h, T0 + 2h) is whole
        [inner] = await store.usage_summary("key", T0 + 1, T0 + 2 * HOUR + 1)
        assert inner.requests == 6
        assert await store.usage_summary("key", T0 + 1, T0 + HOUR - 1) == []

    run(db, read)


def test_split_tiles_the_window() -> None:
    e = (0.0, 0.0)
    d = 86400.0
    assert split(T0, T0 + 2 * HOUR) == ((T0, T0), (T0, T0 + 2 * HOUR), e, e, (T0 + 2 * HOUR,) * 2)
    assert split(T0 + 1, T0 + HOUR + 1) == ((T0 + 1, T0 + HOUR + 1), e, e, e, e)
    assert split(T0 - 10, T0 + 2 * d + HOUR + 5) == (
        (T0 - 10, T0),
        (T0, T0),
        (T0, T0 + 2 * d),
        (T0 + 2 * d, T0 + 2 * d + HOUR),
        (T0 + 2 * d + HOUR, T0 + 2 * d + HOUR + 5),
    )
    assert split(T0 - 10, T0 + 2 * d, days=False) == (
        (T0 - 10, T0),
        (T0, T0 + 2 * d),
        e,
        e,
        (T0 + 2 * d, T0 + 2 * d),
    )
    _, hours, days, later, _ = split(T0 + 1, float("inf"))
    assert (hours, days, later) == (
        (T0 + HOUR, T0 + d),
        (T0 + d, float("inf")),
        (float("inf"),) * 2,
    )


def test_whole_days_are_read_from_the_daily_rollups(store_dsn: str) -> None:
    db = store_dsn
    records = [
        UsageRecord(f"r{i}", "k1", "o1", "a", "m", "p", 1, 1, 2, 1.0, 200, T0 + i * 3600.0)
        for i in range(72)  # three days, one an hour
    ]

    async def write(store: Store) -> None:
        for r in records:
            store.record_usage(r)
        await store.flush()

    run(db, write)
    execute(db, "DELETE FROM usage_records; DELETE FROM usage_hourly")

    async def read(store: Store) -> None:
        [total] = await store.usage_summary(None, T0 - 5, T0 + 3 * 86400.0 + 5)
        assert total.requests == 72  # only the daily rollups are left
        days = await store.usage_summary("key", T0, T0 + 3 * 86400.0, bucket="day")
        assert [(r.bucket, r.requests) for r in days] == [
            (T0, 24),
            (T0 + 86400.0, 24),
            (T0 + 2 * 86400.0, 24),
        ]
        assert await store.usage_summary(None, T0, T0 + 86400.0, bucket="hour") == []

    run(db, read)


def test_migration_backfills_rollups_from_existing_rows(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    rng = random.Random(7)
    records = random_records(rng, 400, 86400.0)
    run(db, lambda store: store.flush(), migrations=MIGRATIONS[:6])  # before rollups (migration 7)
    placeholders = ", ".join("?" * len(_USAGE_FIELDS))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executemany(
            f"INSERT INTO usage_records ({', '.join(_USAGE_FIELDS)}) VALUES ({placeholders})",
            [tuple(getattr(r, f) for f in _USAGE_FIELDS) for r in records],
        )
        conn.commit()

    async def read(store: Store) -> None:
        for by in ("key", "model"):
            got = await store.usage_summary(by, T0, T0 + 86400.0, bucket="hour")
            compare(got, reference(records, by, T0, T0 + 86400.0, "hour"))

    run(db, read)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for table in ("usage_hourly", "usage_daily"):
            [(rolled,)] = conn.execute(f"SELECT SUM(requests) FROM {table}").fetchall()
            assert rolled == len(records)


def insert_raw(dsn: str, records: list[UsageRecord]) -> None:
    """``records`` straight into ``usage_records`` (no rollup written), as an
    older release's rows lie there when a migration starts."""
    rows = [tuple(getattr(r, f) for f in _USAGE_FIELDS) for r in records]
    if is_postgres_dsn(dsn):
        import asyncpg

        async def insert() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                marks = ", ".join(f"${n}" for n in range(1, len(_USAGE_FIELDS) + 1))
                await conn.executemany(
                    f"INSERT INTO usage_records ({', '.join(_USAGE_FIELDS)}) VALUES ({marks})",
                    rows,
                )
            finally:
                await conn.close()

        asyncio.run(insert())
        return
    with contextlib.closing(sqlite3.connect(dsn)) as conn:
        marks = ", ".join("?" * len(_USAGE_FIELDS))
        conn.executemany(
            f"INSERT INTO usage_records ({', '.join(_USAGE_FIELDS)}) VALUES ({marks})", rows
        )
        conn.commit()


def test_rollups_answer_per_route_without_the_raw_rows(store_dsn: str) -> None:
    """A route is the model alias asked for: two routes reaching the same
    upstream model stay apart, and whole hours and days per route come from
    the rollups alone (the raw rows are deleted behind the store's back)."""
    rng = random.Random(10)
    records = random_records(rng, 600, 2 * 86400.0)

    async def write(store: Store) -> None:
        for r in records:
            store.record_usage(r)
        await store.flush()

    run(store_dsn, write)
    execute(store_dsn, "DELETE FROM usage_records")

    async def read(store: Store) -> None:
        for bucket in (None, "hour", "day"):
            got = await store.usage_summary("route", T0, T0 + 2 * 86400.0, bucket=bucket)
            compare(got, reference(records, "route", T0, T0 + 2 * 86400.0, bucket))
        assert {r.group for r in await store.usage_summary("route", T0)} == {"a1", "a2"}

    run(store_dsn, read)


def test_migration_10_rebuilds_the_rollups_per_route_and_keeps_pruned_totals(
    store_dsn: str,
) -> None:
    """Rollups written before routes were a dimension: the migration rebuilds
    them from the raw rows still kept (so their route is known) and keeps
    what the old rollups counted beyond those (raw rows retention deleted,
    here up to the middle of an hour) with no route. Every total per key,
    team, org, model and provider, per hour and day, is what it was."""
    rng = random.Random(11)
    span = 3 * 86400.0
    records = random_records(rng, 900, span)
    migrations = migrations_of(store_dsn)
    run(store_dsn, lambda store: store.flush(), migrations=migrations[:6])  # no rollups yet
    insert_raw(store_dsn, records)
    run(store_dsn, lambda store: store.flush(), migrations=migrations[:9])  # rollups, no route
    cutoff = T0 + 36 * HOUR + 1234.5  # retention reached the middle of an hour
    execute(store_dsn, f"DELETE FROM usage_records WHERE created_at < {cutoff}")
    kept = [r for r in records if r.created_at >= cutoff]
    pruned = [r for r in records if r.created_at < cutoff]
    assert kept and pruned
    # The route as the rollups can know it: the alias where a raw row was kept.
    routed = {id(r): r.model_alias if r.created_at >= cutoff else None for r in records}

    def per_route(bucket: str | None) -> dict[tuple[float | None, str | None], UsageSummary]:
        out: dict[tuple[float | None, str | None], UsageSummary] = {}
        for route in {routed[id(r)] for r in records}:
            part = [r for r in records if routed[id(r)] == route]
            for (start, _), s in reference(part, None, T0, T0 + span, bucket).items():
                s.group = route
                out[(start, route)] = s
        return out

    async def read(store: Store) -> None:
        for bucket in (None, "hour", "day"):
            for by in (None, "key", "team", "org", "model", "provider"):
                got = await store.usage_summary(by, T0, T0 + span, bucket=bucket)
                compare(got, reference(records, by, T0, T0 + span, bucket))
            got = await store.usage_summary("route", T0, T0 + span, bucket=bucket)
            compare(got, per_route(bucket))
        # After the migration, new records are rolled up per route as usual.
        late = UsageRecord("late", "k1", "o1", "a9", "m1", "p1", 1, 1, 2, 1.0, 200, T0 + span)
        store.record_usage(late)
        await store.flush()
        [row] = await store.usage_summary("route", T0 + span, T0 + span + HOUR)
        assert (row.group, row.requests) == ("a9", 1)

    run(store_dsn, read)
    for table in ("usage_hourly", "usage_daily"):
        rows = rollup_rows(store_dsn, f"SELECT SUM(requests), COUNT(*) FROM {table}")
        assert rows[0][0] == len(records) + 1


def rollup_rows(dsn: str, sql: str) -> list[tuple[object, ...]]:
    if is_postgres_dsn(dsn):
        import asyncpg

        async def fetch() -> list[tuple[object, ...]]:
            conn = await asyncpg.connect(dsn)
            try:
                return [tuple(r) for r in await conn.fetch(sql)]
            finally:
                await conn.close()

        return asyncio.run(fetch())
    with contextlib.closing(sqlite3.connect(dsn)) as conn:
        return conn.execute(sql).fetchall()


def test_spend_reads_the_same_without_the_raw_spend_indexes(store_dsn: str) -> None:
    """Migration 11 drops the raw rows' (scope, created_at, cost) indexes: a
    database written at version 10 reads the same spend after it as before,
    the plain sum of its records' costs, for every budget period's start (what
    the governors read back at start-up) and for starts inside an hour (the
    raw rows of that partial hour, now through the created_at index)."""
    rng = random.Random(11)
    records = random_records(rng, 600, 9 * 86400.0)
    now = T0 + 8.5 * 86400.0 + 17.0  # records before and after the day's start
    starts = [period_bounds(period, now)[0] for period in ("daily", "weekly", "monthly", "total")]
    starts += [T0 + 1.5, T0 + 86400.0 * 3 + 1234.5, now - 86400.0 - 59.0]
    scopes = [("key", "k1"), ("key", "k3"), ("team", "t1"), ("org", "o2"), ("org", "nobody")]
    column = {"key": "key_id", "team": "team_id", "org": "org_id"}
    want = {
        (kind, id, since): sum(
            r.cost_usd or 0.0
            for r in records
            if getattr(r, column[kind]) == id and r.created_at >= since
        )
        for kind, id in scopes
        for since in starts
    }
    assert any(value > 0 for value in want.values())
    read: list[dict[tuple[str, str, float], float]] = []

    async def spend(store: Store) -> None:
        read.append({k: await store.spend_since(*k) for k in want})

    async def write(store: Store) -> None:
        for r in records:
            store.record_usage(r)
        await store.flush()
        await spend(store)

    migrations = migrations_of(store_dsn)
    assert len(migrations) == 11
    run(store_dsn, write, migrations=migrations[:10], batch_size=64)
    raw_spend = "tablename = 'usage_records' AND indexname LIKE '%spend'"
    lite_spend = "type = 'index' AND tbl_name = 'usage_records' AND name LIKE '%spend'"
    count = (
        f"SELECT count(*) FROM pg_indexes WHERE {raw_spend}"
        if is_postgres_dsn(store_dsn)
        else f"SELECT count(*) FROM sqlite_master WHERE {lite_spend}"
    )
    assert rollup_rows(store_dsn, count) == [(3,)]
    run(store_dsn, spend)
    assert rollup_rows(store_dsn, count) == [(0,)]
    before, after = read
    assert after == before
    assert after == pytest.approx(want)


def test_a_failed_batch_leaves_nothing_behind_for_the_next(tmp_path: Path) -> None:
    """SQLite sums a batch in a temporary table before adding it into the
    rollups: a batch that fails after that (here: at the daily rollup) is
    rolled back whole, and the next batch adds only its own sums."""
    db = tmp_path / "g.db"
    run(db, lambda store: store.flush())
    execute(
        str(db),
        "CREATE TRIGGER poison BEFORE INSERT ON usage_daily WHEN NEW.key_id = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
    )

    def record(i: int, key: str) -> UsageRecord:
        return UsageRecord(f"r{i}", key, "o1", "a", "m", "p", 1, 2, 3, 1.0, 200, T0 + i,
                           cost_usd=0.5)  # fmt: skip

    async def test(store: Store) -> None:
        store.record_usage(record(0, "k1"))
        await store.flush()
        store.record_usage(record(1, "k1"))
        store.record_usage(record(2, "poison"))
        await store.flush()
        assert (store.usage_failed, store.usage_written) == (2, 1)
        store.record_usage(record(3, "k1"))
        await store.flush()
        assert (store.usage_failed, store.usage_written) == (2, 2)

    run(db, test)
    for table in ("usage_records", "usage_hourly", "usage_daily"):
        total = "COUNT(*)" if table == "usage_records" else "SUM(requests)"
        assert rollup_rows(str(db), f"SELECT {total}, TOTAL(cost_usd) FROM {table}") == [(2, 1.0)]


def test_paging_and_order(store_dsn: str) -> None:
    records = [
        UsageRecord(f"r{i}", f"k{i % 4}", "o", "a", "m", "p", 1, 1, 2, 1.0, 200,
                    T0 + i * 900.0, cost_usd=float(i % 4))
        for i in range(16)
    ]  # fmt: skip

    async def test(store: Store) -> None:
        for r in records:
            store.record_usage(r)
        await store.flush()
        everything = await store.usage_summary("key", T0)
        assert [r.group for r in everything] == ["k3", "k2", "k1", "k0"]  # costliest first
        page = await store.usage_summary("key", T0, limit=2, offset=1)
        assert [r.group for r in page] == ["k2", "k1"]
        days = await store.usage_summary(None, T0, bucket="hour")
        assert [r.bucket for r in days] == [T0, T0 + HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR]
        assert [r.requests for r in days] == [4, 4, 4, 4]
        with pytest.raises(ValueError, match="bucket"):
            await store.usage_summary("key", T0, bucket="week")
        with pytest.raises(ValueError, match="group"):
            await store.usage_summary("endpoint", T0)

    run(store_dsn, test)


def test_retention_deletes_old_raw_rows_in_bounded_passes_and_keeps_rollups(
    store_dsn: str,
) -> None:
    """Raw rows older than the retention go, at most ``batch`` per pass; the
    rollups (and so usage summaries of whole hours and budget spend) stay."""
    now = [T0 + 40 * 86400.0]
    records = [
        UsageRecord(f"r{i}", "k1", "o1", "a", "m", "p", 1, 1, 2, 1.0, 200,
                    T0 + i * 3600.0, team_id="t1", cost_usd=0.25)
        for i in range(24 * 40)  # one an hour for 40 days
    ]  # fmt: skip
    sleeps: list[float] = []

    async def never(delay: float) -> None:  # the background loop waits forever
        sleeps.append(delay)
        await asyncio.Event().wait()

    async def test(store: Store) -> None:
        for r in records:
            store.record_usage(r)
        await store.flush()
        cutoff = now[0] - 30 * 86400.0
        old = sum(r.created_at < cutoff for r in records)
        assert old == 240
        # the background loop waits a first interval before its first pass
        assert sleeps == [60.0]
        assert await store.prune_usage(100) == 100
        assert await store.prune_usage(100) == 100
        assert await store.prune_usage(100) == 40
        assert await store.prune_usage(100) == 0
        kept = await store.list_usage(10_000)
        assert len(kept) == len(records) - old
        assert min(r.created_at for r in kept) >= cutoff
        [total] = await store.usage_summary(None, 0.0)
        assert total.requests == len(records)  # whole hours: from the rollups
        assert await store.spend_since("key", "k1", T0) == pytest.approx(0.25 * len(records))
        assert await store.spend_since("team", "t1", T0 + 1) == pytest.approx(
            0.25 * (len(records) - 1)
        )
        assert await store.spend_since("org", "o1", T0 + 86400.0 + 1) == pytest.approx(
            0.25 * (len(records) - 25)
        )

    run(
        store_dsn,
        test,
        clock=lambda: now[0],
        usage_retention=30 * 86400.0,
        retention_sleep=never,
    )


def test_retention_off_keeps_everything(store_dsn: str) -> None:
    async def test(store: Store) -> None:
        store.record_usage(UsageRecord("r", "k", "o", "a", "m", "p", 1, 1, 2, 1.0, 200, 1.0))
        await store.flush()
        assert await store.prune_usage() == 0
        assert len(await store.list_usage()) == 1

    run(store_dsn, test, clock=lambda: T0)


def test_the_background_loop_prunes_a_backlog_in_short_steps(store_dsn: str) -> None:
    """Each pass deletes at most ``retention_batch``; a full pass is followed
    by a short pause, an incomplete one by the full interval."""
    now = [T0 + 10 * 86400.0]
    records = [
        UsageRecord(f"r{i}", "k1", "o1", "a", "m", "p", 1, 1, 2, 1.0, 200, T0 + i * 60.0)
        for i in range(250)
    ]
    sleeps: list[float] = []
    ticks: asyncio.Queue[None] = asyncio.Queue()
    slept = asyncio.Event()

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        slept.set()
        await ticks.get()

    async def one_pass() -> None:
        slept.clear()
        ticks.put_nowait(None)
        async with asyncio.timeout(5):
            await slept.wait()

    async def test(store: Store) -> None:
        for r in records:
            store.record_usage(r)
        await store.flush()
        async with asyncio.timeout(5):
            await slept.wait()
        for _ in range(3):
            await one_pass()
        assert sleeps == [60.0, 0.5, 0.5, 60.0]
        assert await store.list_usage() == []
        [total] = await store.usage_summary(None, T0, T0 + 86400.0)
        assert total.requests == 250

    run(
        store_dsn,
        test,
        clock=lambda: now[0],
        usage_retention=86400.0,
        retention_batch=100,
        retention_sleep=sleep,
    )


_SEED = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :rows - 1)
INSERT INTO usage_records (request_id, key_id, org_id, model_alias, target_model, provider,
    prompt_tokens, completion_tokens, total_tokens, latency_ms, status, created_at, team_id,
    cost_usd)
SELECT 'req-' || i, 'key-' || (i * 7919 % 50), 'org-' || (i % 3), 'r' || (i % 4), 'm' || (i % 6),
    'p' || (i % 3), i % 1000, i % 100, i % 1000 + i % 100, 1.0,
    CASE WHEN i % 50 = 0 THEN 502 ELSE 200 END, :start + i * :step, 'team-' || (i % 10),
    CASE WHEN i % 97 = 0 THEN NULL ELSE (i % 1000) / 1024.0 END
FROM n
"""
_RAW_BY_ROUTE = (
    "SELECT model_alias, COUNT(*) FROM usage_records "
    "WHERE created_at >= ? AND created_at < ? GROUP BY model_alias"
)
_RAW_BY_KEY = (
    "SELECT key_id, COUNT(*), SUM(status >= 400), SUM(prompt_tokens), SUM(completion_tokens), "
    "SUM(total_tokens), TOTAL(cost_usd), SUM(cost_usd IS NULL AND status < 400) "
    "FROM usage_records WHERE created_at >= ? AND created_at < ? GROUP BY key_id"
)


def test_a_hundred_thousand_rows_answer_from_the_rollups_as_the_raw_table_does(
    tmp_path: Path,
) -> None:
    """Scale without timing: 100,000 records over 30 days, backfilled by the
    migrations; a 30-day report per key or per route reads a few thousand
    daily rollup rows (the plan searches their primary key) and equals the
    raw table's GROUP BY."""
    db = tmp_path / "g.db"
    rows, span = 100_000, 30 * 86400.0
    run(db, lambda store: store.flush(), migrations=MIGRATIONS[:6])  # before rollups (migration 7)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(_SEED, {"rows": rows, "start": T0, "step": span / rows})
        conn.commit()
    since, until = T0 + 1234.5, T0 + span - 999.0  # both edges inside an hour

    async def read(store: Store) -> None:
        got = await store.usage_summary("key", since, until)
        routes = await store.usage_summary("route", since, until, bucket="day")
        with contextlib.closing(sqlite3.connect(db)) as conn:
            raw = {r[0]: r[1:] for r in conn.execute(_RAW_BY_KEY, (since, until))}
            raw_routes = dict(conn.execute(_RAW_BY_ROUTE, (since, until)).fetchall())
            plans = {
                by: " ".join(
                    r[3]
                    for r in conn.execute(
                        "EXPLAIN QUERY PLAN " + SUMMARY_SELECTS[(by, bucket)],
                        (*itertools.chain.from_iterable(split(since, until)), -1, 0),
                    )
                )
                for by, bucket in (("key", None), ("route", "day"))
            }
            [(daily,)] = conn.execute(
                "SELECT count(*) FROM usage_daily WHERE day >= ? AND day < ?", (since, until)
            ).fetchall()
        assert len(got) == len(raw) == 50
        for row in got:
            want = raw[row.group]
            assert (row.requests, row.errors, row.prompt_tokens, row.completion_tokens) == want[:4]
            assert row.total_tokens == want[4] and row.unpriced == want[6]
            assert row.cost_usd == pytest.approx(want[5], rel=1e-12)
        per_route: dict[str | None, int] = {}
        for row in routes:
            per_route[row.group] = per_route.get(row.group, 0) + row.requests
        assert per_route == raw_routes and len(raw_routes) == 4
        assert len({row.bucket for row in routes}) == 30  # a partial day at each end, 28 whole
        for plan in plans.values():
            assert "SEARCH usage_daily USING PRIMARY KEY (day>? AND day<?)" in plan, plan
            assert "SEARCH usage_hourly USING PRIMARY KEY (hour>? AND hour<?)" in plan, plan
        assert daily < 30 * 300 * 4  # days x groups x routes, against 100,000 raw rows

    run(db, read)
