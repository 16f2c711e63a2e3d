"""Requests-per-minute and tokens-per-minute limits: token buckets per level.

One :class:`Rate` per ``(kind, id)`` level (a key, a team, an org) holds up to
two buckets, RPM and TPM. A bucket's capacity is the limit per minute and it
refills at limit/60 per second. It is kept as a single time, when it will be
full again (GCRA's form of a token bucket), so the refill is computed lazily
from an injectable monotonic clock when the bucket is used (no timer task, no
sleeps). A full bucket lets a burst of up to the whole minute's limit through,
then one request (or token) every 60/limit seconds: the same shape OpenAI's
limits have.

A request must fit every level of its scopes: the governor
(:meth:`~gandalf.app.governor.LocalGovernor.admit`, which runs the bucket
arithmetic over a caller's buckets laid out flat) takes from all of them and,
if any is overdrawn, gives everything back (no level is charged for a request
another level refused) and raises :class:`~gandalf.errors.RateLimited` for the
one that would make the caller wait longest (:meth:`RateLimits.verify`). TPM is
charged the request's estimate up front and corrected with the real total when
it is known (:meth:`RateLimits.correct`): a refund, or a further charge that may
take the bucket below zero, so the requests after it wait until the overshoot
has refilled.

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


# The bucket arithmetic's slack, in seconds of refill: a request fits when its
# bucket holds enough within this much time. It absorbs the float rounding of
# the times (a bucket of 7 per minute holds 7 after 7 additions of 60/7 s, not
# 6.999999999999999) and lets through at most a microsecond's refill more.
SLACK = 1e-6
# A bucket is full again this long after the time it was last drawn to 0.
WINDOW = 60.0
# A take fits when its bucket is full again at most this long after now.
ROOM = WINDOW + SLACK


class Bucket:
    """A token bucket of ``capacity`` (this worker's share of the per-minute
    ``limit``), refilled at capacity/60 a second, kept as one time: ``tat``,
    when the bucket will be full again (GCRA's theoretical arrival time). A
    take of n units moves it to ``max(tat, now) + n * step`` (``step`` =
    60/capacity seconds a unit), and fits when that is at most a window
    (60 s) after now: one comparison and one addition a bucket, and since
    every bucket's window is the same the tightest bucket is simply the one
    full latest. The level at a time is ``capacity - (tat - time) / step``
    (``level``, at ``stamp``, the time the bucket was last looked at). It may
    be negative after a correction charged more tokens than were left. A
    capacity of 0 (a limit smaller than the worker count) refuses everything.
    """

    __slots__ = (
        "capacity",
        "fresh",
        "fresh_need",
        "full",
        "left",
        "left_header",
        "limit",
        "limit_header",
        "names",
        "pairs",
        "reset",
        "reset_header",
        "stamp",
        "step",
        "tat",
    )

    def __init__(self, limit: int, share: int, now: float, unit: str = "requests") -> None:
        self.names = _HEADER_NAMES[unit]
        self.tat = self.stamp = now  # full
        self._size(limit, share)

    def _size(self, limit: int, share: int) -> None:
        self.limit = limit
        self.capacity = capacity = share_of(limit, share)
        # Floats for the per-request arithmetic: a large int (a TPM limit above
        # 2**30) mixed with a float takes CPython's slow exact path.
        self.full = float(capacity)
        self.step = WINDOW / capacity if capacity else math.inf
        # The x-ratelimit-*-<unit> headers, each kept as the (name, value) pair
        # an answer carries: the limit changes only on a resize; remaining and
        # reset are rebuilt when they change (see show()), and the pairs after
        # a take of ``fresh_need`` from a full bucket are kept as ``fresh``:
        # a bucket with room to spare is full at every request.
        self.limit_header = (self.names[0], b"%d" % capacity)
        self.left = self.reset = -1
        self.left_header = (self.names[1], b"0")
        self.reset_header = (self.names[2], b"0s")
        self.pairs = [self.limit_header, self.left_header, self.reset_header]
        self.fresh_need = 1.0
        self.fresh = [
            self.limit_header,
            (self.names[1], b"%d" % max(capacity - 1, 0)),
            (self.names[2], format_duration(self.step if capacity else 0.0)),
        ]

    @property
    def level(self) -> float:
        """The units held at ``stamp`` (rounded to a millionth of a unit: the
        float noise of the times is not a level)."""
        ahead = self.tat - self.stamp
        if ahead <= 0.0:
            return self.full
        return round(self.full - ahead / self.step, 6)

    @level.setter
    def level(self, level: float) -> None:
        """Hold ``level`` units at ``stamp``."""
        if self.capacity:
            self.tat = self.stamp + (self.full - level) * self.step

    def refill(self, now: float) -> float:
        """Look at the bucket at ``now`` (``stamp``): its level then."""
        if now > self.stamp:
            self.stamp = now
        return self.level

    def resize(self, limit: int, share: int) -> None:
        """A changed limit: the new capacity, the level kept (clamped)."""
        level = self.level
        self._size(limit, share)
        self.level = level if level < self.full else self.full

    def fits(self, need: float) -> bool:
        """Whether ``need`` units fit at ``stamp`` (never, at a capacity of 0)."""
        if not self.capacity:
            return False
        tat = self.tat if self.tat > self.stamp else self.stamp
        return tat + need * self.step <= self.stamp + ROOM

    def wait(self, need: float) -> float:
        """Seconds after ``stamp`` until ``need`` fits (:meth:`fits`)."""
        tat = self.tat if self.tat > self.stamp else self.stamp
        return tat + need * self.step - (self.stamp + ROOM)

    def take(self, need: float, now: float) -> None:
        """Draw ``need`` units at ``now``, fitting or not (a correction)."""
        tat = self.tat
        self.tat = (tat if tat > now else now) + need * self.step

    def show(self, tat: float, now: float) -> list[tuple[bytes, bytes]]:
        """The header pairs of the bucket full at ``tat``, seen at ``now``:
        whole units left (0 when overdrawn, never above the capacity) and the
        time until full, as :func:`format_duration` writes it; the last pairs
        are reused while they hold. Only for a bucket with a capacity."""
        level = (now + ROOM - tat) / self.step
        left = (int(level) if level < self.full else self.capacity) if level > 0.0 else 0
        seconds = tat - now
        ms = int(seconds * 1000.0 + 0.999)  # what format_duration shows
        if left != self.left or ms != self.reset:
            if left != self.left:
                self.left = left
                self.left_header = (self.names[1], b"%d" % left)
            if ms != self.reset:
                self.reset = ms
                self.reset_header = (self.names[2], format_duration(seconds))
            self.pairs = [self.limit_header, self.left_header, self.reset_header]
        return self.pairs

    def after(self, tat: float, now: float, need: float) -> list[tuple[bytes, bytes]]:
        """:meth:`show` after a take of ``need`` that left the bucket full at
        ``tat``; when the bucket was full before it (``tat`` is ``now`` plus
        the take's refill time) the pairs are also kept as ``fresh``, for the
        next take of that size from a full bucket."""
        pairs = self.show(tat, now)
        if tat == now + need * self.step:
            self.fresh_need = need
            self.fresh = pairs
        return pairs

    def refresh(self) -> list[tuple[bytes, bytes]]:
        """:meth:`show` for the level at ``stamp`` (as another store, Redis,
        sets it)."""
        return self.show(self.tat if self.tat > self.stamp else self.stamp, self.stamp)


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
    """``bucket`` for a level whose limit is now ``limit`` (0: none), looked
    at ``now``; resized in place when the limit changed."""
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

    __slots__ = ("_levels", "changed", "clock", "share")

    def __init__(self, *, clock: Clock = time.monotonic, share: int = 1) -> None:
        if share < 1:
            raise ValueError("share must be at least 1")
        self.clock = clock
        self.share = share
        self._levels: dict[tuple[str, str], Rate] = {}
        # Called when rate() created, dropped or resized a bucket of a level
        # already in use (LocalGovernor lays its plans out again then, so its
        # per-request path never checks whether they are stale).
        self.changed: Callable[[], None] | None = None

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
        # resolved here once: the per-request take is LocalGovernor.admit's).
        before = rate.rpm, rate.tpm
        sizes = [b.limit if b is not None else 0 for b in before]
        rate.rpm = _bucket(rate.rpm, rpm, self.share, now, "requests")
        rate.tpm = _bucket(rate.tpm, tpm, self.share, now, "tokens")
        if before != (None, None) and (
            rate.rpm is not before[0] or rate.tpm is not before[1] or sizes != [rpm, tpm]
        ):
            # A bucket of a level already in use was created, dropped or
            # resized: plans holding the level's buckets (LocalGovernor's) are
            # stale (their layout, or which buckets refuse everything).
            changed = self.changed
            if changed is not None:
                changed()
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
        ``rates`` (each looked at its ``stamp``); else raise the RateLimited
        of the level that makes it wait longest (or that it can never fit),
        carrying the levels' ``x-ratelimit-*`` headers as they stand (a
        refusal is a model call's answer too, and OpenAI's 429s carry them)."""
        worst: tuple[float, Rate, str, Bucket, int] | None = None
        for rate in rates:
            bucket = rate.rpm
            if bucket is not None and not bucket.fits(1.0):
                wait = bucket.wait(1.0) if bucket.capacity >= 1 else math.inf
                if worst is None or wait > worst[0]:
                    worst = (wait, rate, "requests", bucket, 1)
            bucket = rate.tpm
            if bucket is not None and not bucket.fits(tokens):
                capacity = bucket.capacity
                wait = bucket.wait(tokens) if capacity and capacity >= tokens else math.inf
                if worst is None or wait > worst[0]:
                    worst = (wait, rate, "tokens", bucket, tokens)
        if worst is not None:
            refused = _refusal(worst[1], worst[2], worst[3], worst[4], self.share)
            refused.relayed = tuple(self.headers(rates))
            raise refused

    def correct(self, rates: list[Rate], delta: int) -> None:
        """Charge ``delta`` more tokens to every TPM bucket of ``rates`` (a
        negative delta refunds; a bucket never holds more than its capacity)."""
        if not delta:
            return
        if delta < 0:
            # A refund moves the time the bucket is full earlier; one already
            # past is full (its level read as the capacity): no clock needed.
            for rate in rates:
                bucket = rate.tpm
                if bucket is not None and bucket.capacity:
                    bucket.tat += delta * bucket.step
            return
        # A charge: from now, or from when the bucket is full if later.
        now = self.clock()
        for rate in rates:
            bucket = rate.tpm
            if bucket is not None and bucket.capacity:
                bucket.take(delta, now)

    @staticmethod
    def headers(rates: list[Rate]) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for the tightest level per
        dimension (the smallest remaining fraction of its capacity, each
        bucket seen at its ``stamp``), after the take; only for dimensions
        some level limits. (LocalGovernor.admit does this over its own take.)"""
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
        out: list[tuple[bytes, bytes]] = []
        if requests is not None:
            out += requests.refresh()
        if tokens is not None:
            out += tokens.refresh()
        return out
