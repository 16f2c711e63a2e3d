"""Requests-per-minute and tokens-per-minute limits: token buckets per level.

One :class:`Rate` per ``(kind, id)`` level (a key, a team, an org) holds up to
two buckets, RPM and TPM. A bucket's capacity is the limit per minute and it
refills at limit/60 per second, computed lazily from an injectable monotonic
clock when it is looked at (no timer task, no sleeps). A full bucket lets a
burst of up to the whole minute's limit through, then one request (or token)
every 60/limit seconds: the same shape OpenAI's limits have.

A request must fit every level of its scopes: the governor
(:meth:`~gandalf.app.governor.LocalGovernor.admit`, which runs the bucket
arithmetic over a caller's buckets laid out flat) looks at all of them first
and raises :class:`~gandalf.errors.RateLimited` for the
one that would make the caller wait longest (:meth:`RateLimits.verify`); only
when all fit does it take from all (no level is charged for a request another
level refused). TPM is charged the request's estimate up front and
corrected with the real total when it is known (:meth:`RateLimits.correct`):
a refund, or a further charge that may take the bucket below zero, so the
requests after it wait until the overshoot has refilled.

With several worker processes each enforces ``limit // share`` (see
:func:`share_of`): the shares never add up to more than the limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from gandalf.domain import Scope
from gandalf.errors import RateLimited

Clock = Callable[[], float]


def share_of(limit: int, share: int) -> int:
    """One worker's part of an integer per-minute ``limit`` when ``share``
    workers enforce it independently: ``limit // share``. Rounding down keeps
    the sum of all parts at or under the limit; a limit smaller than the
    number of workers leaves each worker a part of 0, which refuses every
    request at that level (never "unlimited": see :class:`Bucket`)."""
    return limit // share


def format_duration(seconds: float) -> bytes:
    """``seconds`` as OpenAI writes ``x-ratelimit-reset-*`` (Go's duration
    syntax, which OpenAI's own Go SDK parses with ``time.ParseDuration``):
    ``0s``, ``20ms``, ``1s``, ``2.5s``, ``6m0s``, ``1m30.25s``, ``1h0m0s``.
    Rounded up to the millisecond (a microsecond of float noise aside), so a
    client that waits this long finds the bucket refilled."""
    if seconds <= 0:
        return b"0s"
    ms = int(seconds * 1000 + 0.999)
    if ms < 1000:
        return b"%dms" % ms if ms else b"0s"
    minutes, ms = divmod(ms, 60_000)
    whole, frac = divmod(ms, 1000)
    secs = b"%ds" % whole if not frac else (b"%d.%03d" % (whole, frac)).rstrip(b"0") + b"s"
    if not minutes:
        return secs
    hours, minutes = divmod(minutes, 60)
    if not hours:
        return b"%dm%b" % (minutes, secs)
    return b"%dh%dm%b" % (hours, minutes, secs)


_HEADER_NAMES = {
    unit: (
        b"x-ratelimit-limit-" + unit.encode(),
        b"x-ratelimit-remaining-" + unit.encode(),
        b"x-ratelimit-reset-" + unit.encode(),
    )
    for unit in ("requests", "tokens")
}


class Bucket:
    """A token bucket: ``level`` of ``capacity``, refilled at ``rate`` a second.

    ``limit`` is the configured per-minute limit (to notice a change);
    ``capacity`` is this worker's share of it. A capacity of 0 (a limit
    smaller than the worker count) refuses everything. ``level`` may be
    negative after a correction charged more tokens than were left.
    """

    __slots__ = (
        "capacity",
        "full",
        "left",
        "left_header",
        "level",
        "limit",
        "limit_header",
        "names",
        "pairs",
        "rate",
        "reset",
        "reset_header",
        "stamp",
    )

    def __init__(self, limit: int, share: int, now: float, unit: str = "requests") -> None:
        self.limit = limit
        self.capacity = share_of(limit, share)
        # The capacity as a float, for the per-request arithmetic and
        # comparisons with the (float) level: a large int (a TPM limit above
        # 2**30) compared with a float takes CPython's slow exact path.
        self.full = float(self.capacity)
        self.rate = self.capacity / 60.0
        self.level = self.full
        self.stamp = now
        # The x-ratelimit-*-<unit> headers, each kept as the (name, value) pair
        # an answer carries: the limit changes only on a resize, and the last
        # remaining / reset pairs are reused while what they were made from
        # (``left``, ``reset`` in milliseconds) repeats, as it often does on a
        # busy bucket: formatting them and building the pairs is most of what
        # a header costs (see refresh()).
        self.names = _HEADER_NAMES[unit]
        self.limit_header = (self.names[0], b"%d" % self.capacity)
        self.left = -1
        self.left_header = (self.names[1], b"0")
        self.reset = -1
        self.reset_header = (self.names[2], b"0s")
        # The three pairs as the list a Ticket carries (read only: tickets of
        # successive requests share it while it holds; a change makes a new one).
        self.pairs = [self.limit_header, self.left_header, self.reset_header]

    def refill(self, now: float) -> float:
        """The level at ``now`` (stored), never above the capacity."""
        elapsed = now - self.stamp
        if elapsed > 0:
            level = self.level + elapsed * self.rate
            self.level = level if level < self.full else self.full
            self.stamp = now
        return self.level

    def resize(self, limit: int, share: int) -> None:
        """A changed limit: the new capacity, the level kept (clamped)."""
        self.limit = limit
        self.capacity = share_of(limit, share)
        self.full = float(self.capacity)
        self.limit_header = (self.names[0], b"%d" % self.capacity)
        self.pairs = [self.limit_header, self.left_header, self.reset_header]
        self.rate = self.capacity / 60.0
        if self.level > self.full:
            self.level = self.full

    def wait(self, need: float) -> float:
        """Seconds until ``need`` fits (the level refilled at ``now``)."""
        return (need - self.level) / self.rate

    def refresh(self) -> bool:
        """Bring ``left_header`` (the whole units left, 0 when overdrawn) and
        ``reset_header`` (the time until the bucket is full, as
        :func:`format_duration` writes it) up to the level, and ``pairs``
        with them (a new list); True when either changed. Only for a bucket
        with a capacity (``rate`` > 0)."""
        level = self.level
        left = int(level) if level > 0.0 else 0
        seconds = (self.full - level) / self.rate
        ms = int(seconds * 1000.0 + 0.999)  # what format_duration shows
        if left == self.left and ms == self.reset:
            return False
        if left != self.left:
            self.left = left
            self.left_header = (self.names[1], b"%d" % left)
        if ms != self.reset:
            self.reset = ms
            self.reset_header = (self.names[2], format_duration(seconds))
        self.pairs = [self.limit_header, self.left_header, self.reset_header]
        return True


class Rate:
    """The RPM and TPM buckets of one level (None where it sets no limit)."""

    __slots__ = ("id", "kind", "name", "rpm", "tpm")

    def __init__(self, kind: str, id: str, name: str = "") -> None:
        self.kind = kind
        self.id = id
        self.name = name or id  # what a refusal calls the level
        self.rpm: Bucket | None = None
        self.tpm: Bucket | None = None


_NAMES = {"key": "key", "team": "team", "org": "organization"}


def _refusal(rate: Rate, limit: str, bucket: Bucket, need: int, share: int) -> RateLimited:
    unit = "requests" if limit == "requests" else "tokens"
    where = f"{_NAMES.get(rate.kind, rate.kind)} '{rate.name}'"
    per = "RPM" if limit == "requests" else "TPM"
    worker = f" (this worker's share {bucket.capacity} of {bucket.limit})" if share > 1 else ""
    if bucket.capacity == 0:
        # limit // share == 0: no worker may serve any of it (see share_of).
        return RateLimited(
            f"Rate limit for {where} on {unit} per min ({per}) is {bucket.limit}, smaller "
            f"than the {share} worker processes that share it: none can be served. "
            f"Raise the limit to at least {share} or run fewer workers.",
            retry_after=None,
            limit=limit,
        )
    if bucket.capacity < need:
        # Can never fit, however long the caller waits: say so, as OpenAI does.
        return RateLimited(
            f"Request too large for {where} on {unit} per min ({per}): "
            f"Limit {bucket.capacity}{worker}, Requested {need}. "
            f"The input or output tokens must be reduced in order to run successfully.",
            retry_after=None,
            limit=limit,
        )
    left = max(0, int(bucket.level))
    return RateLimited(
        f"Rate limit reached for {where} on {unit} per min ({per}): Limit {bucket.limit}"
        f"{worker}, Used {bucket.capacity - left}, Requested {need}.",
        retry_after=max(1, math.ceil(bucket.wait(need))),
        limit=limit,
    )


def _bucket(bucket: Bucket | None, limit: int, share: int, now: float, unit: str) -> Bucket | None:
    """``bucket`` for a level whose limit is now ``limit`` (0: none), refilled."""
    if not limit:
        return None
    if bucket is None:
        return Bucket(limit, share, now, unit)
    if bucket.limit != limit:
        bucket.resize(limit, share)
    bucket.refill(now)
    return bucket


class RateLimits:
    """Every level's buckets, created on first use from the scope's limits.

    ``clock``: monotonic seconds (injectable for tests). ``share``: the number
    of worker processes enforcing the same limits independently.
    """

    __slots__ = ("_levels", "clock", "generation", "share")

    def __init__(self, *, clock: Clock = time.monotonic, share: int = 1) -> None:
        if share < 1:
            raise ValueError("share must be at least 1")
        self.clock = clock
        self.share = share
        self._levels: dict[tuple[str, str], Rate] = {}
        # Counts the times rate() replaced a bucket of an existing level.
        self.generation = 0

    def rate(self, scope: Scope, now: float) -> Rate | None:
        """The level's buckets, refilled to ``now`` and resized to the scope's
        current limits; None when the scope sets neither rpm nor tpm."""
        rpm, tpm = scope.rpm, scope.tpm
        if not rpm and not tpm:
            return None
        key = (scope.kind, scope.id)
        rate = self._levels.get(key)
        if rate is None:
            rate = self._levels[key] = Rate(scope.kind, scope.id, scope.name)
        # Created, resized or dropped to the scope's limits (a caller's plan is
        # resolved here once: the per-request refill is RateLimits.refill).
        before = rate.rpm, rate.tpm
        rate.rpm = _bucket(rate.rpm, rpm, self.share, now, "requests")
        rate.tpm = _bucket(rate.tpm, tpm, self.share, now, "tokens")
        if (rate.rpm is not before[0] or rate.tpm is not before[1]) and before != (None, None):
            # A bucket of a level already in use was created or dropped: plans
            # holding the level's old buckets (LocalGovernor's) are stale.
            self.generation += 1
        return rate

    def check(self, scopes: tuple[Scope, ...], tokens: int, now: float) -> list[Rate]:
        """The levels of ``scopes`` that limit something, if the request (one
        request, ``tokens`` tokens) fits all of them; else the RateLimited of
        the level that makes it wait longest (or that it can never fit)."""
        rates: list[Rate] = []
        for scope in scopes:
            rate = self.rate(scope, now)
            if rate is not None:
                rates.append(rate)
        self.verify(rates, tokens)
        return rates

    def verify(self, rates: list[Rate], tokens: int) -> None:
        """Nothing, if one request of ``tokens`` tokens fits every level of
        ``rates`` (refilled); else raise the RateLimited of the level that
        makes it wait longest (or that it can never fit)."""
        worst: tuple[float, Rate, str, Bucket, int] | None = None
        for rate in rates:
            bucket = rate.rpm
            if bucket is not None and bucket.level < 1:
                wait = bucket.wait(1) if bucket.capacity >= 1 else math.inf
                if worst is None or wait > worst[0]:
                    worst = (wait, rate, "requests", bucket, 1)
            bucket = rate.tpm
            if bucket is not None and bucket.level < tokens:
                wait = bucket.wait(tokens) if bucket.capacity >= tokens else math.inf
                if worst is None or wait > worst[0]:
                    worst = (wait, rate, "tokens", bucket, tokens)
        if worst is not None:
            raise _refusal(worst[1], worst[2], worst[3], worst[4], self.share)

    def correct(self, rates: list[Rate], delta: int) -> None:
        """Charge ``delta`` more tokens to every TPM bucket of ``rates`` (a
        negative delta refunds; the level never rises above the capacity)."""
        if not delta:
            return
        if delta < 0:
            # A refund needs no refill first: clamping at the capacity now or
            # after the next refill gives the same level, so the clock is not
            # read (the usual case: the answer was shorter than its estimate).
            for rate in rates:
                bucket = rate.tpm
                if bucket is not None:
                    level = bucket.level - delta
                    bucket.level = level if level < bucket.full else bucket.full
            return
        # A charge: refill first, so the refill it eats is clamped as it accrued.
        now = self.clock()
        for rate in rates:
            bucket = rate.tpm
            if bucket is not None:
                bucket.refill(now)
                bucket.level -= delta

    @staticmethod
    def headers(rates: list[Rate]) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for the tightest level per
        dimension (the smallest remaining fraction of its capacity), after the
        take; only for dimensions some level limits."""
        requests: Bucket | None = None
        tokens: Bucket | None = None
        least_requests = least_tokens = 2.0
        for rate in rates:
            bucket = rate.rpm
            if bucket is not None and bucket.capacity:
                fraction = bucket.level / bucket.full
                if fraction < least_requests:
                    requests, least_requests = bucket, fraction
            bucket = rate.tpm
            if bucket is not None and bucket.capacity:
                fraction = bucket.level / bucket.full
                if fraction < least_tokens:
                    tokens, least_tokens = bucket, fraction
        if requests is not None:
            requests.refresh()
            out = [requests.limit_header, requests.left_header, requests.reset_header]
            if tokens is not None:
                tokens.refresh()
                out += (tokens.limit_header, tokens.left_header, tokens.reset_header)
            return out
        if tokens is not None:
            tokens.refresh()
            return [tokens.limit_header, tokens.left_header, tokens.reset_header]
        return []
