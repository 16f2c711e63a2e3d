"""The circuit breaker and its sliding window, on a fake clock."""

from __future__ import annotations

import logging

import pytest

from gandalf.app._window import Window
from gandalf.app.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from gandalf.domain import BreakerPolicy

POLICY = BreakerPolicy(error_rate=0.5, min_samples=10, open_for=30.0, window=60.0)
T0 = 1000.0  # a monotonic time well past zero


def breaker(policy: BreakerPolicy = POLICY) -> CircuitBreaker:
    return CircuitBreaker("p", policy)


def feed(b: CircuitBreaker, now: float, successes: int = 0, **failures: tuple[int, float]) -> None:
    for _ in range(successes):
        assert b.allows(now)
        b.record_success(now)
    for count, weight in failures.values():
        for _ in range(count):
            assert b.allows(now)
            b.record(weight, now)


# ---------------------------------------------------------------------------- the window


def test_window_sums_the_last_size_seconds() -> None:
    w = Window(3)
    for second, value in enumerate((1, 2, 4, 8)):
        now = T0 + second + 0.5
        if now >= w.edge:
            w.roll(now)
        w.cur_a += value
        w.cur_b += value / 2
    # seconds 1..3 are in the window (the first has left it)
    assert w.totals(T0 + 3.9) == (14, 7.0)
    assert w.totals(T0 + 4.0) == (12, 6.0)  # second 1 left
    assert w.totals(T0 + 5.0) == (8, 4.0)
    assert w.totals(T0 + 6.0) == (0, 0.0)  # everything left
    w.cur_a += 5
    assert w.totals(T0 + 100.0) == (0, 0.0)  # a jump longer than the window clears it


def test_window_clear_and_size() -> None:
    w = Window(2)
    w.roll(T0)
    w.cur_a += 3
    w.clear()
    assert w.totals(T0) == (0, 0.0)
    with pytest.raises(ValueError):
        Window(0)


# ---------------------------------------------------------------------------- opening


def test_stays_closed_below_min_samples_whatever_the_rate() -> None:
    b = breaker()
    feed(b, T0, server=(9, 1.0))
    assert b.state == CLOSED and b.allows(T0)


def test_opens_at_the_weighted_error_rate_with_enough_samples() -> None:
    b = breaker()
    feed(b, T0, successes=5, server=(4, 1.0))
    assert b.state == CLOSED  # 4 / 9: too few samples and below the rate
    feed(b, T0, server=(1, 1.0))  # 5 / 10 = 0.5
    assert b.state == OPEN
    assert not b.allows(T0) and not b.allows(T0 + 29.9)
    assert b.opened == 1


@pytest.mark.parametrize(
    ("weight", "failures", "successes", "opens"),
    [
        (1.5, 4, 6, True),  # timeouts: 6.0 / 10 = 0.6
        (1.5, 3, 7, False),  # 4.5 / 10
        (1.0, 5, 5, True),  # 5xx and network: 5 / 10
        (1.0, 4, 6, False),
        (0.5, 10, 0, True),  # 429s: 5 / 10
        (0.5, 9, 1, False),  # 4.5 / 10
        (0.0, 10, 0, False),  # the caller's 4xx never opens it
    ],
)
def test_failure_weights(weight: float, failures: int, successes: int, opens: bool) -> None:
    b = breaker()
    feed(b, T0, successes=successes, failed=(failures, weight))
    assert (b.state == OPEN) is opens


def test_old_outcomes_leave_the_window() -> None:
    b = breaker()
    feed(b, T0, failed=(9, 1.0))  # 9 failures, not enough samples yet
    feed(b, T0 + 61.0, failed=(1, 1.0))  # a minute later they are gone: 1 sample
    assert b.state == CLOSED
    snap = b.snapshot(T0 + 61.0)
    assert (snap.samples, snap.failures) == (1, 1.0)


