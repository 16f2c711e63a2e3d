"""Target order per strategy: priority tiers, weighted, least latency (P2C, peak EWMA)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from gandalf.app.balancer import LatencyStats, Slot, plan, tiers_of
from gandalf.app.breaker import CircuitBreaker
from gandalf.app.retry import RetryBudget
from gandalf.domain import BreakerPolicy, Target
from tests.resilience_fakes import T0, FakeProvider

OPENS_AT_ONCE = BreakerPolicy(error_rate=0.5, min_samples=1, open_for=30.0)


def slot(name: str, priority: int = 1, weight: int = 1, ewma: float = 0.0) -> Slot:
    s = Slot(
        Target(provider=name, model="m", priority=priority, weight=weight),
        FakeProvider(name),
        CircuitBreaker(name, OPENS_AT_ONCE),
        RetryBudget(name),
        LatencyStats(),
    )
    if ewma:
        s.latency.observe(ewma, T0)
    return s


def names(slots: list[Slot]) -> list[str]:
    return [s.name for s in slots]


def open_breaker(s: Slot) -> None:
    s.breaker.record(1.0, T0)
    assert not s.breaker.available(T0)


# ---------------------------------------------------------------------------- tiers


def test_tiers_group_by_priority_keeping_config_order() -> None:
    slots = [slot("a", 2), slot("b", 1), slot("c", 2), slot("d", 1)]
    assert [names(list(tier)) for tier in tiers_of(slots)] == [["b", "d"], ["a", "c"]]


@pytest.mark.parametrize("strategy", ["priority", "weighted", "least_latency"])
def test_every_strategy_tries_tiers_in_priority_order(strategy: str) -> None:
    tiers = tiers_of([slot("backup", 2), slot("a", 1), slot("b", 1), slot("last", 3)])
    rng = random.Random(3)
    for _ in range(50):
        order = names(plan(strategy, tiers, T0, rng))
        assert sorted(order[:2]) == ["a", "b"] and order[2:] == ["backup", "last"]


def test_priority_keeps_config_order() -> None:
    tiers = tiers_of([slot("a"), slot("b"), slot("c")])
    assert names(plan("priority", tiers, T0, random.Random(0))) == ["a", "b", "c"]


# ---------------------------------------------------------------------------- weighted


def test_weighted_first_picks_follow_the_weights() -> None:
    tiers = tiers_of([slot("a", weight=1), slot("b", weight=3), slot("c", weight=6)])
    rng = random.Random(11)
    picks = 20_000
    first = Counter(plan("weighted", tiers, T0, rng)[0].name for _ in range(picks))
    for name, weight in (("a", 1), ("b", 3), ("c", 6)):
        assert first[name] / picks == pytest.approx(weight / 10, abs=0.015)


def test_weighted_order_is_a_permutation_and_weight_zero_comes_last() -> None:
    tiers = tiers_of([slot("zero", weight=0), slot("a", weight=2), slot("b", weight=1)])
    rng = random.Random(5)
    for _ in range(200):
        order = names(plan("weighted", tiers, T0, rng))
        assert sorted(order[:2]) == ["a", "b"] and order[2] == "zero"


def test_weighted_second_pick_is_weighted_among_the_rest() -> None:
    tiers = tiers_of([slot("a", weight=8), slot("b", weight=1), slot("c", weight=1)])
    rng = random.Random(9)
    seconds: Counter[str] = Counter()
    runs = 20_000
    for _ in range(runs):
        order = names(plan("weighted", tiers, T0, rng))
        if order[0] == "a":
            seconds[order[1]] += 1
    total = sum(seconds.values())
    assert total == pytest.approx(0.8 * runs, rel=0.03)
    assert seconds["b"] / total == pytest.approx(0.5, abs=0.03)


# ---------------------------------------------------------------------------- least latency


def test_p2c_with_two_targets_always_prefers_the_faster() -> None:
    tiers = tiers_of([slot("slow", ewma=0.9), slot("fast", ewma=0.1)])
    rng = random.Random(1)
    assert {plan("least_latency", tiers, T0, rng)[0].name for _ in range(200)} == {"fast"}


def test_p2c_over_many_targets_mostly_picks_fast_ones() -> None:
    slots = [slot("fast", ewma=0.05)] + [slot(f"slow{i}", ewma=1.0 + i) for i in range(4)]
    tiers = tiers_of(slots)
    rng = random.Random(2)
    picks = 10_000
    first = Counter(plan("least_latency", tiers, T0, rng)[0].name for _ in range(picks))
    # P2C picks the fastest whenever it is one of the two candidates: 2/5 of the time,
    # and never picks the slowest.
    assert first["fast"] / picks == pytest.approx(0.4, abs=0.02)
    assert first["slow3"] == 0


def test_p2c_cost_counts_outstanding_requests() -> None:
    busy, idle = slot("busy", ewma=0.1), slot("idle", ewma=0.25)
    busy.latency.outstanding = 3  # 0.1 * 4 > 0.25 * 1
    tiers = tiers_of([busy, idle])
    assert plan("least_latency", tiers, T0, random.Random(0))[0].name == "idle"


def test_p2c_skips_targets_whose_breaker_is_open() -> None:
    fast, slow = slot("fast", ewma=0.01), slot("slow", ewma=5.0)
    open_breaker(fast)
    tiers = tiers_of([fast, slow, slot("slower", ewma=9.0)])
    rng = random.Random(4)
    for _ in range(100):
        order = names(plan("least_latency", tiers, T0, rng))
        assert order[-1] == "fast" and order[0] == "slow"


def test_an_unmeasured_target_is_tried_first() -> None:
    tiers = tiers_of([slot("known", ewma=0.2), slot("new")])
    assert plan("least_latency", tiers, T0, random.Random(0))[0].name == "new"


# ---------------------------------------------------------------------------- peak EWMA


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    stats = LatencyStats(decay=10.0)
    stats.observe(0.2, T0)
    stats.observe(1.0, T0 + 1.0)
    assert stats.ewma == 1.0  # a slower sample takes over at once
    stats.observe(0.2, T0 + 11.0)  # ten seconds later: weight 1 - 1/e on the new sample
    assert stats.ewma == pytest.approx(1.0 / math.e + 0.2 * (1 - 1 / math.e))
    # Unread for a while, the estimate fades (a target left alone gets another chance).
    assert stats.estimate(T0 + 21.0) == pytest.approx(stats.ewma / math.e)
    stats.outstanding = 2
    assert stats.cost(T0 + 11.0) == pytest.approx(stats.ewma * 3)
