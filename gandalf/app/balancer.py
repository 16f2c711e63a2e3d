"""The order in which a route's targets are tried, per strategy.

A route's targets are grouped into priority tiers (lowest ``priority`` first).
A request tries the tiers in order; within a tier the strategy decides:

- ``priority``: config order (the order is fixed, computed once).
- ``weighted``: a weighted random order, by target ``weight`` (a target of
  weight 0 only serves when the others of its tier failed).
- ``least_latency``: power of two choices: two random targets of the tier
  whose breaker would let a request through, the cheaper first; cost is the
  peak-EWMA of its time to first byte times (outstanding requests + 1)
  (Finagle's and linkerd's "peak EWMA" balancer).

Every strategy honours the breakers: the routing loop skips a target whose
provider's breaker refuses at the moment it would be tried, which costs one
float compare, so the first tier with an open target serves and later tiers
are for failover.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from gandalf.app.breaker import CircuitBreaker
from gandalf.app.retry import RetryBudget
from gandalf.domain import Provider, Target

__all__ = ["DECAY_SECONDS", "LatencyStats", "Slot", "p2c_pick", "plan", "tiers_of"]

DECAY_SECONDS = 10.0  # how fast an old latency estimate fades


class LatencyStats:
    """Peak-EWMA of one target's time to first byte, and its requests in flight.

    A slower sample replaces the estimate at once (the "peak"); faster ones
    pull it down with weight ``1 - exp(-elapsed / decay)``. Read, the estimate
    also fades toward 0 with the time since the last sample, so a target that
    stopped being picked is tried again. A target never measured costs 0: it
    is tried first, and measured.
    """

    __slots__ = ("_decay", "_stamp", "ewma", "outstanding")

    def __init__(self, decay: float = DECAY_SECONDS) -> None:
        self._decay = decay
        self._stamp = 0.0
        self.ewma = 0.0  # seconds
        self.outstanding = 0

    def observe(self, seconds: float, now: float) -> None:
        ewma = self.ewma
        if seconds >= ewma:
            self.ewma = seconds
        else:
            keep = math.exp(-max(0.0, now - self._stamp) / self._decay)
            self.ewma = ewma * keep + seconds * (1.0 - keep)
        self._stamp = now

    def estimate(self, now: float) -> float:
        """The latency estimate at ``now`` (faded since the last sample)."""
        ewma = self.ewma
        if not ewma:
            return 0.0
        return ewma * math.exp(-max(0.0, now - self._stamp) / self._decay)

    def cost(self, now: float) -> float:
        return self.estimate(now) * (self.outstanding + 1)


class Slot:
    """One target of one route, resolved once: everything an attempt touches,
    without a lookup (the provider's breaker and budget are shared with every
    other route of that provider)."""

    __slots__ = ("breaker", "budget", "latency", "name", "provider", "target")

    def __init__(
        self,
        target: Target,
        provider: Provider,
        breaker: CircuitBreaker,
        budget: RetryBudget,
        latency: LatencyStats,
    ) -> None:
        self.target = target
        self.provider = provider
        self.name = provider.name
        self.breaker = breaker
        self.budget = budget
        self.latency = latency

    def __repr__(self) -> str:
        return f"Slot({self.name!r}, {self.target.model!r})"


def tiers_of(slots: Sequence[Slot]) -> tuple[tuple[Slot, ...], ...]:
    """``slots`` grouped by target priority, lowest first; config order within."""
    ordered = sorted(slots, key=lambda s: s.target.priority)  # stable
    tiers: list[list[Slot]] = []
    for slot in ordered:
        if tiers and tiers[-1][0].target.priority == slot.target.priority:
            tiers[-1].append(slot)
        else:
            tiers.append([slot])
    return tuple(tuple(tier) for tier in tiers)


def plan(
    strategy: str,
    tiers: Sequence[Sequence[Slot]],
    now: float,
    rng: random.Random,
) -> list[Slot]:
    """Every slot, in the order this request should try them."""
    order: list[Slot] = []
    for tier in tiers:
        if len(tier) == 1 or strategy == "priority":
            order.extend(tier)
        elif strategy == "weighted":
            order.extend(weighted_order(tier, rng))
        else:
            order.extend(least_latency_order(tier, now, rng))
    return order


def weighted_order(tier: Sequence[Slot], rng: random.Random) -> list[Slot]:
    """A random order in which each next slot is drawn with probability
    proportional to its weight among those left; weight-0 slots come last."""
    left = [slot for slot in tier if slot.target.weight > 0]
    order: list[Slot] = []
    total = sum(slot.target.weight for slot in left)
    while left:
        point = rng.random() * total
        pick = len(left) - 1  # where rounding leaves the point, the last one
        for index, slot in enumerate(left):
            point -= slot.target.weight
            if point < 0:
                pick = index
                break
        picked = left.pop(pick)
        total -= picked.target.weight
        order.append(picked)
    order.extend(slot for slot in tier if slot.target.weight <= 0)
    return order


def p2c_pick(tier: Sequence[Slot], now: float, rng: random.Random) -> Slot | None:
    """The cheaper of two random slots whose breaker would admit a request
    (the only one, if one; None if none)."""
    ready = [slot for slot in tier if slot.breaker.available(now)]
    if len(ready) < 2:
        return ready[0] if ready else None
    first = rng.randrange(len(ready))
    second = rng.randrange(len(ready) - 1)
    if second >= first:
        second += 1
    a, b = ready[first], ready[second]
    return b if b.latency.cost(now) < a.latency.cost(now) else a


def least_latency_order(tier: Sequence[Slot], now: float, rng: random.Random) -> list[Slot]:
    """Power of two choices among the slots whose breaker would admit a
    request: the cheaper of two random ones first, then the other, then the
    rest by cost (failover), then the slots whose breaker refuses."""
    ready = [slot for slot in tier if slot.breaker.available(now)]
    resting = [slot for slot in tier if not slot.breaker.available(now)]
    if len(ready) < 2:
        return ready + resting
    first = rng.randrange(len(ready))
    second = rng.randrange(len(ready) - 1)
    if second >= first:
        second += 1
    a, b = ready[first], ready[second]
    if b.latency.cost(now) < a.latency.cost(now):
        a, b = b, a
    rest = sorted(
        (slot for index, slot in enumerate(ready) if index not in (first, second)),
        key=lambda slot: slot.latency.cost(now),
    )
    return [a, b, *rest, *resting]
