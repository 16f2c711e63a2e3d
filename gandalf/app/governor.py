"""The in-process Governor: rate limits (app/limits.py) and budgets
(app/budget.py) behind the one seam the pipeline calls (app/governance.py).

:meth:`LocalGovernor.govern` (the pipeline's way in: the request's estimate,
then what ``admit`` does) and :meth:`LocalGovernor.admit` are synchronous:
they check every level of both (budgets first: an exhausted budget is the
answer a retry cannot change) and take from all of them (buckets taken from
are given back when one of them is overdrawn), with no ``await`` in between,
so on one event loop no two requests can both pass a check only one of them
fits.

State lives in this process. With ``gandalf serve --workers N`` each worker
process has its own governor enforcing a 1/N share of every limit and budget
(``share``; :func:`share_from_env` reads N from the environment ``gandalf
serve`` sets), so the workers together never exceed a limit.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import msgspec

from gandalf.app.budget import Budgets, Clock, Spend, SpendSource
from gandalf.app.governance import Estimate, Ticket
from gandalf.app.limits import ROOM, Bucket, Rate, RateLimits
from gandalf.domain import Identity, Scope
from gandalf.errors import QuotaExceeded

if TYPE_CHECKING:
    from gandalf.app.router import RouteEntry

ENV_WORKERS = "GANDALF_WORKERS"
# Output tokens assumed for a request without max_tokens (its worst case is
# unknown): see worst_case().
DEFAULT_OUTPUT_ALLOWANCE = 4096


def share_from_env(env: Mapping[str, str] | None = None) -> int:
    """The number of worker processes sharing the limits (``$GANDALF_WORKERS``,
    set by ``gandalf serve``; 1 when unset or not a positive integer)."""
    env = os.environ if env is None else env
    try:
        n = int(env.get(ENV_WORKERS) or 1)
    except ValueError:
        return 1
    return n if n >= 1 else 1


def worst_case(
    prompt_tokens: int,
    max_tokens: int | None,
    input_usd_per_token: float | None,
    output_usd_per_token: float | None,
    allowance: int = DEFAULT_OUTPUT_ALLOWANCE,
) -> Estimate:
    """The estimate of a request: the prompt plus ``max_tokens`` output
    tokens, or plus ``allowance`` when the request sets no ``max_tokens`` (its
    worst case is then unknown: the reservation covers ``allowance`` output
    tokens, and a longer answer overshoots the budget by its cost beyond
    them). ``usd`` None when the model is unpriced (either rate None)."""
    output = allowance if max_tokens is None else max_tokens
    usd = (
        None
        if input_usd_per_token is None or output_usd_per_token is None
        else prompt_tokens * input_usd_per_token + output * output_usd_per_token
    )
    return Estimate(tokens=prompt_tokens + output, usd=usd)


class Plan:
    """The levels of one scopes tuple, resolved once (:meth:`LocalGovernor.admit`):
    their budget states and their buckets laid out flat, RPM and TPM apart,
    in the scopes' order (the order that picks the headers' level on a tie)."""

    __slots__ = (
        "alone",
        "budget",
        "closed",
        "fresh",
        "grant",
        "rates",
        "requests",
        "single",
        "spends",
        "tokens",
    )

    def __init__(self, spends: list[Spend], rates: list[Rate]) -> None:
        self.spends = spends
        self.rates = rates  # the levels (shared with RateLimits), for refusals
        self.requests: tuple[Bucket, ...] = ()
        self.tokens: tuple[Bucket, ...] = ()
        self.single: Bucket | None = None
        self.alone: Bucket | None = None
        self.budget: Spend | None = None
        self.closed = False
        # A plan with no TPM bucket and no budget has nothing to settle: its
        # tickets differ only by their headers, and one closed Grant is reused
        # while they repeat (see LocalGovernor.govern and _take).
        self.grant: Grant | None = None
        self.fresh: Grant | None = None
        self.flatten()

    def flatten(self) -> None:
        """Lay the levels' current buckets out flat (again, when RateLimits
        created, dropped or resized a bucket of a level: its ``changed``
        hook). The levels themselves are kept, as before flattening, so
        requests still carrying a level's old scopes share its buckets with
        the new ones."""
        rates = self.rates
        self.requests = tuple(r.rpm for r in rates if r.rpm is not None)
        self.tokens = tuple(r.tpm for r in rates if r.tpm is not None)
        # A bucket of capacity 0 (a limit smaller than the worker count)
        # refuses every request: such a plan lays out no buckets and admit
        # refuses it before taking anything (``closed``).
        self.closed = any(not b.capacity for b in (*self.requests, *self.tokens))
        if self.closed:
            self.requests = self.tokens = ()
        # The commonest limited callers, a key's own rpm or tpm alone, have
        # their own paths in govern (``single``: the RPM bucket, ``alone``:
        # the TPM one).
        one = len(self.requests) + len(self.tokens) == 1 and not self.spends
        self.single = single = self.requests[0] if one and self.requests else None
        self.alone = self.tokens[0] if one and self.tokens else None
        # A single budget and no rate bucket (its own path too).
        alone_budget = len(self.spends) == 1 and not (self.closed or self.requests or self.tokens)
        self.budget = self.spends[0] if alone_budget else None
        self.grant = None
        # ``single``'s Grant after a take from a full bucket (its ``fresh``
        # pairs; a resize lays the plan out again).
        self.fresh = None if single is None else Grant(single.fresh, self, 0, 0.0, False)


class Grant(msgspec.Struct, gc=False):
    """The Ticket: what admit took (so settle and release can correct it) and
    the response's ``x-ratelimit-*`` headers (read only: a plan with nothing
    to settle hands the same Grant and headers to successive requests).
    Settled or released once; a second call does nothing. A Struct: built by
    msgspec's C constructor, a Python ``__init__`` less per limited request.
    Not tracked by the cycle collector (``gc=False``: a limited request's
    allocation less towards the next young collection); the one cycle through
    a Grant, a plan's reused Grant pointing back at its plan, lives as long
    as the governor's plans, which are never dropped."""

    headers: list[tuple[bytes, bytes]]
    plan: Plan
    tokens: int
    usd: float = 0.0
    open: bool = True


