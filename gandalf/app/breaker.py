"""CircuitBreaker: one per provider, so routing skips a provider that keeps failing.

Outcomes are counted in a sliding window of one-second buckets (``window``
seconds, 60 by default), each outcome weighted by how much it says about the
provider's health (app/health.py): a timeout before the response headers 1.5,
a 5xx or network failure 1.0, a 429 0.5; a success, the caller's own 4xx, a
timeout after the headers came (a long answer) or an answer over the size cap
0. The breaker is shared by every tenant, so only failures that say "this
provider is unhealthy" may weigh: a caller must not open it with requests
that are merely long (see app/health.py, "Blame").

States::

    closed --(weighted failures / samples >= error_rate, samples >= min_samples)--> open
    open --(open_for elapsed; the next request is the probe)--> half_open
    half_open --(the probe succeeds)--> closed (window cleared)
    half_open --(the probe fails)--> open (for open_for again)

While half-open, only the probe goes through; a probe that never reports (its
caller went away) is replaced after ``open_for``. Transitions are logged
(WARNING when opening, INFO otherwise) on the ``gandalf.resilience`` logger.

Cost: while closed, ``closed`` is True and ``allows(now)`` is one float
compare and one identity check (the hot path reads ``closed`` and calls
``allows`` only when it is False); recording a success is a compare and an
increment. ``now`` is a monotonic time in seconds, passed in by the caller
(tests pass a fake clock). The outcome counts (``outcomes``, a: outcomes,
b: weighted failures) double as the provider's recent request count for its
retry budget.
"""

from __future__ import annotations

import logging
import math

import msgspec

from gandalf.app._window import Window
from gandalf.domain import BreakerPolicy

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "BreakerSnapshot", "CircuitBreaker"]

logger = logging.getLogger("gandalf.resilience")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class BreakerSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One provider's breaker, as the admin API and metrics show it."""

    provider: str
    state: str  # closed | open | half_open
    samples: int  # outcomes in the window
    failures: float  # their weighted failures
    error_rate: float  # failures / samples (0 without samples)
    opened: int  # times it opened since start-up
    retry_in: float  # seconds until a probe may go through (0 unless open)


class CircuitBreaker:
    __slots__ = (
        "_blocked_until",
        "_min_samples",
        "_open_for",
        "_rate",
        "_window",
        "closed",
        "name",
        "opened",
        "outcomes",
        "state",
    )

    def __init__(self, name: str, policy: BreakerPolicy) -> None:
        self.name = name
        self._rate = policy.error_rate
        self._min_samples = policy.min_samples
        self._open_for = policy.open_for
        self._window = self.outcomes = Window(max(1, math.ceil(policy.window)))
        self.state = CLOSED
        self.closed = True  # state is CLOSED: every request may go
        # Requests are refused before this time: -inf while closed; the end of
        # open_for while open; the probe's deadline while half-open.
        self._blocked_until = -math.inf
        self.opened = 0

    # ---------------------------------------------------------------- admission

    def allows(self, now: float) -> bool:
        """May a request go to this provider now? While open, the first call
        after ``open_for`` is let through as the probe (half-open)."""
        if now < self._blocked_until:
            return False
        if self.state is CLOSED:
            return True
        if self.state is OPEN:
            self.state = HALF_OPEN
            self.closed = False
            logger.info("circuit breaker of provider %r is half-open: sending one probe", self.name)
        # The probe is in flight: the rest wait (for open_for at most, in case
        # the probe never reports).
        self._blocked_until = now + self._open_for
        return True

    def available(self, now: float) -> bool:
        """Would :meth:`allows` say yes? Without taking the probe."""
        return now >= self._blocked_until

    def retry_in(self, now: float) -> float:
        """Seconds until a request may be let through (0 when it may now)."""
        return max(0.0, self._blocked_until - now)

    # ---------------------------------------------------------------- outcomes

    def record_success(self, now: float) -> None:
        """A request let through got an answer (a success or the caller's 4xx)."""
        window = self._window
        if now >= window.edge:
            window.roll(now)
        window.cur_a += 1
        if self.state is not CLOSED:
            self._settle(0.0, now)

    def record(self, weight: float, now: float) -> None:
        """A request let through ended with a failure of ``weight`` (0: a success)."""
        window = self._window
        if now >= window.edge:
            window.roll(now)
        window.cur_a += 1
        if not weight:
            if self.state is not CLOSED:
                self._settle(0.0, now)
            return
        window.cur_b += weight
        if self.state is not CLOSED:
            self._settle(weight, now)
            return
        samples = window.past_a + window.cur_a
        failures = window.past_b + window.cur_b
        if samples >= self._min_samples and failures >= self._rate * samples:
            self._open(now)
            logger.warning(
                "circuit breaker of provider %r opened: weighted error rate %.2f over %d "
                "requests in the last %ds; skipping it for %gs",
                self.name,
                failures / samples,
                samples,
                window.size,
                self._open_for,
            )

    def release(self, now: float) -> None:
        """A request let through ended without an outcome (its caller went
        away): if it was the probe, the next request may probe instead."""
        if self.state is HALF_OPEN and self._blocked_until > now:
            self._blocked_until = now

    def _settle(self, weight: float, now: float) -> None:
        """An outcome while not closed: the half-open probe's decides."""
        if self.state is not HALF_OPEN:
            return  # open: a request admitted before it opened; counted, nothing more
        if weight:
            self._open(now)
            logger.warning(
                "circuit breaker of provider %r: the probe failed; open again for %gs",
                self.name,
                self._open_for,
            )
        else:
            self.state = CLOSED
            self.closed = True
            self._blocked_until = -math.inf
            self._window.clear()
            logger.info("circuit breaker of provider %r closed: the probe succeeded", self.name)

    def _open(self, now: float) -> None:
        self.state = OPEN
        self.closed = False
        self._blocked_until = now + self._open_for
        self.opened += 1

    # ---------------------------------------------------------------- reading

    def snapshot(self, now: float) -> BreakerSnapshot:
        samples, failures = self._window.totals(now)
        return BreakerSnapshot(
            provider=self.name,
            state=self.state,
            samples=samples,
            failures=failures,
            error_rate=failures / samples if samples else 0.0,
            opened=self.opened,
            retry_in=self.retry_in(now) if self.state is OPEN else 0.0,
        )
