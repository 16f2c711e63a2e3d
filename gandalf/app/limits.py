"""Requests-per-minute and tokens-per-minute limits: token buckets per level.

One :class:`Rate` per ``(kind, id)`` level (a key, a team, an org) holds up to
two buckets, RPM and TPM. A bucket's capacity is the limit per minute and it
refills at limit/60 per second, computed lazily from an injectable monotonic
clock when it is looked at (no timer task, no sleeps). A full bucket lets a
burst of up to the whole minute's limit through, then one request (or token)
every 60/limit seconds: the same shape OpenAI's limits have.

A request must fit every level of its scopes: :meth:`RateLimits.admit` looks
at all of them first and raises :class:`~gandalf.errors.RateLimited` for the
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


class Bucket:
    """A token bucket: ``level`` of ``capacity``, refilled at ``rate`` a second.

    ``limit`` is the configured per-minute limit (to notice a change);
    ``capacity`` is this worker's share of it. A capacity of 0 (a limit
    smaller than the worker count) refuses everything. ``level`` may be
    negative after a correction charged more tokens than were left.
    """

    __slots__ = (
        "capacity",
        "label",
        "left",
        "left_value",
        "level",
        "limit",
        "rate",
        "reset",
        "reset_value",
        "stamp",
    )

    def __init__(self, limit: int, share: int, now: float) -> None:
        self.limit = limit
        self.capacity = share_of(limit, share)
        self.label = b"%d" % self.capacity  # the x-ratelimit-limit-* value
        self.rate = self.capacity / 60.0
        self.level = float(self.capacity)
        self.stamp = now
        # The last x-ratelimit-remaining-* / reset-* values and what they were
        # made from: a busy bucket's level and refill time often repeat, and
        # formatting them is most of what a header costs (see headers()).
        self.left = -1
        self.left_value = b"0"
        self.reset = -1  # milliseconds
        self.reset_value = b"0s"

    def refill(self, now: float) -> float:
        """The level at ``now`` (stored), never above the capacity."""
        elapsed = now - self.stamp
        if elapsed > 0:
            level = self.level + elapsed * self.rate
            self.level = level if level < self.capacity else float(self.capacity)
            self.stamp = now
        return self.level

    def resize(self, limit: int, share: int) -> None:
        """A changed limit: the new capacity, the level kept (clamped)."""
        self.limit = limit
        self.capacity = share_of(limit, share)
        self.label = b"%d" % self.capacity
        self.rate = self.capacity / 60.0
        if self.level > self.capacity:
            self.level = float(self.capacity)

    def wait(self, need: float) -> float:
        """Seconds until ``need`` fits (the level refilled at ``now``)."""
        return (need - self.level) / self.rate


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


def _bucket(bucket: Bucket | None, limit: int, share: int, now: float) -> Bucket | None:
    """``bucket`` for a level whose limit is now ``limit`` (0: none), refilled."""
    if not limit:
        return None
    if bucket is None:
        return Bucket(limit, share, now)
    if bucket.limit != limit:
        bucket.resize(limit, share)
    bucket.refill(now)
    return bucket


class RateLimits:
    """Every level's buckets, created on first use from the scope's limits.

    ``clock``: monotonic seconds (injectable for tests). ``share``: the number
    of worker processes enforcing the same limits independently.
    """

    __slots__ = ("_levels", "clock", "share")

    def __init__(self, *, clock: Clock = time.monotonic, share: int = 1) -> None:
        if share < 1:
            raise ValueError("share must be at least 1")
        self.clock = clock
        self.share = share
        self._levels: dict[tuple[str, str], Rate] = {}

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
        rate.rpm = _bucket(rate.rpm, rpm, self.share, now)
        rate.tpm = _bucket(rate.tpm, tpm, self.share, now)
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
                    bucket.level = level if level < bucket.capacity else float(bucket.capacity)
            return
        # A charge: refill first, so the refill it eats is clamped as it accrued.
        now = self.clock()
        for rate in rates:
            bucket = rate.tpm
            if bucket is not None:
                bucket.refill(now)
                bucket.level -= delta

    def admit(self, rates: list[Rate], tokens: int) -> list[tuple[bytes, bytes]]:
        """:meth:`refill`, :meth:`verify`, :meth:`take` and :meth:`headers` in
        one pass: take one request and ``tokens`` tokens from every level of
        ``rates`` if they fit all of them (else raise, taking nothing) and
        return the ``x-ratelimit-*`` headers. This runs for every limited
        request, so the loops are written out."""
        now = self.clock()
        fits = True
        for rate in rates:
            bucket = rate.rpm
            if bucket is not None:
                elapsed = now - bucket.stamp
                if elapsed > 0:
                    level = bucket.level + elapsed * bucket.rate
                    bucket.level = level if level < bucket.capacity else float(bucket.capacity)
                    bucket.stamp = now
                if bucket.level < 1:
                    fits = False
            bucket = rate.tpm
            if bucket is not None:
                elapsed = now - bucket.stamp
                if elapsed > 0:
                    level = bucket.level + elapsed * bucket.rate
                    bucket.level = level if level < bucket.capacity else float(bucket.capacity)
                    bucket.stamp = now
                if bucket.level < tokens:
                    fits = False
        if not fits:
            self.verify(rates, tokens)  # raises the refusal of the level that waits longest
        for rate in rates:
            if rate.rpm is not None:
                rate.rpm.level -= 1
            if rate.tpm is not None:
                rate.tpm.level -= tokens
        return self.headers(rates)

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
                fraction = bucket.level / bucket.capacity
                if fraction < least_requests:
                    requests, least_requests = bucket, fraction
            bucket = rate.tpm
            if bucket is not None and bucket.capacity:
                fraction = bucket.level / bucket.capacity
                if fraction < least_tokens:
                    tokens, least_tokens = bucket, fraction
        if requests is not None:
            out = [
                (b"x-ratelimit-limit-requests", requests.label),
                (b"x-ratelimit-remaining-requests", _remaining(requests)),
                (b"x-ratelimit-reset-requests", _reset(requests)),
            ]
            if tokens is not None:
                out += (
                    (b"x-ratelimit-limit-tokens", tokens.label),
                    (b"x-ratelimit-remaining-tokens", _remaining(tokens)),
                    (b"x-ratelimit-reset-tokens", _reset(tokens)),
                )
            return out
        if tokens is not None:
            return [
                (b"x-ratelimit-limit-tokens", tokens.label),
                (b"x-ratelimit-remaining-tokens", _remaining(tokens)),
                (b"x-ratelimit-reset-tokens", _reset(tokens)),
            ]
        return []


def _remaining(bucket: Bucket) -> bytes:
    """``x-ratelimit-remaining-*``: the whole units left (0 when overdrawn),
    formatted only when it changed since the bucket's last header."""
    level = bucket.level
    left = int(level) if level > 0 else 0
    if left != bucket.left:
        bucket.left = left
        bucket.left_value = b"%d" % left
    return bucket.left_value


def _reset(bucket: Bucket) -> bytes:
    """``x-ratelimit-reset-*``: the time until the bucket is full
    (:func:`format_duration`), formatted only when it changed."""
    seconds = (bucket.capacity - bucket.level) / bucket.rate
    ms = int(seconds * 1000 + 0.999)  # what format_duration shows
    if ms != bucket.reset:
        bucket.reset = ms
        bucket.reset_value = format_duration(seconds)
    return bucket.reset_value
