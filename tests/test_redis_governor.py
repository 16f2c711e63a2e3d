"""The shared governor (scaleout/governor.py) against a real Redis: its Lua
scripts keep the local governor's semantics (headers, 429 bodies, budgets
reserved then settled) across several governors, i.e. several instances.

Each test takes keys under a prefix of its own and deletes them afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gandalf.app.governance import Estimate, SharedGovernor
from gandalf.app.governor import Grant, LocalGovernor
from gandalf.app.pipeline import Pipeline
from gandalf.domain import Budget, Scope
from gandalf.errors import LimitsUnavailable, QuotaExceeded, RateLimited
from gandalf.scaleout.connection import RedisLink, connect
from gandalf.scaleout.governor import RedisGovernor, RedisTicket
from gandalf.scaleout.resp import ConnectionLost, PipelinedConnection, ReplyError
from tests.redis_server import OwnRedis
from tests.serve import free_port
from tests.services import redis_url


@pytest.fixture
def url() -> str:
    return redis_url()


@pytest.fixture
def prefix() -> str:
    return f"gtest:{uuid.uuid4().hex[:12]}:"


def _link(url: str, prefix: str, timeout: float = 0.5, retry: float = 1.0) -> RedisLink:
    return connect(url, timeout=timeout, pool_size=16, prefix=prefix, retry_interval=retry)


async def _clean(link: RedisLink) -> None:
    names = [n async for n in link.client.scan_iter(match=link.prefix + "*")]
    if names:
        await link.client.delete(*names)


@asynccontextmanager
async def governors(
    url: str, prefix: str, count: int = 1, *, open_: bool = True
) -> AsyncIterator[list[RedisGovernor]]:
    """``count`` governors on one prefix: as many instances sharing one Redis."""
    links = [_link(url, prefix) for _ in range(count)]
    govs = [RedisGovernor(link, fallback=LocalGovernor() if open_ else None) for link in links]
    for gov in govs:
        gov.start()
    try:
        yield govs
    finally:
        for gov in govs:
            await gov.close()
        await _clean(links[0])
        for link in links:
            await link.close()


def key(rpm: int = 0, tpm: int = 0, budget: Budget | None = None, id: str = "k1") -> Scope:
    return Scope(kind="key", id=id, rpm=rpm, tpm=tpm, budget=budget)


def run(main: Callable[[], Any]) -> Any:
    return asyncio.run(main())


def test_the_redis_governor_is_a_shared_governor_and_the_local_one_is_not() -> None:
    # The pipeline awaits only a shared governor: with the local one (no Redis)
    # ``local`` is True and the chat path calls the synchronous admit as before.
    class Sink:
        def record_usage(self, record: object) -> None: ...

    assert Pipeline(Sink(), governor=LocalGovernor()).local
    assert not isinstance(LocalGovernor(), SharedGovernor)
    assert issubclass(RedisGovernor, SharedGovernor)


def test_rpm_headers_and_refusal_match_the_local_governor(url: str, prefix: str) -> None:
    scopes = (key(rpm=3, tpm=1000),)

    async def main() -> None:
        local = LocalGovernor()
        async with governors(url, prefix) as (gov,):
            for _ in range(3):
                mine = local.admit(scopes, Estimate(tokens=10, usd=None))
                theirs = await gov.admit_shared(scopes, Estimate(tokens=10, usd=None))
                # The same header names and values (remaining, limit; reset to the ms).
                assert dict(theirs.headers).keys() == dict(mine.headers).keys()
                for name in (
                    b"x-ratelimit-limit-requests",
                    b"x-ratelimit-remaining-requests",
                    b"x-ratelimit-limit-tokens",
                    b"x-ratelimit-remaining-tokens",
                ):
                    assert dict(theirs.headers)[name] == dict(mine.headers)[name], name
            with pytest.raises(RateLimited) as local_refusal:
                local.admit(scopes, Estimate(tokens=10, usd=None))
            with pytest.raises(RateLimited) as shared_refusal:
                await gov.admit_shared(scopes, Estimate(tokens=10, usd=None))
            assert shared_refusal.value.message == local_refusal.value.message
            assert shared_refusal.value.type == "requests"
            assert shared_refusal.value.retry_after == local_refusal.value.retry_after == 20
            assert shared_refusal.value.body() == local_refusal.value.body()
            # The refusal carries the same x-ratelimit-* as the local one's.
            local_limits = _limits(local_refusal.value)
            shared_limits = _limits(shared_refusal.value)
            assert shared_limits.keys() == local_limits.keys()
            for name in (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests"):
                assert shared_limits[name] == local_limits[name], name
            assert shared_limits[b"x-ratelimit-remaining-requests"] == b"0"

    run(main)


def _limits(exc: RateLimited | QuotaExceeded) -> dict[bytes, bytes]:
    """The x-ratelimit-* headers a refusal answers with (each name once)."""
    pairs = [(n, v) for n, v in exc.headers() if n.startswith(b"x-ratelimit-")]
    assert len(pairs) == len(dict(pairs)), pairs
    return dict(pairs)


def test_a_budget_refusal_carries_the_rate_limits_headers_as_the_local_one_does(
    url: str, prefix: str
) -> None:
    scopes = (key(rpm=5, tpm=1000, budget=Budget(usd=1.0, period="total")),)

    async def main() -> None:
        local = LocalGovernor()
        # Another instance took from the buckets: the levels come from Redis.
        async with governors(url, prefix, 2) as (other, gov):
            local.admit(scopes, Estimate(tokens=100, usd=0.6))
            await other.admit_shared(scopes, Estimate(tokens=100, usd=0.6))
            with pytest.raises(QuotaExceeded) as local_refusal:
                local.admit(scopes, Estimate(tokens=100, usd=0.6))
            with pytest.raises(QuotaExceeded) as shared_refusal:
                await gov.admit_shared(scopes, Estimate(tokens=100, usd=0.6))
            mine, theirs = _limits(local_refusal.value), _limits(shared_refusal.value)
            assert theirs.keys() == mine.keys() and len(mine) == 6
            for name in (
                b"x-ratelimit-limit-requests",
                b"x-ratelimit-remaining-requests",
                b"x-ratelimit-limit-tokens",
                b"x-ratelimit-remaining-tokens",
            ):
                assert theirs[name] == mine[name], name
            assert theirs[b"x-ratelimit-remaining-requests"] == b"4"
            assert shared_refusal.value.headers()[-1] == (b"x-should-retry", b"false")

    run(main)


def test_a_request_larger_than_the_tpm_limit_is_refused_for_good(url: str, prefix: str) -> None:
    async def main() -> None:
        async with governors(url, prefix) as (gov,):
            with pytest.raises(RateLimited) as refusal:
                await gov.admit_shared((key(tpm=100),), Estimate(tokens=500, usd=None))
            assert refusal.value.retry_after is None
            assert "Request too large" in refusal.value.message
            # Nothing was taken: a request that fits still gets the whole bucket.
            ticket = await gov.admit_shared((key(tpm=100),), Estimate(tokens=100, usd=None))
            assert dict(ticket.headers)[b"x-ratelimit-remaining-tokens"] == b"0"

    run(main)


def test_concurrent_requests_on_two_instances_never_exceed_the_rpm(url: str, prefix: str) -> None:
    scopes = (key(rpm=10), Scope(kind="org", id="acme", rpm=1000))

    async def main() -> tuple[int, int]:
        async with governors(url, prefix, 2) as (a, b):

            async def one(gov: RedisGovernor) -> bool:
                try:
                    ticket = await gov.admit_shared(scopes, Estimate(tokens=1, usd=None))
                except RateLimited:
                    return False
                gov.settle(ticket, 1, None)
                return True

            results = await asyncio.gather(*(one(a if i % 2 else b) for i in range(60)))
            served = sum(results)
            refused = len(results) - served
            return served, refused

    served, refused = run(main)
    assert served == 10 and refused == 50


def test_tpm_is_settled_to_the_real_total_and_released_on_failure(url: str, prefix: str) -> None:
    scopes = (key(tpm=1000),)

    async def main() -> None:
        async with governors(url, prefix, 2) as (a, b):
            ticket = await a.admit_shared(scopes, Estimate(tokens=600, usd=None))
            assert dict(ticket.headers)[b"x-ratelimit-remaining-tokens"] == b"400"
            a.settle(ticket, 100, None)  # the answer was short: 500 come back
            a.settle(ticket, 100, None)  # once only
            assert await a.flush()
            ticket = await b.admit_shared(scopes, Estimate(tokens=600, usd=None))
            remaining = int(dict(ticket.headers)[b"x-ratelimit-remaining-tokens"])
            assert 300 <= remaining <= 301  # 1000 - 100 - 600, plus a few ms of refill
            b.release(ticket)
            assert await b.flush()
            ticket = await a.admit_shared(scopes, Estimate(tokens=1, usd=None))
            remaining = int(dict(ticket.headers)[b"x-ratelimit-remaining-tokens"])
            assert 899 <= remaining <= 901

    run(main)


def test_a_budget_that_fits_ten_serves_ten_across_two_instances(url: str, prefix: str) -> None:
    budget = Budget(usd=10.5, period="total")
    scopes = (key(budget=budget),)

    async def main() -> None:
        async with governors(url, prefix, 2) as (a, b):
            gate = asyncio.Event()

            async def one(gov: RedisGovernor) -> bool:
                try:
                    ticket = await gov.admit_shared(scopes, Estimate(tokens=10, usd=1.0))
                except QuotaExceeded:
                    return False
                await gate.wait()
                gov.settle(ticket, 10, 1.0)
                return True

            tasks = [asyncio.create_task(one(a if i % 2 else b)) for i in range(50)]
            while sum(t.done() for t in tasks) < 40:  # the 40 refusals come first
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            gate.set()
            served = sum(await asyncio.gather(*tasks))
            assert served == 10
            assert await a.flush() and await b.flush()
            with pytest.raises(QuotaExceeded) as refusal:
                await a.admit_shared(scopes, Estimate(tokens=10, usd=0.6))
            # The local governor's message, with the shared figures.
            assert "$10.0000 spent, $0.0000 reserved" in refusal.value.message
            assert "has $0.5000 left" in refusal.value.message
            ticket = await b.admit_shared(scopes, Estimate(tokens=10, usd=0.5))
            b.release(ticket)

    run(main)


def test_a_cheaper_answer_gives_back_the_rest_of_its_reservation(url: str, prefix: str) -> None:
    scopes = (key(budget=Budget(usd=2.0, period="daily")),)

    async def main() -> None:
        async with governors(url, prefix) as (gov,):
            ticket = await gov.admit_shared(scopes, Estimate(tokens=10, usd=1.5))
            with pytest.raises(QuotaExceeded):
                await gov.admit_shared(scopes, Estimate(tokens=10, usd=1.0))
            gov.settle(ticket, 10, 0.25)
            assert await gov.flush()
            await gov.admit_shared(scopes, Estimate(tokens=10, usd=1.75))

    run(main)


def test_spend_is_rebuilt_from_the_store_and_never_lowered(url: str, prefix: str) -> None:
    budget = Budget(usd=1.0, period="monthly")
    scopes = (key(budget=budget),)

    class Store:
        def __init__(self, spent: float) -> None:
            self.spent = spent

        async def spend_since(self, kind: str, id: str, since: float) -> float:
            return self.spent

    async def main() -> None:
        async with governors(url, prefix, 2) as (a, b):
            await a.rebuild(Store(0.75), [scopes[0]])
            await b.rebuild(Store(0.5), [scopes[0]])  # an older count: not lowered
            with pytest.raises(QuotaExceeded):
                await b.admit_shared(scopes, Estimate(tokens=1, usd=0.3))
            await b.admit_shared(scopes, Estimate(tokens=1, usd=0.25))

    run(main)


def test_a_changed_limit_applies_at_once_keeping_the_level_clamped(url: str, prefix: str) -> None:
    # As app/limits.py's Bucket.resize: the new capacity, the level kept (clamped).
    async def main() -> None:
        async with governors(url, prefix) as (gov,):
            ticket = await gov.admit_shared((key(rpm=5),), Estimate(tokens=1, usd=None))
            assert dict(ticket.headers)[b"x-ratelimit-remaining-requests"] == b"4"
            ticket = await gov.admit_shared((key(rpm=2),), Estimate(tokens=1, usd=None))
            assert dict(ticket.headers)[b"x-ratelimit-limit-requests"] == b"2"
            assert dict(ticket.headers)[b"x-ratelimit-remaining-requests"] == b"1"

    run(main)


# --------------------------------------------------------------------------- Redis down


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    with OwnRedis(tmp_path) as server:
        yield server


def test_redis_down_fails_open_to_local_limits_logs_once_and_recovers(
    own_redis: OwnRedis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    scopes = (key(rpm=100),)
    caplog.set_level(logging.WARNING, "gandalf.redis")

    async def main() -> None:
        link = _link(own_redis.url, prefix, timeout=0.3, retry=0.2)
        gov = RedisGovernor(link, fallback=LocalGovernor())
        gov.start()
        try:
            assert type(await gov.admit_shared(scopes, Estimate(1, None))) is RedisTicket
            own_redis.kill()
            loop = asyncio.get_running_loop()
            started = loop.time()
            tickets = [await gov.admit_shared(scopes, Estimate(1, None)) for _ in range(20)]
            assert loop.time() - started < 2.0  # bounded: no request waits on a dead Redis
            assert all(type(t) is Grant for t in tickets)  # the local governor's
            for ticket in tickets:
                gov.settle(ticket, 1, None)
            assert link.down
            own_redis.start()
            # Once retry_interval has passed, the next request finds Redis again.
            deadline = loop.time() + 10
            while type(await gov.admit_shared(scopes, Estimate(1, None))) is not RedisTicket:
                assert loop.time() < deadline, "Redis never used again"
                await asyncio.sleep(0.05)
            assert not link.down
        finally:
            await gov.close()
            await link.close()

    run(main)
    lines = [r.getMessage() for r in caplog.records if r.name == "gandalf.redis"]
    assert len([m for m in lines if "unreachable" in m]) == 1, lines
    assert len([m for m in lines if "answers again" in m]) == 1, lines


def test_redis_down_fails_closed_with_a_503_when_configured(prefix: str) -> None:
    async def main() -> None:
        link = _link(f"redis://127.0.0.1:{free_port()}/0", prefix, timeout=0.3)
        gov = RedisGovernor(link, fallback=None)
        try:
            for _ in range(3):
                with pytest.raises(LimitsUnavailable) as refusal:
                    await gov.admit_shared((key(rpm=5),), Estimate(1, None))
            assert refusal.value.status == 503
            assert refusal.value.code == "limits_unavailable"
            assert (b"retry-after", b"1") in refusal.value.headers()
            assert link.failures == 1  # later requests skipped the dead Redis
        finally:
            await gov.close()
            await link.close()

    run(main)


# ------------------------------------------------------------------ the pipelined connection


def test_the_pipelined_connection_answers_in_order_and_reloads_a_flushed_script(
    own_redis: OwnRedis, prefix: str
) -> None:
    async def main() -> None:
        fast = PipelinedConnection(own_redis.url.replace("/0", "/2"), timeout=1.0)
        link = _link(own_redis.url.replace("/0", "/2"), prefix)
        gov = RedisGovernor(link, fallback=None)
        try:
            replies = await asyncio.gather(
                *(fast.call("ECHO", f"n{i}") for i in range(200)), fast.call("SELECT", 2)
            )
            assert replies[:200] == [f"n{i}".encode() for i in range(200)]
            assert await fast.call("HSET", "h", "a", "1") == 1
            assert await fast.call("HGETALL", "h") == [b"a", b"1"]
            assert await fast.call("GET", "missing") is None
            with pytest.raises(ReplyError):
                await fast.call("HGETALL")  # wrong number of arguments
            await gov.admit_shared((key(rpm=5),), Estimate(1, None))
            await fast.call("SCRIPT", "FLUSH")  # this test's own server
            ticket = await gov.admit_shared((key(rpm=5),), Estimate(1, None))
            assert dict(ticket.headers)[b"x-ratelimit-remaining-requests"] == b"3"
        finally:
            await fast.close()
            await link.close()

    run(main)


def test_a_redis_that_never_answers_fails_the_call_within_the_timeout() -> None:
    async def main() -> float:
        done = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1 << 16)
            await done.wait()  # a hung server: never answers
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        fast = PipelinedConnection(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with pytest.raises(ConnectionLost):
                await fast.call("PING")
            return loop.time() - started
        finally:
            await fast.close()
            done.set()
            server.close()
            await server.wait_closed()

    assert run(main) < 1.0
