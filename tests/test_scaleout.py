"""Several instances behaving as one (issue 21): two ``gandalf serve``
processes sharing one database and one Redis.

(a) a key created through instance A's admin API works on B at once;
(b) revoked on A, it is refused on B within 1 s;
(c) an RPM limit of N holds across both under concurrent load on both;
(d) a budget that fits 10 requests serves at most 10 across both;
(e) a cache entry filled through A is a hit on B;
(f) killing Redis mid-run follows ``redis.on_error`` without a 500 (open:
    served under local limits; closed: 503 ``limits_unavailable``), and both
    recover when it is back. (f) runs a redis-server of its own.

The database is a parameter (:func:`database_dsn`): a fresh PostgreSQL
database whenever PostgreSQL is available (always in CI), else a SQLite file
shared by both processes (WAL); ``GANDALF_TEST_SCALEOUT_DSN`` names another.
(d) reads the recorded spend back from that database directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from gandalf.auth.apikey import generate_key
from tests.redis_server import OwnRedis
from tests.serve import GandalfServer, route, wait_until
from tests.services import postgres_wanted, redis_url
from tests.stores import postgres_database
from tests.upstream import MockUpstream, running_upstream

ADMIN = generate_key()
KEY_RPM = generate_key()  # rpm 5, on both instances together
KEY_BUDGET = generate_key()  # $10.50 in total: 10 requests of ~$1.00
KEY_CACHE = generate_key()
KEY_RESPONSES = generate_key()  # rpm 5 too, spent through /v1/responses only
CHAT = "/v1/chat/completions"
RPM = 5


@contextlib.contextmanager
def database_dsn(tmp: Path) -> Iterator[str]:
    """The database both instances share: ``GANDALF_TEST_SCALEOUT_DSN`` if set;
    else a new PostgreSQL database when PostgreSQL is available (dropped
    after); else a SQLite file in ``tmp``."""
    override = os.environ.get("GANDALF_TEST_SCALEOUT_DSN")
    if override:
        yield override
    elif postgres_wanted():
        with postgres_database() as dsn:
            yield dsn
    else:
        yield str(tmp / "shared.db")


def _is_postgres(dsn: str) -> bool:
    return dsn.startswith(("postgresql://", "postgres://"))


def _config(dsn: str, redis: dict[str, Any], mock: MockUpstream) -> dict[str, Any]:
    return {
        "database": {"dsn": dsn},
        "redis": redis,
        "auth": {"admin_key": ADMIN},
        "providers": [
            {"name": "fake", "type": "fake", "models": ["fake-model"]},
            {"name": "up", "type": "openai", "base_url": mock.base_url, "api_key": "sk-up"},
        ],
        "routes": [
            route("up-gate", "up", "gate"),
            {**route("cached", "fake", "fake-model"), "cache": True},
        ],
        "keys": [
            {"name": "rpm", "key": KEY_RPM, "role": "member", "rpm": RPM},
            {
                "name": "budget",
                "key": KEY_BUDGET,
                "role": "member",
                "budget": {"usd": 10.5, "period": "total"},
            },
            {"name": "cache", "key": KEY_CACHE, "role": "member"},
            {"name": "responses", "key": KEY_RESPONSES, "role": "member", "rpm": RPM},
        ],
        "pricing": [
            {"provider": "up", "model": "gate", "input": 1000, "output": 1000},
            {"provider": "fake", "model": "fake-model", "input": 1000, "output": 1000},
        ],
    }


class Pair:
    def __init__(self, a: GandalfServer, b: GandalfServer, mock: MockUpstream, dsn: str) -> None:
        self.a, self.b, self.mock, self.dsn = a, b, mock, dsn


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    url = redis_url()
    tmp = tmp_path_factory.mktemp("scaleout")
    redis = {"url": url, "prefix": f"gtest:{uuid.uuid4().hex[:12]}:"}
    with database_dsn(tmp) as dsn, running_upstream() as mock:
        config = _config(dsn, redis, mock)
        # One after the other: the second finds the schema and the seeded keys.
        with GandalfServer(tmp, config, name="a") as a, GandalfServer(tmp, config, name="b") as b:
            yield Pair(a, b, mock, dsn)
    _drop_prefix(url, redis["prefix"])


def _drop_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        names = list(client.scan_iter(match=prefix + "*"))
        if names:
            client.delete(*names)
    finally:
        client.close()


def _chat(model: str = "fake-model", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def _post(server: GandalfServer, key: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(server.url + CHAT, json=body, headers=headers, timeout=30.0)


# --------------------------------------------------------------------------- (a) (b)


def test_a_key_made_on_a_works_on_b_at_once_and_its_revocation_within_a_second(
    pair: Pair,
) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    made = httpx.post(
        pair.a.url + "/admin/v1/keys", json={"name": "roaming"}, headers=admin, timeout=10.0
    )
    assert made.status_code == 201, made.text
    key, key_id = made.json()["key"], made.json()["id"]
    assert _post(pair.b, key, _chat()).status_code == 200  # (a): at once, no wait
    assert _post(pair.b, key, _chat()).status_code == 200  # now in B's key cache
    revoked = httpx.delete(f"{pair.a.url}/admin/v1/keys/{key_id}", headers=admin, timeout=10.0)
    assert revoked.status_code == 200
    started = time.monotonic()
    statuses: list[int] = []

    def refused() -> bool:
        statuses.append(_post(pair.b, key, _chat()).status_code)
        return statuses[-1] == 401

    wait_until(refused, 5, "instance B to refuse the key revoked on A")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"B refused it only after {elapsed:.2f}s"  # (b)
    assert set(statuses) <= {200, 401}


# --------------------------------------------------------------------------- (c)


async def _burst(
    servers: list[GandalfServer], key: str, count: int, body: dict[str, Any]
) -> list[httpx.Response]:
    """``count`` concurrent requests, alternating between ``servers``."""
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(servers[i % len(servers)].url + CHAT, json=body, headers=headers)
                    for i in range(count)
                )
            )
        )


def test_an_rpm_limit_holds_across_both_instances(pair: Pair) -> None:
    started = time.monotonic()
    replies = asyncio.run(_burst([pair.a, pair.b], KEY_RPM, 24, _chat()))
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429}, statuses
    # A bucket of 5 refills one request every 12 s: while the burst lasts, at most
    # 5 (plus what refilled meanwhile) are served in total, by both together.
    assert 1 <= statuses.count(200) <= RPM + int(elapsed / 12), statuses
    refused = [r for r in replies if r.status_code == 429]
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limit_exceeded"}
    assert all(r.headers["x-ratelimit-limit-requests"] == str(RPM) for r in replies if r.is_success)
    assert all("retry-after" in r.headers for r in refused)


def test_the_responses_api_draws_on_the_same_shared_bucket(pair: Pair) -> None:
    """/v1/responses goes through the shared governor as chat does: a key's rpm
    holds across both instances there too (its admission once used the worker's
    own governor, which with ``redis:`` set is not the shared bucket)."""
    statuses = []
    for i in range(2 * RPM):
        server = (pair.a, pair.b)[i % 2]
        reply = httpx.post(
            server.url + "/v1/responses",
            json={"model": "fake-model", "input": "hi", "store": False},
            headers={"authorization": f"Bearer {KEY_RESPONSES}"},
            timeout=30.0,
        )
        statuses.append(reply.status_code)
        if reply.is_success:
            assert reply.headers["x-ratelimit-limit-requests"] == str(RPM)
    # Sequential and quick: a bucket of 5 refills one request every 12 s.
    assert statuses.count(200) in (RPM, RPM + 1), statuses
    assert set(statuses) == {200, 429}, statuses


# --------------------------------------------------------------------------- (d)


async def _race(pair: Pair, count: int) -> list[httpx.Response]:
    """``count`` concurrent requests on the gated model across both; the gate
    opens once every request either reached the upstream or was refused."""
    body = _chat("up-gate", max_tokens=1000)
    headers = {"authorization": f"Bearer {KEY_BUDGET}"}
    limits = httpx.Limits(max_connections=count)
    mock = pair.mock
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        tasks = [
            asyncio.create_task(
                client.post((pair.a, pair.b)[i % 2].url + CHAT, json=body, headers=headers)
            )
            for i in range(count)
        ]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        while sum(t.done() for t in tasks) + mock.waiting < count:
            assert loop.time() < deadline, "requests neither refused nor at the upstream"
            await asyncio.wait(tasks, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
        mock.open_gate()
        return list(await asyncio.gather(*tasks))


_SPEND: Final = (
    "SELECT count(*), coalesce(sum(u.cost_usd), 0) FROM usage_records u "
    "JOIN api_keys k ON k.id = u.key_id WHERE k.name = {} AND u.status = 200"
)


def _spend(dsn: str, key_name: str) -> tuple[int, float]:
    """(requests served, USD recorded) for the key ``key_name``, read from
    the shared database itself (PostgreSQL or the SQLite file)."""
    if _is_postgres(dsn):
        return asyncio.run(_pg_spend(dsn, key_name))
    with contextlib.closing(sqlite3.connect(dsn)) as conn:
        row = conn.execute(_SPEND.format("?"), (key_name,)).fetchone()
    return int(row[0]), float(row[1])


async def _pg_spend(dsn: str, key_name: str) -> tuple[int, float]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await conn.fetchrow(_SPEND.format("$1"), key_name)
    finally:
        await conn.close()
    assert row is not None
    return int(row[0]), float(row[1])


def test_a_budget_that_fits_ten_serves_at_most_ten_across_both(pair: Pair) -> None:
    replies = asyncio.run(_race(pair, 30))
    served = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(served) + len(refused) == 30, [r.status_code for r in replies]
    assert 1 <= len(served) <= 10
    assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
    # The usage rows agree, read from the shared database directly.
    wait_until(lambda: _spend(pair.dsn, "budget")[0] == len(served), 10, "usage rows")
    assert _spend(pair.dsn, "budget")[1] <= 10.5


# --------------------------------------------------------------------------- (e)


def test_a_cache_entry_filled_through_a_is_a_hit_on_b(pair: Pair) -> None:
    body = _chat("cached", temperature=0, messages=[{"role": "user", "content": uuid.uuid4().hex}])
    first = _post(pair.a, KEY_CACHE, body)
    assert first.status_code == 200 and first.headers["x-gandalf-cache"] == "miss"
    second = _post(pair.b, KEY_CACHE, body)
    assert second.status_code == 200 and second.headers["x-gandalf-cache"] == "hit"
    assert second.json() == first.json()
    # A purge on B empties it for A too.
    purged = httpx.post(
        pair.b.url + "/admin/v1/cache/purge",
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=10.0,
    )
    assert purged.status_code == 200, purged.text
    assert _post(pair.a, KEY_CACHE, body).headers["x-gandalf-cache"] == "miss"


# --------------------------------------------------------------------------- (f)


def test_killing_redis_follows_the_policy_without_a_500_and_both_recover(tmp_path: Path) -> None:
    with (
        database_dsn(tmp_path) as dsn,
        OwnRedis(tmp_path) as own,
        running_upstream() as mock,
    ):
        opened = _config(dsn, {"url": own.url, "timeout": "200ms", "retry_interval": "200ms"}, mock)
        closed = {**opened, "redis": {**opened["redis"], "on_error": "closed"}}
        with (
            GandalfServer(tmp_path, opened, name="open") as a,
            GandalfServer(tmp_path, closed, name="closed") as b,
        ):
            body = _chat("cached", temperature=0)
            assert _post(a, KEY_RPM, _chat()).status_code == 200
            assert _post(b, KEY_CACHE, body).status_code == 200
            own.kill()
            # open: served under this instance's own limits (rpm 5 locally); the
            # first request already shared one of the 5 in Redis, not locally.
            statuses = [_post(a, KEY_RPM, _chat()).status_code for _ in range(7)]
            assert statuses == [200] * 5 + [429] * 2, statuses
            # closed: a limited caller gets the 503 in the contract's shape ...
            refused = _post(b, KEY_RPM, _chat())
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "limits_unavailable"
            assert refused.json()["error"]["type"] == "service_unavailable"
            assert refused.headers["retry-after"] == "1"
            # ... and an unlimited one is served; the cache misses instead of failing.
            cached = _post(b, KEY_CACHE, body)
            assert cached.status_code == 200 and cached.headers["x-gandalf-cache"] == "miss"
            own.start()
            wait_until(lambda: _post(b, KEY_RPM, _chat()).status_code == 200, 10, "B served again")
            wait_until(lambda: "Redis answers again" in a.stderr(), 10, "A to find Redis again")
            for server in (a, b):
                assert server.process is not None and server.process.poll() is None
                log = server.stderr()
                assert "Traceback" not in log
                assert log.count("Redis is unreachable") == 1, log
                assert "Redis answers again" in log
