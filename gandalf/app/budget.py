"""Budgets: USD per level over a calendar period (UTC), reserved before the
upstream call and settled to the actual cost after.

One :class:`Spend` per ``(kind, id)`` level that sets a budget. A request
reserves its worst-case cost (``Estimate.usd``) at every budget level of its
scopes; it is refused (:class:`~gandalf.errors.QuotaExceeded`) when, at some
level, ``spent + reserved + this`` would exceed the limit, so concurrent
requests on one event loop can never together commit more than the budget.
When it is served the reservation is replaced by the actual cost
(:meth:`Budgets.settle`); when it fails the reservation is dropped
(:meth:`Budgets.release`). An unpriced request (``usd`` None) reserves 0 but
is still refused once the budget is spent.

Periods: ``daily`` (00:00 UTC), ``weekly`` (Monday 00:00 UTC), ``monthly``
(the 1st, 00:00 UTC), ``total`` (never resets). The wall clock is injectable;
a period's end is computed once, so the per-request rollover test is one
comparison; at rollover ``spent`` restarts from 0 (reservations in flight
stay reserved and settle into the new period).

Spend survives a restart: :meth:`Budgets.rebuild` reads each level's spend in
its current period from the usage table (:class:`SpendSource`).

With several worker processes each enforces ``usd / share`` of every budget
and starts from ``spent / share``: the parts add up to the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Protocol

from gandalf.domain import Budget, Scope
from gandalf.errors import QuotaExceeded

Clock = Callable[[], float]

DAY = 86400.0
_INF = float("inf")


class SpendSource(Protocol):
    """What the store answers for a rebuild: the USD recorded for one level
    (``kind`` "key" | "team" | "org", its id) since a unix time."""

    async def spend_since(self, kind: str, id: str, since: float) -> float: ...


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """``(start, end)`` in unix seconds of the UTC period holding ``now``."""
    if period == "daily":
        start = now - now % DAY
        return start, start + DAY
    if period == "weekly":
        day = int(now // DAY)
        monday = day - (day + 3) % 7  # 1970-01-01 was a Thursday (weekday 3)
        return monday * DAY, (monday + 7) * DAY
    if period == "monthly":
        at = datetime.fromtimestamp(now, UTC)
        first = datetime(at.year, at.month, 1, tzinfo=UTC)
        after = datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=UTC)
        return first.timestamp(), after.timestamp()
    if period == "total":
        return 0.0, _INF
    raise ValueError(f"unknown budget period {period!r}")


_NAMES = {"key": "key", "team": "team", "org": "organization"}
_PERIODS = {
    "daily": "daily (UTC day)",
    "weekly": "weekly (UTC week from Monday)",
    "monthly": "monthly (UTC calendar month)",
    "total": "total",
}


class Spend:
    """One level's budget: this worker's ``limit`` (USD), ``spent`` in the
    current period (which ends at ``until``) and ``reserved`` in flight.

    Kept as ``paid`` (what ``spent`` reads) and ``room``, the USD left to
    commit (``limit - spent - reserved``): a request fits when its worst case
    is at most ``room`` (and ``room`` is above 0), one comparison, and taking
    and settling it are one addition each. ``spent`` and ``reserved`` read
    and write through them (``reserved`` never reads below 0)."""

    __slots__ = ("budget", "id", "kind", "limit", "name", "paid", "room", "until")

    def __init__(
        self, kind: str, id: str, budget: Budget, share: int, now: float, name: str = ""
    ) -> None:
        self.kind = kind
        self.id = id
        self.name = name or id  # what a refusal calls the level
        self.budget = budget
        self.limit = budget.usd / share
        self.paid = 0.0
        self.room = self.limit
        self.until = period_bounds(budget.period, now)[1]

    @property
    def spent(self) -> float:
        """USD spent in the current period."""
        return self.paid

    @spent.setter
    def spent(self, usd: float) -> None:
        """Spent ``usd`` in the period (what is reserved kept)."""
        reserved = self.reserved
        self.paid = usd
        self.room = self.limit - usd - reserved

    @property
    def reserved(self) -> float:
        """USD reserved by requests in flight."""
        left = self.limit - self.paid - self.room
        return left if left > 0.0 else 0.0

    @reserved.setter
    def reserved(self, usd: float) -> None:
        self.room = self.limit - self.paid - usd

    def resize(self, limit: float) -> None:
        """A changed budget: the new ``limit``, spent and reserved kept."""
        reserved = self.reserved
        self.limit = limit
        self.room = limit - self.paid - reserved

    def roll(self, now: float) -> None:
        """A new period began: nothing spent in it yet."""
        self.spent = 0.0
        self.until = period_bounds(self.budget.period, now)[1]

    def refusal(self, usd: float) -> QuotaExceeded:
        """The 429 for a request of worst case ``usd`` that does not fit:
        names the level, the budget, its period and what is left."""
        budget = self.budget
        where = f"{_NAMES.get(self.kind, self.kind)} '{self.name}'"
        share = f" (this worker's share ${self.limit:.4f})" if self.limit != budget.usd else ""
        period = _PERIODS.get(budget.period, budget.period)
        counted = f"${self.spent:.4f} spent, ${self.reserved:.4f} reserved by requests in flight"
        left = self.limit - self.spent - self.reserved
        if left <= 0:
            state = f"is used up ({counted})"
        else:
            state = (
                f"has ${left:.4f} left ({counted}) and this request may cost up to ${usd:.4f} "
                f"(its prompt and max_tokens at the model's price): lower max_tokens or wait"
            )
        return QuotaExceeded(
            f"You exceeded your current quota: the {period} budget of ${budget.usd:.2f} "
            f"for {where}{share} {state}. It renews when the period ends."
        )


class Budgets:
    """Every level's budget, created on first use from the scope's budget.

    ``clock``: wall-clock unix seconds (injectable for tests). ``share``: the
    number of worker processes enforcing the same budgets independently.
    """

    __slots__ = ("_levels", "_loaded", "clock", "share")

    def __init__(self, *, clock: Clock = time.time, share: int = 1) -> None:
        if share < 1:
            raise ValueError("share must be at least 1")
        self.clock = clock
        self.share = share
        self._levels: dict[tuple[str, str], Spend] = {}
        # Spend read from the store (all workers' together) and when it was read,
        # for levels not yet seen: used only if still in the same period.
        self._loaded: dict[tuple[str, str], tuple[float, float]] = {}

    def spend(self, scope: Scope, now: float) -> Spend | None:
        """The level's budget state at ``now`` (rolled over, updated to the
        scope's current budget); None when the scope sets no budget."""
        budget = scope.budget
        if budget is None:
            return None
        key = (scope.kind, scope.id)
        state = self._levels.get(key)
        if state is None:
            state = self._levels[key] = Spend(
                scope.kind, scope.id, budget, self.share, now, scope.name
            )
            loaded = self._loaded.pop(key, None)
            if loaded is not None and period_bounds(budget.period, loaded[1])[1] == state.until:
                state.spent = loaded[0] / self.share
        elif state.budget is not budget:
            if state.budget != budget:
                state.resize(budget.usd / self.share)
                if state.budget.period != budget.period:
                    # What was spent belongs to another period: only a rebuild knows.
                    state.until = period_bounds(budget.period, now)[1]
            state.budget = budget
        if now >= state.until:
            state.roll(now)
        return state

    def check(self, scopes: tuple[Scope, ...], usd: float, now: float) -> list[Spend]:
        """The budget levels of ``scopes`` if ``usd`` more fits every one;
        else QuotaExceeded for the first (narrowest) level it does not fit."""
        spends: list[Spend] = []
        for scope in scopes:
            state = self.spend(scope, now)
            if state is None:
                continue
            room = state.room
            if usd > room or room <= 0.0:
                raise state.refusal(usd)
            spends.append(state)
        return spends

    @staticmethod
    def take(spends: list[Spend], usd: float) -> None:
        """Reserve ``usd`` at every level (after :meth:`check`, no ``await`` between)."""
        if usd:
            for state in spends:
                state.room -= usd

    @staticmethod
    def settle(spends: list[Spend], reserved: float, usd: float) -> None:
        """The reservation replaced by the actual cost ``usd``."""
        back = reserved - usd
        for state in spends:
            state.room += back
            state.paid += usd

    @staticmethod
    def release(spends: list[Spend], reserved: float) -> None:
        """The reservation dropped (the request failed: nothing to pay)."""
        if reserved:
            for state in spends:
                state.room += reserved

    def load(self, spent: Mapping[tuple[str, str], float], now: float | None = None) -> None:
        """Spend already recorded in each level's current period (all workers
        together, as the usage table has it), read at ``now``. A level already
        in use keeps the larger of what it counted itself and its share of this
        (requests served since start may or may not be in the table yet)."""
        now = self.clock() if now is None else now
        for key, total in spent.items():
            state = self._levels.get(key)
            if state is None:
                self._loaded[key] = (total, now)
            elif period_bounds(state.budget.period, now)[1] == state.until:
                state.spent = max(state.spent, total / self.share)

    async def rebuild(
        self, source: SpendSource, scopes: Iterable[Scope], now: float | None = None
    ) -> dict[tuple[str, str], float]:
        """Read from ``source`` what each budget level of ``scopes`` spent in
        its current period and :meth:`load` it; returns what was read. Call at
        start, before serving, with every scope that sets a budget (each
        ``(kind, id)`` is read once)."""
        now = self.clock() if now is None else now
        spent: dict[tuple[str, str], float] = {}
        for scope in scopes:
            key = (scope.kind, scope.id)
            if scope.budget is None or key in spent:
                continue
            since = period_bounds(scope.budget.period, now)[0]
            spent[key] = await source.spend_since(scope.kind, scope.id, since)
        self.load(spent, now)
        return spent
