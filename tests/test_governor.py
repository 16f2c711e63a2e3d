"""Rate limits, budgets and the Governor that combines them (issue 14 parts 4-6).

Driven with injected clocks (a list holding the time): no sleeps, no timers.
"""

from __future__ import annotations

import asyncio
import math
import random
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import orjson
import pytest

from gandalf.app.budget import Budgets, period_bounds
from gandalf.app.governance import Estimate, Governor
from gandalf.app.governor import (
    DEFAULT_OUTPUT_ALLOWANCE,
    ENV_WORKERS,
    LocalGovernor,
    share_from_env,
    worst_case,
)
from gandalf.app.limits import format_duration, share_of
from gandalf.domain import BUDGET_PERIODS, Budget, Identity, Scope
from gandalf.errors import QuotaExceeded, RateLimited
from gandalf.server.core import ServerCore
from gandalf.server.handlers import Endpoint
from gandalf.server.native import ERROR_BODIES, openai_error

NO_RETRY = (b"x-should-retry", b"false")


class Clock:
    """A settable clock: ``clock()`` reads it, ``clock.t += 1.5`` moves it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def governor(share: int = 1, wall: float | None = None) -> tuple[LocalGovernor, Clock, Clock]:
    mono, day = Clock(), Clock(ts(2026, 12, 2, 12) if wall is None else wall)
    return LocalGovernor(share=share, monotonic=mono, wall=day), mono, day


def key(rpm: int = 0, tpm: int = 0, budget: Budget | None = None, id: str = "k1") -> Scope:
    return Scope(kind="key", id=id, rpm=rpm, tpm=tpm, budget=budget)


def est(tokens: int = 10, usd: float | None = None) -> Estimate:
    return Estimate(tokens=tokens, usd=usd)


def caller(*scopes: Scope) -> Identity:
    """An identity limited by ``scopes`` (what LocalGovernor.govern reads)."""
    return Identity(
        key_id="k1", key_hash="h", name="k1", org_id="o", team_id=None, role="member",
        permissions=0, allowed_models=None, expires_at=None, scopes=scopes,
        budgeted=any(scope.budget is not None for scope in scopes),
    )  # fmt: skip


# The route a request is on: LocalGovernor.govern hands it to the price hook only.
ENTRY: Any = object()


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = [v for n, v in headers if n == name]
    assert len(found) <= 1
    return found[0] if found else None


def test_local_governor_is_a_governor() -> None:
    gov: Governor = LocalGovernor()  # mypy checks the protocol here
    ticket = gov.admit((), est())
    assert ticket.headers == []
    gov.settle(ticket, 5, None)


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-3, "0s"),
        (0.02, "20ms"),
        (0.0001, "1ms"),  # rounded up: waiting this long is enough
        (0.999, "999ms"),
        (0.9999, "1s"),
        (1, "1s"),
        (2.5, "2.5s"),
        (8.64, "8.64s"),
        (59.9999, "1m0s"),
        (60, "1m0s"),
        (90, "1m30s"),
        (90.25, "1m30.25s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_reset_is_written_as_openai_writes_it(seconds: float, text: str) -> None:
    # OpenAI's reset headers are Go durations (its Go SDK parses them with
    # time.ParseDuration): 1s, 6m0s, 20ms.
    assert format_duration(seconds) == text.encode()


# ------------------------------------------------------------------ rate limits


def test_rpm_bucket_refills_from_the_clock() -> None:
    gov, mono, _ = governor()
    scopes = (key(rpm=60),)
    for _ in range(60):
        gov.admit(scopes, est())
    with pytest.raises(RateLimited) as info:
        gov.admit(scopes, est())
    exc = info.value
    assert exc.status == 429 and exc.code == "rate_limit_exceeded" and exc.type == "requests"
    assert "key 'k1'" in exc.message and "Limit 60" in exc.message
    assert exc.retry_after == 1
    assert (b"retry-after", b"1") in exc.headers()
    body = orjson.loads(exc.body())["error"]
    assert body["type"] == "requests" and body["code"] == "rate_limit_exceeded"
    mono.t += 0.5  # half a request refilled: still refused
    with pytest.raises(RateLimited):
        gov.admit(scopes, est())
    mono.t += 0.5
    gov.admit(scopes, est())
    with pytest.raises(RateLimited):
        gov.admit(scopes, est())


def test_retry_after_is_the_time_until_the_request_fits() -> None:
    gov, mono, _ = governor()
    scopes = (key(rpm=6),)  # one request every 10 s
    for _ in range(6):
        gov.admit(scopes, est())
    with pytest.raises(RateLimited) as info:
        gov.admit(scopes, est())
    assert info.value.retry_after == 10
    mono.t += 7.5
    with pytest.raises(RateLimited) as info:
        gov.admit(scopes, est())
    assert info.value.retry_after == 3  # 2.5 s rounded up


def test_a_request_must_fit_every_level_and_a_refusal_takes_nothing() -> None:
    gov, _, _ = governor()
    team = Scope(kind="team", id="backend", rpm=100)
    org = Scope(kind="org", id="acme", rpm=3)
    scopes = (key(rpm=10), team, org)
    for _ in range(3):
        gov.admit(scopes, est())
    with pytest.raises(RateLimited) as info:
        gov.admit(scopes, est())
    assert "organization 'acme'" in info.value.message and "Limit 3" in info.value.message
    # The key and the team were not charged for the refused request.
    rates = gov.limits.check((key(rpm=10), team), 1, gov.limits.clock())
    assert [r.rpm.level for r in rates if r.rpm] == [7.0, 97.0]


def test_a_budget_refusal_takes_no_rate() -> None:
    gov, _, _ = governor()
    scopes = (key(rpm=10, tpm=1000, budget=Budget(usd=1.0, period="total")),)
    with pytest.raises(QuotaExceeded):
        gov.admit(scopes, est(100, usd=2.0))
    rate = gov.limits.rate(scopes[0], gov.limits.clock())
    assert rate is not None and rate.rpm is not None and rate.tpm is not None
    assert (rate.rpm.level, rate.tpm.level) == (10.0, 1000.0)


def _ratelimits(exc: RateLimited | QuotaExceeded) -> dict[bytes, bytes]:
    """The x-ratelimit-* headers a refusal answers with (each name once)."""
    pairs = [(n, v) for n, v in exc.headers() if n.startswith(b"x-ratelimit-")]
    assert len(pairs) == len(dict(pairs)), pairs
    return dict(pairs)


def test_a_rate_limit_refusal_carries_the_tightest_levels_headers() -> None:
    # A refusal is a model call's answer too: OpenAI's 429s carry x-ratelimit-*.
    # Every admission path: a key's rpm alone and tpm alone (govern's own
    # paths) and several levels (admit's general path).
    gov, mono, _ = governor()
    rpm = caller(key(rpm=2, id="r"))
    for _ in range(2):
        gov.govern(rpm, ENTRY, b"", None)
    mono.t += 3.0  # a tenth of a request refilled: still none whole
    with pytest.raises(RateLimited) as info:
        gov.govern(rpm, ENTRY, b"", None)
    assert info.value.headers()[0] == (b"retry-after", b"27")
    assert _ratelimits(info.value) == {
        b"x-ratelimit-limit-requests": b"2",
        b"x-ratelimit-remaining-requests": b"0",
        b"x-ratelimit-reset-requests": b"57s",
    }

    tpm = caller(key(tpm=600, id="t"))
    gov.govern(tpm, ENTRY, b"x" * 400, 400)  # 500 of 600 tokens
    with pytest.raises(RateLimited) as info:
        gov.govern(tpm, ENTRY, b"x" * 400, 400)
    assert _ratelimits(info.value) == {
        b"x-ratelimit-limit-tokens": b"600",
        b"x-ratelimit-remaining-tokens": b"100",
        b"x-ratelimit-reset-tokens": b"50s",
    }

    # The org refuses (1 left of 3) while the key has 9 of 10 left: the headers
    # are the tightest level's per dimension, as on an answer, and the tokens'
    # are there too; nothing was taken for the refused request.
    org = Scope(kind="org", id="acme", rpm=3, tpm=1000)
    scopes = (key(rpm=10, id="k"), org)
    for _ in range(3):
        gov.admit(scopes, est(10))
    with pytest.raises(RateLimited) as info:
        gov.admit(scopes, est(10))
    limits = _ratelimits(info.value)
    assert limits[b"x-ratelimit-limit-requests"] == b"3"
    assert limits[b"x-ratelimit-remaining-requests"] == b"0"
    assert limits[b"x-ratelimit-limit-tokens"] == b"1000"
    assert limits[b"x-ratelimit-remaining-tokens"] == b"970"


def test_a_budget_refusal_carries_the_rate_limits_headers_when_there_are_some() -> None:
    gov, mono, _ = governor()
    spent = Budget(usd=1.0, period="total")
    scopes = (key(rpm=10, tpm=1000, budget=spent),)
    gov.admit(scopes, est(100))
    mono.t += 3.0  # the buckets as they stand at the refusal: half refilled
    with pytest.raises(QuotaExceeded) as info:
        gov.admit(scopes, est(100, usd=2.0))
    assert _ratelimits(info.value) == {
        b"x-ratelimit-limit-requests": b"10",
        b"x-ratelimit-remaining-requests": b"9",
        b"x-ratelimit-reset-requests": b"3s",
        b"x-ratelimit-limit-tokens": b"1000",
        b"x-ratelimit-remaining-tokens": b"950",
        b"x-ratelimit-reset-tokens": b"3s",
    }
    assert info.value.headers()[-1] == NO_RETRY
    # A budget alone (govern's own path) has no rate limit to show.
    alone = caller(key(budget=spent, id="b"))
    gov.price = lambda entry, tokens_in, tokens_out: 2.0  # over the whole budget
    with pytest.raises(QuotaExceeded) as info:
        gov.govern(alone, ENTRY, b"", None)
    assert info.value.headers() == (NO_RETRY,)


def test_the_level_that_waits_longest_is_named() -> None:
    gov, _, _ = governor()
    scopes = (key(rpm=1), Scope(kind="org", id="acme", rpm=600))
    gov.admit(scopes, est())
    with pytest.raises(RateLimited) as info:
        gov.admit(scopes, est())
    assert "key 'k1'" in info.value.message and info.value.retry_after == 60


def test_tpm_charges_the_estimate_then_the_real_total() -> None:
    gov, mono, _ = governor()
    scopes = (key(tpm=600),)  # 10 tokens a second
    ticket = gov.admit(scopes, est(100))
    assert header(ticket.headers, b"x-ratelimit-remaining-tokens") == b"500"
    gov.settle(ticket, 40, None)  # used less: 60 refunded
    rate = gov.limits.rate(scopes[0], mono())
    assert rate is not None and rate.tpm is not None and rate.tpm.level == 560
    ticket = gov.admit(scopes, est(100))
    gov.settle(ticket, 1100, None)  # used more than was left: below zero
    assert rate.tpm.level == 560 - 1100
    with pytest.raises(RateLimited) as info:
        gov.admit(scopes, est(100))
    assert info.value.type == "tokens"
    assert info.value.retry_after == 64  # (100 + 540) / 10
    mono.t += 64
    gov.admit(scopes, est(100))


def test_settle_and_release_happen_once() -> None:
    gov, _, _ = governor()
    scopes = (key(tpm=600, budget=Budget(usd=1.0, period="total")),)
    ticket = gov.admit(scopes, est(100, usd=0.5))
    gov.settle(ticket, 100, 0.25)
    gov.settle(ticket, 100, 0.25)
    gov.release(ticket)
    spend = gov.budgets.spend(scopes[0], gov.budgets.clock())
    assert spend is not None and (spend.spent, spend.reserved) == (0.25, 0.0)
    rate = gov.limits.rate(scopes[0], gov.limits.clock())
    assert rate is not None and rate.tpm is not None and rate.tpm.level == 500


def test_release_gives_the_tokens_back_but_the_request_counts() -> None:
    gov, _, _ = governor()
    scopes = (key(rpm=10, tpm=600),)
    gov.release(gov.admit(scopes, est(100)))
    rate = gov.limits.rate(scopes[0], gov.limits.clock())
    assert rate is not None and rate.rpm is not None and rate.tpm is not None
    assert (rate.rpm.level, rate.tpm.level) == (9.0, 600.0)


def test_a_request_larger_than_the_tpm_limit_is_refused_for_good() -> None:
    gov, _, _ = governor()
    with pytest.raises(RateLimited) as info:
        gov.admit((key(tpm=1000),), est(2000))
    exc = info.value
    # OpenAI's answer: 429 "Request too large ... Limit X, Requested Y"; waiting
    # cannot help, so no retry-after and x-should-retry: false.
    assert exc.status == 429 and exc.type == "tokens" and exc.retry_after is None
    assert "Request too large" in exc.message and "Limit 1000, Requested 2000" in exc.message
    headers = exc.headers()
    assert NO_RETRY in headers and all(n != b"retry-after" for n, _ in headers)


def test_headers_come_from_the_tightest_level_per_dimension() -> None:
    gov, _, _ = governor()
    scopes = (
        key(rpm=100, tpm=1000),
        Scope(kind="team", id="t", rpm=10),  # requests: 9/10 left is tighter than 99/100
        Scope(kind="org", id="o", tpm=100_000),  # tokens: 900/1000 is tighter
    )
    ticket = gov.admit(scopes, est(100))
    assert ticket.headers == [
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-ratelimit-remaining-requests", b"9"),
        (b"x-ratelimit-reset-requests", b"6s"),
        (b"x-ratelimit-limit-tokens", b"1000"),
        (b"x-ratelimit-remaining-tokens", b"900"),
        (b"x-ratelimit-reset-tokens", b"6s"),
    ]


def test_only_limited_dimensions_get_headers() -> None:
    gov, _, _ = governor()
    ticket = gov.admit((key(rpm=5),), est(100))
    assert [n for n, _ in ticket.headers] == [
        b"x-ratelimit-limit-requests",
        b"x-ratelimit-remaining-requests",
        b"x-ratelimit-reset-requests",
    ]
    only_budget = (key(budget=Budget(usd=1.0)),)
    assert gov.admit(only_budget, est(100, usd=0.1)).headers == []


def test_a_changed_limit_applies_to_the_existing_bucket() -> None:
    gov, _, _ = governor()
    gov.admit((key(rpm=10),), est())
    ticket = gov.admit((key(rpm=2),), est())  # lowered: level clamped to 2, then 1 taken
    assert header(ticket.headers, b"x-ratelimit-remaining-requests") == b"1"
    gov.admit((key(rpm=2),), est())
    with pytest.raises(RateLimited):
        gov.admit((key(rpm=2),), est())


def test_concurrent_requests_never_exceed_the_rpm() -> None:
    async def main() -> int:
        gov, _, _ = governor()
        scopes = (key(rpm=10),)
        gate = asyncio.Event()
        served = 0

        async def one() -> None:
            nonlocal served
            try:
                ticket = gov.admit(scopes, est())
            except RateLimited:
                return
            await gate.wait()
            gov.settle(ticket, 10, None)
            served += 1

        tasks = [asyncio.create_task(one()) for _ in range(50)]
        gate.set()
        await asyncio.gather(*tasks)
        return served

    assert asyncio.run(main()) == 10


# ------------------------------------------------------------------ budgets


def test_period_bounds_are_utc_calendar_periods() -> None:
    now = ts(2026, 12, 2, 15, 30)  # a Wednesday
    assert period_bounds("daily", now) == (ts(2026, 12, 2), ts(2026, 12, 3))
    assert period_bounds("weekly", now) == (ts(2026, 11, 30), ts(2026, 12, 7))  # Monday
    assert period_bounds("weekly", ts(2026, 11, 30)) == (ts(2026, 11, 30), ts(2026, 12, 7))
    assert period_bounds("weekly", ts(2026, 11, 29, 23, 59)) == (ts(2026, 11, 23), ts(2026, 11, 30))
    assert period_bounds("monthly", now) == (ts(2026, 12, 1), ts(2027, 1, 1))
    assert period_bounds("monthly", ts(2026, 2, 28, 23)) == (ts(2026, 2, 1), ts(2026, 3, 1))
    start, end = period_bounds("total", now)
    assert start == 0.0 and end == float("inf")
    for period in BUDGET_PERIODS:
        period_bounds(period, now)  # every period the domain allows is known
    with pytest.raises(ValueError, match="fortnightly"):
        period_bounds("fortnightly", now)


def test_budget_exhausted_is_insufficient_quota_and_final() -> None:
    gov, _, _ = governor()
    team = Scope(kind="team", id="backend", budget=Budget(usd=1.0, period="daily"))
    scopes = (key(), team)
    gov.settle(gov.admit(scopes, est(usd=0.6)), 10, 0.6)
    with pytest.raises(QuotaExceeded) as info:
        gov.admit(scopes, est(usd=0.5))  # 0.6 + 0.5 > 1
    exc = info.value
    assert exc.status == 429 and exc.type == exc.code == "insufficient_quota"
    assert NO_RETRY in exc.headers() and exc.final
    assert "team 'backend'" in exc.message and "$1.00" in exc.message
    assert "daily" in exc.message and "$0.4000 left" in exc.message
    assert "up to $0.5000" in exc.message
    body = orjson.loads(exc.body())["error"]
    assert body["type"] == body["code"] == "insufficient_quota"
    gov.admit(scopes, est(usd=0.4))  # fits exactly


def test_unpriced_requests_reserve_nothing_but_stop_when_spent() -> None:
    gov, _, _ = governor()
    scopes = (key(budget=Budget(usd=1.0, period="total")),)
    tickets = [gov.admit(scopes, est(usd=None)) for _ in range(3)]
    gov.settle(tickets[0], 10, 1.0)  # the budget is now spent
    with pytest.raises(QuotaExceeded, match="is used up"):
        gov.admit(scopes, est(usd=None))


def test_reservations_block_and_settle_or_release_free_them() -> None:
    gov, _, _ = governor()
    scopes = (key(budget=Budget(usd=1.0, period="total")),)
    first = gov.admit(scopes, est(usd=0.7))
    with pytest.raises(QuotaExceeded):
        gov.admit(scopes, est(usd=0.7))  # 0.7 reserved + 0.7 > 1
    gov.release(first)
    second = gov.admit(scopes, est(usd=0.7))
    gov.settle(second, 10, 0.2)  # cheaper than reserved: 0.8 left
    gov.admit(scopes, est(usd=0.8))


def test_budget_rolls_over_at_the_period_end() -> None:
    gov, _, day = governor(wall=ts(2026, 12, 6, 23, 59))  # Sunday night
    scopes = (key(budget=Budget(usd=1.0, period="weekly")),)
    gov.settle(gov.admit(scopes, est(usd=1.0)), 10, 1.0)
    with pytest.raises(QuotaExceeded):
        gov.admit(scopes, est(usd=0.1))
    day.t = ts(2026, 12, 7)  # Monday 00:00 UTC: a new week
    gov.admit(scopes, est(usd=1.0))


def test_total_budget_never_rolls_over() -> None:
    gov, _, day = governor()
    scopes = (key(budget=Budget(usd=1.0, period="total")),)
    gov.settle(gov.admit(scopes, est(usd=1.0)), 10, 1.0)
    day.t += 10 * 365 * 86400
    with pytest.raises(QuotaExceeded):
        gov.admit(scopes, est(usd=None))


class FakeStore:
    """The SpendSource a rebuild reads: recorded spend per level since a time."""

    def __init__(self, records: list[tuple[str, str, float, float]]) -> None:
        self.records = records  # (kind, id, created_at, cost_usd)
        self.asked: list[tuple[str, str, float]] = []

    async def spend_since(self, kind: str, id: str, since: float) -> float:
        self.asked.append((kind, id, since))
        return sum(c for k, i, t, c in self.records if (k, i) == (kind, id) and t >= since)


def test_spend_survives_a_restart() -> None:
    now = ts(2026, 12, 2, 12)
    store = FakeStore(
        [
            ("key", "k1", ts(2026, 12, 2, 1), 0.5),
            ("key", "k1", ts(2026, 12, 1, 23), 5.0),  # yesterday: not this day's budget
            ("org", "acme", ts(2026, 12, 1, 9), 60.0),  # this month
            ("org", "acme", ts(2026, 11, 30, 9), 900.0),  # last month
        ]
    )
    k = key(budget=Budget(usd=1.0, period="daily"))
    org = Scope(kind="org", id="acme", budget=Budget(usd=100.0, period="monthly"))
    gov, _, _ = governor(wall=now)
    read = asyncio.run(gov.rebuild(store, [k, org, k, key(rpm=5, id="other")], now))
    assert read == {("key", "k1"): 0.5, ("org", "acme"): 60.0}
    assert store.asked == [("key", "k1", ts(2026, 12, 2)), ("org", "acme", ts(2026, 12, 1))]
    gov.admit((k, org), est(usd=0.5))  # 0.5 + 0.5 fits the key's $1
    with pytest.raises(QuotaExceeded) as info:
        gov.admit((k, org), est(usd=0.01))
    assert "key 'k1'" in info.value.message


def test_loaded_spend_of_a_past_period_is_not_used() -> None:
    day0 = ts(2026, 12, 2, 12)
    budgets = Budgets(clock=lambda: day0)
    budgets.load({("key", "k1"): 1.0}, day0)
    scope = key(budget=Budget(usd=1.0, period="daily"))
    spend = budgets.spend(scope, day0 + 86400)  # first seen the next day
    assert spend is not None and spend.spent == 0.0


def test_a_late_load_keeps_the_larger_count() -> None:
    now = ts(2026, 12, 2, 12)
    budgets = Budgets(clock=lambda: now)
    scope = key(budget=Budget(usd=10.0, period="daily"))
    spends = budgets.check((scope,), 1.0, now)
    budgets.take(spends, 1.0)
    budgets.settle(spends, 1.0, 1.0)
    budgets.load({("key", "k1"): 3.0}, now)
    assert spends[0].spent == 3.0
    budgets.load({("key", "k1"): 0.5}, now)  # older than what this worker counted
    assert spends[0].spent == 3.0


# ------------------------------------------------------------------ the proof


@pytest.mark.parametrize("seed", range(5))
def test_fifty_concurrent_requests_against_a_budget_that_fits_ten(seed: int) -> None:
    """At most 10 of 50 concurrent requests are served, and the recorded spend
    never exceeds the budget, whatever order the upstream answers in and
    although later requests arrive while earlier ones are still in flight."""
    budget = 1.0
    price = 0.1  # each request's worst case, and what it really costs

    async def main() -> tuple[int, int, float, float]:
        gov, _, _ = governor()
        scopes = (
            key(budget=Budget(usd=50.0)),
            Scope(kind="team", id="t", budget=Budget(usd=budget, period="daily")),
            Scope(kind="org", id="o", rpm=1000),
        )
        rng = random.Random(seed)
        answer = [asyncio.Event() for _ in range(50)]
        admitted = [asyncio.Event() for _ in range(50)]
        done = [asyncio.Event() for _ in range(50)]
        served: list[int] = []
        refused = 0
        recorded = 0.0
        peak = 0.0

        async def request(i: int) -> None:
            nonlocal refused, recorded, peak
            try:
                ticket = gov.admit(scopes, est(100, usd=price))
            except QuotaExceeded:
                refused += 1
                admitted[i].set()
                done[i].set()
                return
            admitted[i].set()
            await answer[i].wait()  # the fake upstream answers when told to
            gov.settle(ticket, 100, price)
            served.append(i)
            recorded += price
            state = gov.budgets.spend(scopes[1], gov.budgets.clock())
            assert state is not None
            peak = max(peak, state.spent + state.reserved)
            done[i].set()

        tasks: list[asyncio.Task[None]] = []
        waiting: list[int] = []
        for start in range(0, 50, 5):  # requests arrive in waves of 5
            batch = range(start, start + 5)
            tasks += [asyncio.create_task(request(i)) for i in batch]
            for i in batch:
                await admitted[i].wait()
            waiting += [i for i in batch if not done[i].is_set()]
            rng.shuffle(waiting)
            # the upstream answers some of those in flight, in a random order
            for _ in range(rng.randint(0, len(waiting))):
                i = waiting.pop()
                answer[i].set()
                await done[i].wait()
        for i in waiting:
            answer[i].set()
        await asyncio.gather(*tasks)
        return len(served), refused, recorded, peak

    served, refused, recorded, peak = asyncio.run(main())
    assert served == 10 and refused == 40
    assert recorded <= budget and peak <= budget


def test_cheaper_answers_leave_room_for_more_but_never_overshoot() -> None:
    async def main() -> tuple[float, int]:
        gov, _, _ = governor()
        scopes = (key(budget=Budget(usd=1.0, period="total")),)
        rng = random.Random(7)
        gate = [asyncio.Event() for _ in range(50)]
        done = [asyncio.Event() for _ in range(50)]
        spent = 0.0
        served = 0

        async def request(i: int) -> None:
            nonlocal spent, served
            try:
                ticket = gov.admit(scopes, est(100, usd=0.1))
            except QuotaExceeded:
                done[i].set()
                return
            await gate[i].wait()
            cost = rng.uniform(0.01, 0.1)  # never above the worst case
            gov.settle(ticket, 100, cost)
            spent += cost
            served += 1
            done[i].set()

        tasks: list[asyncio.Task[None]] = []
        for i in range(50):  # one arrives, then an earlier one is answered
            tasks.append(asyncio.create_task(request(i)))
            if i % 2:
                j = rng.randrange(i + 1)
                gate[j].set()
                await done[j].wait()
        for event in gate:
            event.set()
        await asyncio.gather(*tasks)
        return spent, served

    spent, served = asyncio.run(main())
    assert spent <= 1.0 and served > 10  # cheap answers made room for more


# ------------------------------------------------------------------ several workers


def test_each_worker_takes_a_share_that_never_adds_up_past_the_limit() -> None:
    for limit in range(0, 301):
        for share in range(1, 10):
            part = share_of(limit, share)
            assert part * share <= limit  # the workers together stay within it
            assert limit - part * share < share  # and lose less than one per worker
    assert share_of(1000, 3) == 333
    assert share_of(2, 4) == 0


def test_a_worker_enforces_its_share() -> None:
    gov, _, _ = governor(share=4)
    scopes = (key(rpm=10, tpm=1000),)  # 2 requests and 250 tokens per worker
    ticket = gov.admit(scopes, est(100))
    assert header(ticket.headers, b"x-ratelimit-limit-requests") == b"2"
    assert header(ticket.headers, b"x-ratelimit-limit-tokens") == b"250"
    gov.admit(scopes, est(100))
    with pytest.raises(RateLimited) as info:
        gov.admit(scopes, est(10))
    assert "this worker's share 2 of 10" in info.value.message
    with pytest.raises(RateLimited, match="Limit 250"):
        gov.admit((key(tpm=1000, id="k2"),), est(300))


def test_a_limit_smaller_than_the_worker_count_serves_nothing_and_says_why() -> None:
    gov, _, _ = governor(share=4)
    with pytest.raises(RateLimited) as info:
        gov.admit((key(rpm=3),), est())
    exc = info.value
    assert "smaller than the 4 worker processes" in exc.message
    assert exc.retry_after is None and NO_RETRY in exc.headers()


def test_budgets_are_shared_out_and_loaded_spend_too() -> None:
    now = ts(2026, 12, 2, 12)
    gov, _, _ = governor(share=4, wall=now)
    scopes = (key(budget=Budget(usd=1.0, period="daily")),)
    gov.budgets.load({("key", "k1"): 0.4}, now)  # all workers spent 0.4: 0.1 each
    gov.admit(scopes, est(usd=0.15))  # 0.1 + 0.15 = this worker's 0.25
    with pytest.raises(QuotaExceeded, match="share"):
        gov.admit(scopes, est(usd=0.001))


def test_the_worker_count_comes_from_the_environment() -> None:
    assert share_from_env({}) == 1
    assert share_from_env({ENV_WORKERS: "3"}) == 3
    assert share_from_env({ENV_WORKERS: "0"}) == 1
    assert share_from_env({ENV_WORKERS: "many"}) == 1


def test_worst_case_without_max_tokens_uses_the_allowance() -> None:
    bounded = worst_case(100, 50, 1e-6, 2e-6)
    assert bounded.tokens == 150 and bounded.usd == pytest.approx(200e-6)
    unbounded = worst_case(100, None, 1e-6, 2e-6)
    assert unbounded.tokens == 100 + DEFAULT_OUTPUT_ALLOWANCE
    assert unbounded.usd == pytest.approx(100e-6 + DEFAULT_OUTPUT_ALLOWANCE * 2e-6)
    assert worst_case(100, None, None, 2e-6).usd is None


# ------------------------------------------------------------------ native shapes


def _errors() -> list[RateLimited | QuotaExceeded]:
    return [
        RateLimited("Rate limit reached", retry_after=3, limit="requests"),
        QuotaExceeded("You exceeded your current quota"),
    ]


def test_limits_and_quota_render_in_every_native_shape() -> None:
    for exc in _errors():
        anthropic = orjson.loads(ERROR_BODIES["anthropic"](exc))
        assert anthropic == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": exc.message},
        }
        google = orjson.loads(ERROR_BODIES["gemini"](exc))
        assert google == {
            "error": {"code": 429, "message": exc.message, "status": "RESOURCE_EXHAUSTED"}
        }
        assert orjson.loads(ERROR_BODIES["ollama"](exc)) == {"error": exc.message}
        azure = orjson.loads(ERROR_BODIES["azure"](exc))["error"]
        assert azure == orjson.loads(openai_error(exc))["error"]
        assert azure["code"] in {"rate_limit_exceeded", "insufficient_quota"}


def test_headers_are_the_same_on_every_path() -> None:
    limited, quota = _errors()
    assert limited.headers() == ((b"retry-after", b"3"),)
    assert quota.headers() == (NO_RETRY,)
    quota.upstream, quota.attempts = "openai", 1  # no duplicate when routing adds it
    assert quota.headers().count(NO_RETRY) == 1


@pytest.mark.parametrize("api", [None, "anthropic", "gemini", "azure", "ollama"])
def test_the_error_boundary_answers_429_with_the_retry_headers_on_every_api(
    api: str | None,
) -> None:
    endpoint = None if api is None else Endpoint({}, reads_body=True, render=ERROR_BODIES[api])
    limited, quota = _errors()
    answer = ServerCore.error(limited, endpoint)
    assert answer.status == 429 and (b"retry-after", b"3") in answer.headers
    assert NO_RETRY not in answer.headers
    answer = ServerCore.error(quota, endpoint)
    assert answer.status == 429 and NO_RETRY in answer.headers
    assert all(name != b"retry-after" for name, _ in answer.headers)
    body = orjson.loads(answer.body)
    if api == "anthropic":
        assert body["error"]["type"] == "rate_limit_error"
    elif api == "gemini":
        assert body["error"]["status"] == "RESOURCE_EXHAUSTED"
    elif api == "ollama":
        assert body == {"error": quota.message}
    else:
        assert body["error"]["type"] == body["error"]["code"] == "insufficient_quota"


def test_a_refund_without_a_refill_lands_where_refill_first_would() -> None:
    """correct() refunds without reading the clock (the usual settle: the answer
    was shorter than its estimate). Against a reference that refills first, over
    seeded random admits, waits and settles, the levels agree at every step."""
    rng = random.Random(7)
    for _ in range(200):
        gov, mono, _ = governor()
        scopes = (key(tpm=600),)
        reference = 600.0  # the level a refill-first bucket has, at ``stamp``
        stamp = mono()
        for _ in range(6):
            tokens = rng.randint(1, 120)
            mono.t += rng.choice((0.0, 0.5, 3.0, 30.0))
            reference = min(600.0, reference + (mono() - stamp) * 10.0)
            stamp = mono()
            try:
                ticket = gov.admit(scopes, est(tokens))
            except RateLimited:
                continue
            reference -= tokens
            mono.t += rng.choice((0.0, 0.25, 2.0, 20.0))
            used = rng.randint(0, tokens)  # a refund
            reference = min(600.0, reference + (mono() - stamp) * 10.0)
            stamp = mono()
            reference = min(600.0, reference + (tokens - used))
            gov.settle(ticket, used, None)
            rate = gov.limits.rate(scopes[0], mono())
            assert rate is not None and rate.tpm is not None
            assert rate.tpm.level == pytest.approx(reference)


def test_a_level_gaining_a_limit_keeps_one_bucket_for_old_and_new_scopes() -> None:
    # A key gains a TPM limit while requests still carry its old scopes (an
    # identity cached before the change): the old scopes' requests share the
    # level's new bucket, and using them does not recreate (refill) it.
    gov, _, _ = governor()
    old, new = (key(rpm=100),), (key(rpm=100, tpm=100),)
    gov.admit(old, est(1))
    gov.admit(new, est(60))  # 40 tokens left
    gov.admit(old, est(1))
    with pytest.raises(RateLimited):
        gov.admit(new, est(50))


def test_an_rpm_only_callers_headers_follow_its_bucket() -> None:
    # A key's rpm alone has nothing to settle: its tickets are shared while
    # their headers repeat, so each answer must still show its own state and
    # an earlier ticket keeps the headers it was given.
    gov, mono, _ = governor()
    scopes = (key(rpm=60),)
    tickets = []
    for step in range(4):
        tickets.append(gov.admit(scopes, est()))
        if step == 1:
            mono.t += 1.0  # one request refilled
    seen = [
        (
            header(t.headers, b"x-ratelimit-remaining-requests"),
            header(t.headers, b"x-ratelimit-reset-requests"),
        )
        for t in tickets
    ]
    assert seen == [(b"59", b"1s"), (b"58", b"2s"), (b"58", b"2s"), (b"57", b"3s")]
    mono.t += 3.0  # full again: the same values as the third answer, a fresh ticket or not
    ticket = gov.admit(scopes, est())
    assert header(ticket.headers, b"x-ratelimit-remaining-requests") == b"59"
    assert header(tickets[0].headers, b"x-ratelimit-remaining-requests") == b"59"
    assert header(tickets[3].headers, b"x-ratelimit-remaining-requests") == b"57"
    gov.settle(ticket, 10, None)  # nothing to settle: a no-op, as often as called
    gov.release(ticket)


def test_successive_headers_follow_the_buckets() -> None:
    # The header values are formatted only when they change (limits.py keeps
    # the last one per bucket): each answer must still show its own state.
    gov, mono, _ = governor()
    scopes = (key(rpm=60, tpm=6000),)
    seen = []
    for step in range(4):
        ticket = gov.admit(scopes, est(1000))
        seen.append(
            (
                header(ticket.headers, b"x-ratelimit-remaining-requests"),
                header(ticket.headers, b"x-ratelimit-reset-requests"),
                header(ticket.headers, b"x-ratelimit-remaining-tokens"),
                header(ticket.headers, b"x-ratelimit-reset-tokens"),
            )
        )
        if step == 1:
            mono.t += 1.0  # one request and 100 tokens refilled
    assert seen == [
        (b"59", b"1s", b"5000", b"10s"),
        (b"58", b"2s", b"4000", b"20s"),
        (b"58", b"2s", b"3100", b"29s"),
        (b"57", b"3s", b"2100", b"39s"),
    ]
    gov.settle(ticket, 100, None)  # 900 refunded: the next answer shows them
    ticket = gov.admit(scopes, est(0))
    assert header(ticket.headers, b"x-ratelimit-remaining-tokens") == b"3000"


def test_a_tpm_only_callers_headers_follow_its_bucket() -> None:
    # A key's tpm alone has its own path in admit: each answer shows its own
    # state, an earlier ticket keeps the headers it was given (they are shared
    # while they repeat), settle corrects the charge and a refusal takes nothing.
    gov, mono, _ = governor()
    scopes = (key(tpm=6000),)  # 100 tokens a second
    tickets = [gov.admit(scopes, est(1000)) for _ in range(2)]
    mono.t += 1.0
    tickets.append(gov.admit(scopes, est(1000)))
    seen = [
        (
            header(t.headers, b"x-ratelimit-limit-tokens"),
            header(t.headers, b"x-ratelimit-remaining-tokens"),
            header(t.headers, b"x-ratelimit-reset-tokens"),
        )
        for t in tickets
    ]
    assert seen == [
        (b"6000", b"5000", b"10s"),
        (b"6000", b"4000", b"20s"),
        (b"6000", b"3100", b"29s"),
    ]
    assert header(tickets[0].headers, b"x-ratelimit-limit-requests") is None
    gov.settle(tickets[2], 100, None)  # 900 refunded
    ticket = gov.admit(scopes, est(0))
    assert header(ticket.headers, b"x-ratelimit-remaining-tokens") == b"4000"
    assert header(tickets[1].headers, b"x-ratelimit-remaining-tokens") == b"4000"
    with pytest.raises(RateLimited) as info:
        gov.admit(scopes, est(4500))
    assert info.value.type == "tokens" and info.value.retry_after == 5
    ticket = gov.admit(scopes, est(4000))  # the refusal took nothing
    assert header(ticket.headers, b"x-ratelimit-remaining-tokens") == b"0"
    gov.release(ticket)
    rate = gov.limits.rate(scopes[0], mono())
    assert rate is not None and rate.tpm is not None and rate.tpm.level == 4000


class _ExactBucket:
    """The reference token bucket: the level as an exact fraction, refilled at
    capacity/60 a second, clamped at the capacity (what Bucket's times mean)."""

    def __init__(self, capacity: int, now: Fraction) -> None:
        self.capacity = capacity
        self.level = Fraction(capacity)
        self.stamp = now

    def refill(self, now: Fraction) -> None:
        refilled = self.level + (now - self.stamp) * self.capacity / 60
        self.level = min(Fraction(self.capacity), refilled)
        self.stamp = now

    def pairs(self, unit: str) -> list[tuple[bytes, bytes]]:
        seconds = (self.capacity - self.level) * 60 / self.capacity
        return [
            (b"x-ratelimit-limit-" + unit.encode(), b"%d" % self.capacity),
            (b"x-ratelimit-remaining-" + unit.encode(), b"%d" % max(0, math.floor(self.level))),
            (b"x-ratelimit-reset-" + unit.encode(), format_duration(float(seconds))),
        ]


def _tightest(buckets: list[_ExactBucket], unit: str) -> list[list[tuple[bytes, bytes]]]:
    """The header pairs of every bucket tied for the smallest remaining fraction."""
    least = min(b.level / b.capacity for b in buckets)
    return [b.pairs(unit) for b in buckets if b.level / b.capacity == least]


@pytest.mark.parametrize("through", ["admit", "govern"])
@pytest.mark.parametrize(
    "limits",
    [
        [(30, 0)],  # a key's rpm alone (govern's own path)
        [(0, 600)],  # a key's tpm alone (govern's own path)
        [(30, 600), (40, 900), (50, 0)],  # key, team, org: the general path
        [(7, 0), (0, 70)],  # capacities whose refill times are not exact floats
    ],
)
def test_admissions_and_headers_follow_an_exact_bucket_model(
    limits: list[tuple[int, int]], through: str
) -> None:
    # Random arrivals, sizes and answers against the same buckets kept as exact
    # fractions: every request is admitted or refused as the model says, and its
    # x-ratelimit-* headers are the model's tightest level (remaining rounded
    # down, reset rounded up to the millisecond), whichever path (a full
    # bucket's kept headers included) produced them.
    rng = random.Random(sum(r + t for r, t in limits))
    gov, mono, _ = governor()
    kinds = ("key", "team", "org")
    scopes = tuple(
        Scope(kind=kinds[n], id=f"l{n}", rpm=rpm, tpm=tpm) for n, (rpm, tpm) in enumerate(limits)
    )
    who = caller(*scopes)
    start = Fraction(mono.t)
    rpm = [_ExactBucket(r, start) for r, _ in limits if r]
    tpm = [_ExactBucket(t, start) for _, t in limits if t]
    served = refused = 0
    for _ in range(400):
        mono.t += rng.choice((0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 1.5))
        if rng.random() < 0.02:
            mono.t += 45.0  # long enough to refill most of a bucket
        now = Fraction(mono.t)
        tokens = rng.choice((1, 5, 40, 40, 40, 120))
        for b in rpm + tpm:
            b.refill(now)
        fits = all(b.level >= 1 for b in rpm) and all(b.level >= tokens for b in tpm)
        try:
            if through == "admit":
                ticket = gov.admit(scopes, est(tokens))
            else:  # the pipeline's way in: a body of 4 bytes a token, no max_tokens
                ticket = gov.govern(who, ENTRY, b"x" * (4 * tokens), None)
        except RateLimited:
            assert not fits, f"refused what fits at {mono.t}"
            refused += 1
            continue
        assert fits, f"admitted what does not fit at {mono.t}"
        served += 1
        for b in rpm:
            b.level -= 1
        for b in tpm:
            b.level -= tokens
        headers = list(ticket.headers)
        expected_requests = _tightest(rpm, "requests") if rpm else [[]]
        expected_tokens = _tightest(tpm, "tokens") if tpm else [[]]
        assert any(headers == r + t for r in expected_requests for t in expected_tokens), (
            f"at {mono.t}: {headers} not in {expected_requests} x {expected_tokens}"
        )
        if tpm and rng.random() < 0.7:
            mono.t += rng.choice((0.0, 0.25, 3.0))
            now = Fraction(mono.t)
            used = rng.choice((0, tokens // 2, tokens, tokens + 30))
            for b in tpm:
                if used > tokens:  # a further charge: refilled first
                    b.refill(now)
                b.level = min(Fraction(b.capacity), b.level - (used - tokens))
            gov.settle(ticket, used, None)
    assert served > 50 and refused > 50  # both outcomes were exercised


def test_govern_estimates_a_request_as_the_pipeline_does() -> None:
    # The prompt is a quarter of the body; max_tokens is added to the tokens;
    # a budget reserves the price of max_tokens, or of the allowance when the
    # request sets none; the price is asked only when a level sets a budget.
    gov, _, _ = governor()
    asked: list[tuple[int, int]] = []

    def price(entry: Any, tokens_in: int, tokens_out: int) -> float | None:
        assert entry is ENTRY
        asked.append((tokens_in, tokens_out))
        return 0.25

    gov.price = price
    funded = caller(key(tpm=100_000, budget=Budget(usd=10.0, period="daily")))
    ticket = gov.govern(funded, ENTRY, b"x" * 400, 50)
    assert (ticket.tokens, ticket.usd) == (150, 0.25) and asked == [(100, 50)]
    ticket = gov.govern(funded, ENTRY, b"x" * 400, None)
    assert (ticket.tokens, ticket.usd) == (100, 0.25)
    assert asked[-1] == (100, DEFAULT_OUTPUT_ALLOWANCE)
    # A key's tpm alone: laid out by admit on the first request, then govern's
    # own path; both charge the same tokens, and neither asks for a price.
    metered = caller(key(tpm=6000, id="k2"))
    for n in (1, 2):
        ticket = gov.govern(metered, ENTRY, b"x" * 400, 50)
        assert ticket.tokens == 150
        assert header(ticket.headers, b"x-ratelimit-remaining-tokens") == b"%d" % (6000 - 150 * n)
    requests = caller(key(rpm=10, id="k3"))
    for n in (1, 2):
        ticket = gov.govern(requests, ENTRY, b"x" * 400, 50)
        assert header(ticket.headers, b"x-ratelimit-remaining-requests") == b"%d" % (10 - n)
    assert len(asked) == 2


def test_a_budget_alone_through_govern_matches_admit() -> None:
    # A key's own budget has its own path in govern: random requests (sizes,
    # max_tokens, prices, unpriced ones, answers dearer or cheaper than
    # reserved, failures, a new day) through govern and, on a twin governor,
    # through admit with pipeline.estimate's estimate; same answers, same
    # refusals, same spend.
    from gandalf.app.pipeline import estimate

    rng = random.Random(7)
    a, _, day_a = governor()
    b, _, day_b = governor()
    who = caller(key(budget=Budget(usd=0.05, period="daily")))
    rate = {"p": 1e-5}

    def price(entry: Any, tokens_in: int, tokens_out: int) -> float | None:
        usd = rate["p"]
        return None if usd is None else tokens_in * usd + tokens_out * 2 * usd

    a.price = price
    outcomes: list[object] = []
    for n in range(300):
        if n == 150:
            day_a.t += 86_400.0
            day_b.t += 86_400.0
        rate["p"] = rng.choice((1e-5, 1e-5, 3e-6, None))  # type: ignore[assignment]
        body = b"x" * rng.choice((40, 400, 4000))
        limit = rng.choice((None, 16, 512))
        fails, paid = rng.random() < 0.2, rng.choice((0.5, 1.0))
        seen: list[tuple[object, ...]] = []
        for gov in (a, b):
            try:
                if gov is a:
                    ticket = gov.govern(who, ENTRY, body, limit)
                else:
                    ticket = gov.admit(who.scopes, estimate(ENTRY, body, limit, price))
            except QuotaExceeded as exc:
                seen.append(("refused", str(exc)))
                continue
            seen.append(("served", ticket.tokens, ticket.usd))
            if fails:
                gov.release(ticket)
            else:
                gov.settle(ticket, ticket.tokens, ticket.usd * paid)
        assert seen[0] == seen[1], n
        outcomes.append(seen[0][0])
        (spend_a,), (spend_b,) = a._plans[who.scopes].spends, b._plans[who.scopes].spends
        assert (spend_a.paid, spend_a.room) == (spend_b.paid, spend_b.room)
    assert outcomes.count("served") > 50 and outcomes.count("refused") > 50


def test_a_resized_rpm_alone_gives_the_new_headers_from_a_full_bucket() -> None:
    # RPM alone hands out one prebuilt answer while its bucket is full at every
    # request; a resize must replace it, for the new scopes and the old ones.
    gov, mono, _ = governor()
    old, new = caller(key(rpm=10)), caller(key(rpm=20))
    for left in (b"9", b"8"):  # the second is govern's own path
        ticket = gov.govern(old, ENTRY, b"{}", None)
        assert header(ticket.headers, b"x-ratelimit-remaining-requests") == left
    mono.t += 60.0
    for who in (new, old, new, old):  # each scopes tuple: laid out again, then its own path
        ticket = gov.govern(who, ENTRY, b"{}", None)
        assert header(ticket.headers, b"x-ratelimit-limit-requests") == b"20"
        assert header(ticket.headers, b"x-ratelimit-remaining-requests") == b"19"
        assert header(ticket.headers, b"x-ratelimit-reset-requests") == b"3s"
        mono.t += 60.0


def test_a_bucket_added_to_a_level_reaches_the_plans_of_its_old_scopes() -> None:
    # A key's tpm alone, then the same key with an rpm as well (its config
    # changed while requests still carry the old scopes): the old scopes'
    # plan, on govern's own path for a tpm alone, is laid out again with the
    # level's new RPM bucket, and every request counts in both buckets.
    gov, _, _ = governor()
    old, new = caller(key(tpm=6000)), caller(key(rpm=10, tpm=6000))
    for n in (1, 2):
        ticket = gov.govern(old, ENTRY, b"x" * 400, None)
        assert header(ticket.headers, b"x-ratelimit-remaining-tokens") == b"%d" % (6000 - 100 * n)
        assert header(ticket.headers, b"x-ratelimit-remaining-requests") is None
    ticket = gov.govern(new, ENTRY, b"x" * 400, None)
    assert header(ticket.headers, b"x-ratelimit-remaining-requests") == b"9"
    for who, left in ((old, b"8"), (new, b"7"), (old, b"6")):
        ticket = gov.govern(who, ENTRY, b"x" * 400, None)
        assert header(ticket.headers, b"x-ratelimit-remaining-requests") == left
    assert header(ticket.headers, b"x-ratelimit-remaining-tokens") == b"%d" % (6000 - 600)
    # Settled at its real count, from the old scopes: the one TPM bucket is corrected.
    gov.settle(ticket, 40, None)
    ticket = gov.govern(old, ENTRY, b"x" * 400, None)
    assert header(ticket.headers, b"x-ratelimit-remaining-tokens") == b"%d" % (6000 - 640)


def test_a_resize_to_and_from_a_zero_share_reaches_every_plan_of_the_level() -> None:
    # A key's limit drops below the worker count while requests still carry
    # its old scopes, then rises again: both scopes tuples follow the level's
    # one bucket (refused while it holds none, served again after).
    gov, mono, _ = governor(share=4)
    old, low, high = (key(rpm=400),), (key(rpm=3),), (key(rpm=40),)
    gov.admit(old, est())
    with pytest.raises(RateLimited, match="smaller than the 4 worker processes"):
        gov.admit(low, est())
    with pytest.raises(RateLimited, match="smaller than the 4 worker processes"):
        gov.admit(old, est())  # the old scopes' plan sees the resized bucket
    mono.t += 60.0
    ticket = gov.admit(high, est())
    assert header(ticket.headers, b"x-ratelimit-limit-requests") == b"10"
    ticket = gov.admit(old, est())
    assert header(ticket.headers, b"x-ratelimit-remaining-requests") == b"8"
