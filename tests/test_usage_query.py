"""Usage summaries and spend per scope, from the store.

Records are written through the store's own writer; the summaries are
checked against sums computed here from the same records, per grouping, and
the spend query is checked to read a covering index (it stays cheap over
millions of rows: bench/usage_query.py measures it).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gandalf.domain import USAGE_GROUPS, ApiKey, Organization, Team, UsageRecord, UsageSummary
from gandalf.storage._rollups import SPEND_SELECTS, SUMMARY_SELECTS
from gandalf.storage.protocol import Store
from tests.stores import make_store


def run(db: Path | str, test: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        store = make_store(str(db))
        await store.open()
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


def record(
    n: int,
    *,
    key: str | None,
    team: str | None,
    org: str | None,
    model: str | None,
    provider: str | None,
    at: float,
    status: int = 200,
    cost: float | None = 0.5,
    alias: str = "alias",
) -> UsageRecord:
    return UsageRecord(
        f"req-{n}", key, org, alias, model, provider,
        10 * n, n, 11 * n, 5.0, status, at, "chat", 1, team,
        n % 3, n % 2, n % 5, cost,
    )  # fmt: skip


RECORDS = [
    record(1, key="k1", team="t1", org="o1", model="gpt-4o", provider="oa", at=100.0),
    record(2, key="k1", team="t1", org="o1", model="gpt-4o", provider="oa", at=200.0, cost=None),
    record(3, key="k2", team="t2", org="o1", model="claude", provider="an", at=300.0, cost=1.25),
    record(4, key="k2", team=None, org="o2", model="claude", provider="an", at=400.0, status=502,
           cost=None),
    record(5, key="k3", team=None, org="o2", model=None, provider=None, at=500.0, status=401,
           cost=None, alias="asked"),
    record(6, key="k1", team="t1", org="o1", model="gpt-4o", provider="oa", at=50.0),  # too old
]  # fmt: skip

COLUMNS = {
    "key": "key_id", "team": "team_id", "org": "org_id", "provider": "provider",
    "route": "model_alias",
}  # fmt: skip


def expected(by: str, since: float) -> dict[str | None, UsageSummary]:
    out: dict[str | None, UsageSummary] = {}
    for r in RECORDS:
        if r.created_at < since:
            continue
        group = (r.target_model or r.model_alias) if by == "model" else getattr(r, COLUMNS[by])
        s = out.setdefault(group, UsageSummary(group=group))
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


@pytest.mark.parametrize("by", USAGE_GROUPS)
def test_summary_sums_each_group_since(store_dsn: str, by: str) -> None:
    got: list[UsageSummary] = []

    async def test(store: Store) -> None:
        await store.create_org(Organization(id="o1", name="Acme"))
        await store.create_team(Team(id="t1", org_id="o1", name="Backend"))
        key = ApiKey(id="k1", name="svc", key_hash="a" * 64, prefix="gnd_abcd", org_id="o1")
        await store.create_key(key)
        for r in RECORDS:
            store.record_usage(r)
        await store.flush()
        got.extend(await store.usage_summary(by, since=100.0))

    run(store_dsn, test)
    want = expected(by, 100.0)
    assert {s.group for s in got} == set(want)
    costs = [s.cost_usd for s in got]
    assert costs == sorted(costs, reverse=True)  # costliest first
    names: dict[str, dict[str | None, tuple[str | None, str | None]]] = {
        "key": {"k1": ("svc", "gnd_abcd")},
        "team": {"t1": ("Backend", None)},
        "org": {"o1": ("Acme", None)},
    }
    for s in got:
        name, prefix = names.get(by, {}).get(s.group, (None, None))
        w = want[s.group]
        w.name, w.prefix = name, prefix
        assert s.cost_usd == pytest.approx(w.cost_usd)
        s.cost_usd = w.cost_usd
        assert s == w


def test_summary_until_and_unknown_grouping(store_dsn: str) -> None:
    async def test(store: Store) -> None:
        for r in RECORDS:
            store.record_usage(r)
        await store.flush()
        [only] = await store.usage_summary("org", since=100.0, until=300.0)
        assert (only.group, only.requests) == ("o1", 2)
        assert await store.usage_summary("model", since=1000.0) == []
        with pytest.raises(ValueError, match="cannot group usage by 'endpoint'"):
            await store.usage_summary("endpoint", since=0.0)

    run(store_dsn, test)


def test_spend_since_per_scope(store_dsn: str) -> None:
    async def test(store: Store) -> None:
        for r in RECORDS:
            store.record_usage(r)
        await store.flush()
        assert await store.spend_since("key", "k1", 100.0) == pytest.approx(0.5)
        assert await store.spend_since("key", "k1", 0.0) == pytest.approx(1.0)
        assert await store.spend_since("team", "t2", 0.0) == pytest.approx(1.25)
        assert await store.spend_since("org", "o1", 150.0) == pytest.approx(1.25)
        assert await store.spend_since("org", "o2", 0.0) == 0.0  # unpriced only
        assert await store.spend_since("org", "nobody", 0.0) == 0.0
        with pytest.raises(ValueError, match="unknown spend scope"):
            await store.spend_since("model", "gpt-4o", 0.0)

    run(store_dsn, test)


def test_queries_read_indexes(tmp_path: Path) -> None:
    """Spend reads the daily rollups' covering index (no table rows) and its
    partial first hour of raw rows through the created_at index (migration 11
    dropped the raw scope indexes); summaries read the time range through the
    created_at index, not the whole table."""
    db = tmp_path / "g.db"
    run(db, lambda store: store.flush())
    with sqlite3.connect(db) as conn:
        for kind, sql in SPEND_SELECTS.items():
            params = ("x", 0, 0, "x", 0, 0, "x", 0)
            plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert f"COVERING INDEX usage_daily_{kind}_spend" in plan, plan
            assert "SEARCH usage_records USING INDEX usage_records_created_at" in plan, plan
            assert "SEARCH usage_hourly USING PRIMARY KEY (hour>? AND hour<?)" in plan, plan
        for sql in SUMMARY_SELECTS.values():
            bounds = (0, 1, 0, 3600, 0, 86400, 0, 3600, 2, 3, -1, 0)
            plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, bounds))
            assert "USING INDEX usage_records_created_at" in plan, plan
            assert "SEARCH usage_hourly USING PRIMARY KEY (hour>? AND hour<?)" in plan, plan
            assert "SEARCH usage_daily USING PRIMARY KEY (day>? AND day<?)" in plan, plan


def test_summaries_in_total_per_bucket_and_by_page(store_dsn: str) -> None:
    """``by=None`` sums everything in one group; ``bucket`` sums per UTC hour or
    day (oldest first, its start in ``bucket``); ``limit``/``offset`` page."""
    day = 86400.0
    at = [10 * day, 10 * day + 3600, 10 * day + 3700, 11 * day + 1]
    records = [
        record(i + 1, key=f"k{i % 2}", team=None, org="o", model="m", provider="p", at=t)
        for i, t in enumerate(at)
    ]

    async def test(store: Store) -> None:
        for r in records:
            store.record_usage(r)
        await store.flush()
        [total] = await store.usage_summary(None, 0.0)
        assert (total.group, total.requests, total.bucket) == (None, 4, None)
        days = await store.usage_summary(None, 0.0, bucket="day")
        assert [(s.bucket, s.requests) for s in days] == [(10 * day, 3), (11 * day, 1)]
        hours = await store.usage_summary("key", 0.0, bucket="hour")
        assert [(s.bucket, s.group, s.requests) for s in hours] == [
            (10 * day, "k0", 1),
            (10 * day + 3600, "k0", 1),  # same cost as k1's: ties ordered by group
            (10 * day + 3600, "k1", 1),
            (11 * day, "k1", 1),
        ]
        page = await store.usage_summary("key", 0.0, bucket="hour", limit=2, offset=1)
        assert [(s.bucket, s.group) for s in page] == [
            (10 * day + 3600, "k0"),
            (10 * day + 3600, "k1"),
        ]
        assert await store.usage_summary("key", 0.0, 10 * day + 3600, bucket="day") != []
        with pytest.raises(ValueError, match="unknown bucket"):
            await store.usage_summary("key", 0.0, bucket="week")

    run(store_dsn, test)