_NO_HEADERS: list[tuple[bytes, bytes]] = []


def _unpriced(entry: RouteEntry, tokens_in: int, tokens_out: int) -> float | None:
    """The default worst-case price hook: nothing is priced."""
    return None


# Below any time: where the search for the bucket full latest starts.
_NEVER = -math.inf


class LocalGovernor:
    """Rate limits and budgets of this process (the Governor protocol).

    ``share``: worker processes enforcing the same limits (each gets
    ``limit // share`` rpm/tpm and ``usd / share`` of a budget).
    ``monotonic``: the clock of the token buckets; ``wall``: the clock of the
    budget periods (both injectable for tests). ``price``: the worst-case
    price hook :meth:`govern` asks for a level with a budget (the pipeline
    sets its own: ``Pipeline``'s ``price``).
    """

    __slots__ = ("_monotonic", "_plans", "_wall", "budgets", "limits", "price")

    def __init__(
        self,
        *,
        share: int = 1,
        monotonic: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.limits = RateLimits(clock=monotonic, share=share)
        self.limits.changed = self._relayout
        self.budgets = Budgets(clock=wall, share=share)
        self._monotonic = monotonic
        self._wall = wall
        self.price: Callable[[RouteEntry, int, int], float | None] = _unpriced
        # scopes -> the Plan of their levels, resolved once: a caller's scopes
        # tuple is built once per key-cache fill, and equal scopes carry equal
        # limits, so the states (created, resized, rolled over by
        # Budgets.spend / RateLimits.rate) stay the right ones; every plan is
        # laid out again when a level had a bucket created, dropped or resized
        # (RateLimits.changed). One entry per distinct tuple (about one per key).
        self._plans: dict[tuple[Scope, ...], Plan] = {}

    def _relayout(self) -> None:
        """RateLimits.changed: lay every plan's buckets out again (rare: a
        level's limits changed), so :meth:`govern` never checks for it."""
        for plan in self._plans.values():
            plan.flatten()

    def govern(
        self, identity: Identity, entry: RouteEntry, body: bytes, max_output: int | None
    ) -> Grant:
        """The pipeline's ``govern`` on this governor: :meth:`admit` a
        request of ``identity`` (which has limits) with its estimate, as
        ``pipeline.estimate`` makes it (priced by :attr:`price` only when a
        level sets a budget). The commonest limited callers, a key's own rpm,
        tpm or budget alone (``Plan.single``, ``Plan.alone``, ``Plan.budget``),
        are admitted here with no Estimate and no further call: this runs for
        every limited request, and each bytecode counts."""
        plan = self._plans.get(identity.scopes)
        if plan is None:
            plan = self._plan(identity.scopes)
        single = plan.single
        if single is not None:  # _take for one RPM bucket
            now = self._monotonic()
            tat = single.tat
            if tat <= now:  # full: one fits (a single bucket has a capacity)
                single.tat = now + single.step
                return plan.fresh  # type: ignore[return-value]  # set with single
            tat += single.step
            if tat > now + ROOM:
                single.stamp = now
                self.limits.verify(plan.rates, 0)  # raises (no level counts tokens)
            single.tat = tat
            headers = single.show(tat, now)
            grant = plan.grant
            if grant is None or grant.headers is not headers:  # they changed
                grant = plan.grant = Grant(headers, plan, 0, 0.0, False)
            return grant
        tokens = len(body) // 4  # the prompt, as pipeline.estimate() counts it
        alone = plan.alone
        if alone is not None:  # _take for one TPM bucket
            if max_output:
                tokens += max_output
            now = self._monotonic()
            tat = alone.tat
            if tat <= now:  # full: from now (the pairs of a take this size kept)
                tat = now + tokens * alone.step
                if tat > now + ROOM:
                    alone.stamp = now
                    self.limits.verify(plan.rates, tokens)  # raises; nothing taken
                alone.tat = tat
                if alone.fresh_need == tokens:
                    return Grant(alone.fresh, plan, tokens)
                return Grant(alone.after(tat, now, tokens), plan, tokens)
            tat += tokens * alone.step
            if tat > now + ROOM:
                alone.stamp = now
                self.limits.verify(plan.rates, tokens)  # raises; nothing taken
            alone.tat = tat
            return Grant(alone.show(tat, now), plan, tokens)
        # The rest of pipeline.estimate(), written out (a call saved).
        budget = plan.budget
        if budget is not None:  # _take for one budget
            if max_output:
                usd = self.price(entry, tokens, max_output) or 0.0
                tokens += max_output
            else:
                usd = self.price(entry, tokens, DEFAULT_OUTPUT_ALLOWANCE) or 0.0
            now = self._wall()
            if now >= budget.until:
                budget.roll(now)
            room = budget.room
            if usd > room or room <= 0.0:  # over, or used up (an unpriced request)
                raise budget.refusal(usd)
            budget.room = room - usd
            return Grant(_NO_HEADERS, plan, tokens, usd)
        if not identity.budgeted:  # the worst-case cost only matters to a budget
            return self._take(plan, tokens + max_output if max_output else tokens, 0.0)
        price = self.price
        if max_output:
            return self._take(plan, tokens + max_output, price(entry, tokens, max_output) or 0.0)
        return self._take(plan, tokens, price(entry, tokens, DEFAULT_OUTPUT_ALLOWANCE) or 0.0)

    def admit(self, scopes: tuple[Scope, ...], estimate: Estimate) -> Grant:
        """Reserve one request, ``estimate.tokens`` tokens and ``estimate.usd``
        at every level of ``scopes``, or raise QuotaExceeded / RateLimited
        (and take nothing). Any plan's shape (:meth:`govern` takes the
        commonest two itself); the bucket arithmetic (Bucket.take, Bucket.fits)
        and the headers are written out over the plan's flat buckets."""
        plan = self._plans.get(scopes)
        if plan is None:
            plan = self._plan(scopes)
        return self._take(plan, estimate.tokens, estimate.usd or 0.0)

    def _take(self, plan: Plan, tokens: int, usd: float) -> Grant:
        """:meth:`admit` on ``plan``, laid out: a request of ``tokens`` tokens
        and ``usd`` (0.0: unpriced) at each of its levels, whatever its shape."""
        spends = plan.spends
        if spends:
            now = self._wall()
            for state in spends:
                if now >= state.until:
                    state.roll(now)
                room = state.room
                if usd > room or room <= 0.0:  # over, or used up (an unpriced request)
                    raise self._with_rates(plan, state.refusal(usd))
        requests, buckets = plan.requests, plan.tokens
        if not requests and not buckets:
            if plan.closed:  # a level's limit is smaller than the worker count
                self.limits.verify(plan.rates, tokens)  # raises
            if usd:
                for state in spends:
                    state.room -= usd
            return Grant(_NO_HEADERS, plan, tokens, usd)
        # Take from every bucket (GCRA: the time it is full again moves on by
        # the units' refill time, from now if it was full) and find the bucket
        # full latest per dimension: the tightest (every window is 60 s), the
        # first on a tie. A request that does not fit is taken back.
        now = self._monotonic()
        need = tokens + 0.0
        top = top_tokens = _NEVER
        tight: Bucket | None = None
        for bucket in requests:
            tat = bucket.tat
            if tat < now:
                tat = now
            tat += bucket.step
            bucket.tat = tat
            if tat > top:
                top = tat
                tight = bucket
        tight_tokens: Bucket | None = None
        for bucket in buckets:
            tat = bucket.tat
            if tat < now:
                tat = now
            tat += need * bucket.step
            bucket.tat = tat
            if tat > top_tokens:
                top_tokens = tat
                tight_tokens = bucket
        if top > now + ROOM or top_tokens > now + ROOM:
            self._untake(plan, now, tokens)  # raises the refusal; nothing taken
        # The tightest buckets' header pairs: those after a take from a full
        # bucket (full at now + the take's refill time) are kept as ``fresh``
        # (a bucket with room to spare is full at every request); else
        # Bucket.show (which reuses the pairs while they hold).
        headers = _NO_HEADERS
        if tight is not None:
            headers = tight.fresh if top == now + tight.step else tight.show(top, now)
        if tight_tokens is not None:
            if tight_tokens.fresh_need == need and top_tokens == now + need * tight_tokens.step:
                pairs = tight_tokens.fresh
            else:
                pairs = tight_tokens.after(top_tokens, now, need)
            headers = headers + pairs if headers else pairs
        elif not spends:
            # Nothing to settle: the last Grant serves while its headers hold.
            grant = plan.grant
            if grant is not None and grant.headers is headers:
                return grant
            grant = plan.grant = Grant(headers, plan, tokens, 0.0, False)
            return grant
        if usd:
            for state in spends:
                state.room -= usd
        return Grant(headers, plan, tokens, usd)

    def _with_rates(self, plan: Plan, refused: QuotaExceeded) -> QuotaExceeded:
        """``refused`` (a budget's) carrying the ``x-ratelimit-*`` headers of
        ``plan``'s rate limits, if it has any, as they stand now (nothing was
        taken): a refusal is a model call's answer too."""
        if plan.rates:
            now = self._monotonic()
            for rate in plan.rates:
                for bucket in (rate.rpm, rate.tpm):
                    if bucket is not None:
                        bucket.refill(now)
            refused.relayed = tuple(RateLimits.headers(plan.rates))
        return refused

    def _untake(self, plan: Plan, now: float, tokens: int) -> None:
        """Give back what admit's general path took from ``plan``'s buckets
        (each is then full at the same time as before, or at ``now`` if it was
        full before: the same level), then raise the refusal of the level
        that makes the request wait longest."""
        for bucket in plan.requests:
            bucket.tat -= bucket.step
            bucket.stamp = now
        need = tokens + 0.0
        for bucket in plan.tokens:
            bucket.tat -= need * bucket.step
            bucket.stamp = now
        self.limits.verify(plan.rates, tokens)
        raise AssertionError("a request over a bucket fits every level")  # pragma: no cover

    def _plan(self, scopes: tuple[Scope, ...]) -> Plan:
        """The states of ``scopes``' levels (created on first use)."""
        budgets, limits = self.budgets, self.limits
        wall, now = budgets.clock(), limits.clock()
        spends = [s for s in (budgets.spend(scope, wall) for scope in scopes) if s is not None]
        rates = [r for r in (limits.rate(scope, now) for scope in scopes) if r is not None]
        plan = Plan(spends, rates)
        self._plans[scopes] = plan
        return plan

    def settle(self, ticket: Ticket, tokens: int, usd: float | None) -> None:
        """The request was served: ``tokens`` (its real total) replace the
        estimate in the TPM buckets and ``usd`` (its cost; None: unpriced,
        counted as 0) the reservation in the budgets."""
        grant: Grant = ticket  # type: ignore[assignment]  # admit's own Ticket
        if not grant.open:
            return
        grant.open = False
        plan = grant.plan
        alone = plan.alone
        if alone is not None:  # one TPM bucket, nothing else: the loops below, for it
            delta = tokens - grant.tokens
            if delta < 0:
                alone.tat += delta * alone.step
            elif delta:
                now = self._monotonic()
                tat = alone.tat
                alone.tat = (tat if tat > now else now) + delta * alone.step
            return
        budget = plan.budget
        if budget is not None:  # one budget, nothing else: the spends loop below, for it
            spent = usd or 0.0
            budget.room += grant.usd - spent
            budget.paid += spent
            return
        delta = tokens - grant.tokens
        if delta and plan.tokens:
            if delta < 0:
                # A refund moves the time each bucket is full earlier; one
                # already past is full (read as its capacity): no clock needed.
                for bucket in plan.tokens:
                    bucket.tat += delta * bucket.step
            else:
                # A charge: from now, or from when the bucket is full if later.
                now = self._monotonic()
                for bucket in plan.tokens:  # Bucket.take, written out
                    tat = bucket.tat
                    bucket.tat = (tat if tat > now else now) + delta * bucket.step
        spends = plan.spends
        if spends:
            spent = usd or 0.0
            back = grant.usd - spent  # the reservation, less what it cost
            for state in spends:
                state.room += back
                state.paid += spent

    def release(self, ticket: Ticket) -> None:
        """The request failed: its tokens and its reservation are given back.
        It still counts as a request for RPM (it was made)."""
        grant: Grant = ticket  # type: ignore[assignment]
        if not grant.open:
            return
        grant.open = False
        plan = grant.plan
        if plan.tokens:
            self.limits.correct(plan.rates, -grant.tokens)
        if plan.spends:
            Budgets.release(plan.spends, grant.usd)

    async def rebuild(
        self, source: SpendSource, scopes: Iterable[Scope], now: float | None = None
    ) -> dict[tuple[str, str], float]:
        """Budgets.rebuild: the spend of each budget level's current period
        from the store (call at start, before serving)."""
        return await self.budgets.rebuild(source, scopes, now)
