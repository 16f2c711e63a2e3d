"""Backoff, Retry-After and the retry budget, with a seeded random source and a fake clock."""

from __future__ import annotations

import datetime as dt
import random
from email.utils import format_datetime

import pytest

from gandalf.app._window import Window
from gandalf.app.retry import Backoff, RetryBudget, parse_retry_after

T0 = 1000.0
WALL = 1_700_000_000.0


# ---------------------------------------------------------------------------- backoff


def test_backoff_ceilings_double_up_to_the_cap() -> None:
    backoff = Backoff(0.1, 10.0)
    ceilings = [backoff.ceiling(n) for n in range(10)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0])
    assert backoff.ceiling(10_000) == 10.0  # no overflow however many retries


@pytest.mark.parametrize("retry", [0, 1, 3, 7, 12])
def test_full_jitter_stays_within_bounds_and_uses_the_whole_range(retry: int) -> None:
    backoff = Backoff(0.1, 10.0)
    rng = random.Random(42)
    ceiling = backoff.ceiling(retry)
    delays = [backoff.delay(retry, rng) for _ in range(5000)]
    assert all(0.0 <= d <= ceiling for d in delays)
    assert min(delays) < 0.01 * ceiling and max(delays) > 0.99 * ceiling
    assert sum(delays) / len(delays) == pytest.approx(ceiling / 2, rel=0.05)


def test_backoff_is_reproducible_with_the_same_seed() -> None:
    backoff = Backoff()
    first = [backoff.delay(n, random.Random(7)) for n in range(5)]
    again = [backoff.delay(n, random.Random(7)) for n in range(5)]
    assert first == again


def test_backoff_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


# ---------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 2 ", 2.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("-3", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, WALL) == seconds


def test_retry_after_http_date() -> None:
    moment = dt.datetime.fromtimestamp(WALL + 12, tz=dt.UTC)
    assert parse_retry_after(format_datetime(moment, usegmt=True), WALL) == pytest.approx(12.0)
    past = dt.datetime.fromtimestamp(WALL - 60, tz=dt.UTC)
    assert parse_retry_after(format_datetime(past, usegmt=True), WALL) == 0.0
    # A date without a zone is not an HTTP date.
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00", WALL) is None


# ---------------------------------------------------------------------------- the budget


def test_budget_floor_allows_min_per_second_times_the_window() -> None:
    budget = RetryBudget("p", ratio=0.2, min_per_second=1.0, window=10)
    allowed = [budget.allow_retry(T0) for _ in range(15)]
    assert allowed == [True] * 10 + [False] * 5
    assert budget.denied == 5


def test_budget_ratio_of_recent_requests() -> None:
    budget = RetryBudget("p", ratio=0.2, min_per_second=0.0, window=10)
    for i in range(100):
        budget.record_request(T0 + i * 0.05)  # 100 requests over 5 s
    allowed = sum(budget.allow_retry(T0 + 5.0) for _ in range(50))
    assert allowed == 20
    assert budget.totals(T0 + 5.0) == (100, 20)


def test_budget_window_slides() -> None:
    budget = RetryBudget("p", ratio=0.5, min_per_second=0.0, window=10)
    for _ in range(10):
        budget.record_request(T0)
    assert sum(budget.allow_retry(T0) for _ in range(10)) == 5
    # Ten seconds later those requests (and retries) have left the window.
    assert not budget.allow_retry(T0 + 10.0)
    for _ in range(4):
        budget.record_request(T0 + 10.0)
    assert sum(budget.allow_retry(T0 + 10.5) for _ in range(10)) == 2


def test_budget_rejects_negative_settings() -> None:
    with pytest.raises(ValueError):
        RetryBudget("p", ratio=-0.1)


def test_budget_can_read_requests_from_the_breakers_attempt_window() -> None:
    attempts = Window(60)  # a: every finished attempt on the provider (retries included)
    budget = RetryBudget("p", ratio=0.2, min_per_second=0.0, window=10, attempts=attempts)
    attempts.roll(T0)
    attempts.cur_a += 50
    # Retries still in flight are not requests: requests = 50 - k while k retries run.
    assert sum(budget.allow_retry(T0) for _ in range(20)) == 9
    attempts.cur_a += 9  # those retries finished: attempts, not requests
    assert budget.totals(T0) == (50, 9)
    assert budget.allow_retry(T0)  # 9 < 0.2 * 50
    attempts.cur_a += 1
    assert not budget.allow_retry(T0)  # 10 retries for 50 requests: the budget is spent
    # Only the budget's window of the attempts counts: 11 s later those are old.
    attempts.roll(T0 + 11.0)
    attempts.cur_a += 5
    assert budget.totals(T0 + 11.0) == (5, 0)