def test_opening_is_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    b = breaker()
    with caplog.at_level(logging.INFO, logger="gandalf.resilience"):
        feed(b, T0, failed=(10, 1.0))
    (record,) = [r for r in caplog.records if r.name == "gandalf.resilience"]
    assert record.levelno == logging.WARNING
    assert "'p' opened" in record.getMessage() and "1.00 over 10" in record.getMessage()


# ---------------------------------------------------------------------------- half-open


def opened() -> CircuitBreaker:
    b = breaker()
    feed(b, T0, failed=(10, 1.0))
    assert b.state == OPEN
    return b


def test_half_open_lets_exactly_one_probe_through_after_open_for() -> None:
    b = opened()
    assert not b.available(T0 + 29.0)
    assert b.available(T0 + 30.0)
    assert b.allows(T0 + 30.0)  # the probe
    assert b.state == HALF_OPEN
    assert not b.allows(T0 + 30.0) and not b.allows(T0 + 45.0)  # the probe is in flight


def test_a_successful_probe_closes_it_with_a_clean_window(caplog: pytest.LogCaptureFixture) -> None:
    b = opened()
    assert b.allows(T0 + 30.0)
    with caplog.at_level(logging.INFO, logger="gandalf.resilience"):
        b.record_success(T0 + 30.5)
    assert b.state == CLOSED and b.allows(T0 + 30.5)
    assert b.snapshot(T0 + 30.5).samples == 0
    assert any("closed" in r.getMessage() for r in caplog.records)
    feed(b, T0 + 31.0, failed=(9, 1.0))  # the old failures do not count any more
    assert b.state == CLOSED


def test_a_4xx_answer_to_the_probe_also_closes_it() -> None:
    b = opened()
    assert b.allows(T0 + 30.0)
    b.record(0.0, T0 + 30.1)
    assert b.state == CLOSED


def test_a_failed_probe_opens_it_again_for_open_for() -> None:
    b = opened()
    assert b.allows(T0 + 30.0)
    b.record(1.5, T0 + 31.0)
    assert b.state == OPEN and b.opened == 2
    assert not b.allows(T0 + 60.9)
    assert b.allows(T0 + 61.0) and b.state == HALF_OPEN


def test_a_lost_probe_is_replaced() -> None:
    b = opened()
    assert b.allows(T0 + 30.0)
    assert not b.allows(T0 + 59.0)
    assert b.allows(T0 + 60.0)  # the first probe never reported: another one


def test_a_released_probe_frees_the_slot_at_once() -> None:
    b = opened()
    assert b.allows(T0 + 30.0)
    b.release(T0 + 30.2)
    assert b.allows(T0 + 30.3)
    b.release(T0 + 30.4)
    b.release(T0 + 30.5)  # releasing twice changes nothing
    assert b.state == HALF_OPEN


def test_outcomes_of_requests_admitted_before_it_opened_change_nothing() -> None:
    b = opened()
    b.record_success(T0 + 1.0)
    b.record(1.0, T0 + 1.0)
    assert b.state == OPEN and not b.allows(T0 + 2.0)


def test_snapshot() -> None:
    b = opened()
    snap = b.snapshot(T0 + 10.0)
    assert snap.provider == "p" and snap.state == OPEN
    assert (snap.samples, snap.failures, snap.error_rate) == (10, 10.0, 1.0)
    assert snap.retry_in == pytest.approx(20.0) and snap.opened == 1
    closed = breaker().snapshot(T0)
    assert (closed.state, closed.samples, closed.error_rate, closed.retry_in) == (
        CLOSED,
        0,
        0.0,
        0.0,
    )


def test_window_recent_sums_only_the_last_seconds() -> None:
    w = Window(60)
    for second in range(20):
        w.roll(T0 + second)
        w.cur_a += 1
        w.cur_b += 0.5
    assert w.recent(T0 + 19.5, 10) == (10, 5.0)
    assert w.recent(T0 + 19.5, 1) == (1, 0.5)
    assert w.recent(T0 + 19.5, 600) == (20, 10.0)
    assert w.recent(T0 + 25.0, 10) == (4, 2.0)  # seconds 16..19 are still within 10 s
