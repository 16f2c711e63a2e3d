"""Retries: how long to wait before one, and whether one is allowed at all.

- :class:`Backoff`: full-jitter exponential backoff (AWS architecture blog,
  "Exponential Backoff And Jitter"): the n-th retry (n from 0) waits a uniform
  random time in ``[0, min(cap, base * 2**n)]``, so synchronised clients spread out.
- :func:`parse_retry_after`: an upstream's ``Retry-After`` (delay-seconds or an
  HTTP date) as seconds from now. The routing layer waits that long before
  retrying the same provider when it is at most the backoff cap, and otherwise
  gives up retrying that provider for this request (other targets still serve).
- :class:`RetryBudget`: one per provider. Retries are allowed while the
  retries of the last ``window`` seconds stay under ``ratio`` of the requests
  of that window, or under ``min_per_second`` a second, whichever is more
  (gRPC's and Envoy's retry budgets; Finagle's RetryBudget). During an outage
  every request fails, and without a budget each would be sent ``max_attempts``
  times: the budget keeps the added load to ``ratio``.

Every time here is a monotonic time in seconds passed in by the caller;
randomness comes from the ``random.Random`` passed in (tests seed their own).
"""

from __future__ import annotations

import math
import random
from email.utils import parsedate_to_datetime

from gandalf.app._window import Window

__all__ = ["BUDGET_WINDOW", "Backoff", "RetryBudget", "parse_retry_after"]

BUDGET_WINDOW = 10  # seconds of history a retry budget weighs
_MAX_EXPONENT = 62  # 2**n beyond this only overflows; the cap applies long before


class Backoff:
    """Full-jitter exponential backoff between ``base`` and ``cap`` seconds."""

    __slots__ = ("base", "cap")

    def __init__(self, base: float = 0.1, cap: float = 10.0) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number ``retry`` (0 for the first)."""
        return min(self.cap, self.base * 2.0 ** min(retry, _MAX_EXPONENT))

    def delay(self, retry: int, rng: random.Random) -> float:
        """A wait in ``[0, ceiling(retry)]``, uniformly at random."""
        return rng.uniform(0.0, self.ceiling(retry))


def parse_retry_after(value: str | None, wall_now: float) -> float | None:
    """``Retry-After`` as seconds from now (>= 0), or None when absent or unreadable.

    ``value`` is delay-seconds (``"7"``; fractions accepted) or an HTTP date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``), which is read against ``wall_now``
    (unix seconds).
    """
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:  # an HTTP date is GMT even when it does not say so
            return None
        seconds = moment.timestamp() - wall_now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class RetryBudget:
    """How many retries a provider may get: a sliding window of requests and retries.

    ``allow_retry(now)`` answers whether one more retry fits, and counts it
    when it does. The requests are counted with ``record_request(now)``, or,
    when ``attempts`` is given, read from it: a window of one-second buckets
    whose ``a`` counts every finished attempt on the provider (the circuit
    breaker's outcome window), so the hot path pays for one count, not two;
    requests are then those attempts minus this budget's retries.
    """

    __slots__ = ("_attempts", "_floor", "_ratio", "_seconds", "_window", "denied", "name")

    def __init__(
        self,
        name: str,
        ratio: float = 0.2,
        min_per_second: float = 1.0,
        window: int = BUDGET_WINDOW,
        *,
        attempts: Window | None = None,
    ) -> None:
        if ratio < 0 or min_per_second < 0:
            raise ValueError("a retry budget's ratio and minimum must be >= 0")
        self.name = name
        self._ratio = ratio
        self._floor = min_per_second * window
        self._seconds = window
        self._window = Window(window)  # a: requests (unless shared), b: retries
        self._attempts = attempts
        self.denied = 0  # retries refused since start-up

    def record_request(self, now: float) -> None:
        """Count a request (only without a shared ``attempts`` window)."""
        window = self._window
        if now >= window.edge:
            window.roll(now)
        window.cur_a += 1

    def allow_retry(self, now: float) -> bool:
        requests, retries = self.totals(now)
        if retries < max(self._ratio * requests, self._floor):
            self._window.cur_b += 1
            return True
        self.denied += 1
        return False

    def totals(self, now: float) -> tuple[int, int]:
        """``(requests, retries)`` in the window ending at ``now``."""
        requests, retries = self._window.totals(now)
        shared = self._attempts
        if shared is not None:
            attempts, _ = shared.recent(now, self._seconds)
            requests = max(0, attempts - int(retries))
        return requests, int(retries)
