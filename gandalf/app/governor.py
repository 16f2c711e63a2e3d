"""The in-process Governor: rate limits (app/limits.py) and budgets
(app/budget.py) behind the one seam the pipeline calls (app/governance.py).

:meth:`LocalGovernor.admit` is synchronous: it checks every level of both
(budgets first: an exhausted budget is the answer a retry cannot change),
then takes from all of them, with no ``await`` in between, so on one event
loop no two requests can both pass a check only one of them fits.

State lives in this process. With ``gandalf serve --workers N`` each worker
process has its own governor enforcing a 1/N share of every limit and budget
(``share``; :func:`share_from_env` reads N from the environment ``gandalf
serve`` sets), so the workers together never exceed a limit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

from gandalf.app.budget import Budgets, Clock, Spend, SpendSource
from gandalf.app.governance import Estimate, Ticket
from gandalf.app.limits import Rate, RateLimits
from gandalf.domain import Scope

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


class Grant:
    """The Ticket: what admit took (so settle and release can correct it) and
    the response's ``x-ratelimit-*`` headers. Settled or released once; a
    second call does nothing."""

    __slots__ = ("headers", "open", "rates", "spends", "tokens", "usd")

    def __init__(
        self,
        headers: list[tuple[bytes, bytes]],
        rates: list[Rate],
        tokens: int,
        spends: list[Spend],
        usd: float,
    ) -> None:
        self.headers = headers
        self.rates = rates
        self.tokens = tokens
        self.spends = spends
        self.usd = usd
        self.open = True


class LocalGovernor:
    """Rate limits and budgets of this process (the Governor protocol).

    ``share``: worker processes enforcing the same limits (each gets
    ``limit // share`` rpm/tpm and ``usd / share`` of a budget).
    ``monotonic``: the clock of the token buckets; ``wall``: the clock of the
    budget periods (both injectable for tests).
    """

    __slots__ = ("_plans", "budgets", "limits")

    def __init__(
        self,
        *,
        share: int = 1,
        monotonic: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.limits = RateLimits(clock=monotonic, share=share)
        self.budgets = Budgets(clock=wall, share=share)
        # scopes -> their levels' budget and bucket states, resolved once: a
        # caller's scopes tuple is built once per key-cache fill, and equal
        # scopes carry equal limits, so the states (created, resized, rolled
        # over by Budgets.spend / RateLimits.rate) stay the right ones. One
        # entry per distinct tuple (about one per key).
        self._plans: dict[tuple[Scope, ...], tuple[list[Spend], list[Rate]]] = {}

    def admit(self, scopes: tuple[Scope, ...], estimate: Estimate) -> Grant:
        """Reserve one request, ``estimate.tokens`` tokens and ``estimate.usd``
        at every level of ``scopes``, or raise QuotaExceeded / RateLimited
        (and take nothing)."""
        plan = self._plans.get(scopes)
        if plan is None:
            plan = self._plans[scopes] = self._plan(scopes)
        spends, rates = plan
        usd = estimate.usd or 0.0
        if spends:
            now = self.budgets.clock()
            for state in spends:
                if now >= state.until:
                    state.roll(now)
                committed = state.spent + state.reserved
                if committed >= state.limit or committed + usd > state.limit:
                    raise state.refusal(usd)
        tokens = estimate.tokens
        if rates:
            headers = self.limits.admit(rates, tokens)  # may raise: nothing taken yet
            if usd:
                Budgets.take(spends, usd)
            return Grant(headers, rates, tokens, spends, usd)
        if usd:
            Budgets.take(spends, usd)
        return Grant([], rates, tokens, spends, usd)

    def _plan(self, scopes: tuple[Scope, ...]) -> tuple[list[Spend], list[Rate]]:
        """The states of ``scopes``' levels (created on first use)."""
        budgets, limits = self.budgets, self.limits
        wall, now = budgets.clock(), limits.clock()
        spends = [s for s in (budgets.spend(scope, wall) for scope in scopes) if s is not None]
        rates = [r for r in (limits.rate(scope, now) for scope in scopes) if r is not None]
        return spends, rates

    def settle(self, ticket: Ticket, tokens: int, usd: float | None) -> None:
        """The request was served: ``tokens`` (its real total) replace the
        estimate in the TPM buckets and ``usd`` (its cost; None: unpriced,
        counted as 0) the reservation in the budgets."""
        grant: Grant = ticket  # type: ignore[assignment]  # admit's own Ticket
        if not grant.open:
            return
        grant.open = False
        if grant.rates:
            self.limits.correct(grant.rates, tokens - grant.tokens)
        if grant.spends:
            Budgets.settle(grant.spends, grant.usd, usd or 0.0)

    def release(self, ticket: Ticket) -> None:
        """The request failed: its tokens and its reservation are given back.
        It still counts as a request for RPM (it was made)."""
        grant: Grant = ticket  # type: ignore[assignment]
        if not grant.open:
            return
        grant.open = False
        if grant.rates:
            self.limits.correct(grant.rates, -grant.tokens)
        if grant.spends:
            Budgets.release(grant.spends, grant.usd)

    async def rebuild(
        self, source: SpendSource, scopes: Iterable[Scope], now: float | None = None
    ) -> dict[tuple[str, str], float]:
        """Budgets.rebuild: the spend of each budget level's current period
        from the store (call at start, before serving)."""
        return await self.budgets.rebuild(source, scopes, now)
