"""The request pipeline: the stages every model call goes through.

::

    admit      identity -> route: the one permission check (``allowed_models``,
               before the route is resolved, so a 403 comes before any 404 or
               503), the route, and the governor (rate limits, budget
               reservation) when the caller has limits
    cache      a deterministic request on a caching route answered from the
               response cache (app/cache.py; :meth:`Pipeline.hit` accounts it)
    coalesce   identical deterministic requests share one call (app/coalesce.py)
    serve      ``Failover.serve``: the only attempt code; an Outcome, or an
               error that carries the same facts (app/failover.py)
    account    one UsageRecord per request, whatever its outcome, with its
               cost; the governor's ticket settled (or released)

Chat completions, streams and embeddings (app/proxy.py) and the native APIs
(app/passthrough.py) all use these; each stage has one home, so limits,
budgets, cost, a cache or metrics hook in at one place.

Hooks, injected once at start-up (defaults make each one free when unused):

- ``governor``: :class:`~gandalf.app.governance.Governor`, or None. Called
  only for an identity whose ``scopes`` is non-empty: a caller without limits
  costs one tuple truth test.
- ``price``: ``price_worst_case(entry, tokens_in, tokens_out) -> float | None``,
  the worst-case USD of a request on ``entry`` (the dearest target), reserved
  against budgets; None when unpriced (the default).
- ``cost``: ``cost(provider, target_model, usage) -> float | None``, a served
  request's USD from its usage (cached and reasoning tokens at their own
  prices); None when unpriced (the default). Written to ``cost_usd``.
- ``verdict``: ``verdict(result)``, the response cache's ``hit`` / ``miss`` /
  ``bypass`` for a request on a caching route; None by default.
- ``observe``: ``observe(record)``, called with each request's UsageRecord
  once it is built (metrics and the access log read it); None by default,
  then not called.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from gandalf.app.failover import failure_of
from gandalf.app.governance import Estimate, Governor, SharedGovernor, Ticket
from gandalf.app.governor import DEFAULT_OUTPUT_ALLOWANCE, LocalGovernor
from gandalf.app.router import RouteEntry, RouteTable
from gandalf.domain import CANCEL_SHUTDOWN, Identity, Usage, UsageRecord, replace_ratelimits
from gandalf.errors import GatewayError, PermissionDenied

__all__ = [
    "CostOf",
    "Observe",
    "Pipeline",
    "PriceWorstCase",
    "UsageSink",
    "estimate",
    "failure_status",
    "no_cost",
    "no_price",
    "tell",
]


class UsageSink(Protocol):
    def record_usage(self, record: UsageRecord) -> None: ...


PriceWorstCase = Callable[[RouteEntry, int, int], "float | None"]
CostOf = Callable[[str, str, Usage], "float | None"]
Observe = Callable[[UsageRecord], object]
Verdict = Callable[[str], object]  # the response cache's verdict: hit | miss | bypass
Govern = Callable[[Identity, RouteEntry, bytes, "int | None"], "Ticket | None"]


_NOTHING = Usage()  # the counts of a request nothing served (read only)


def no_price(entry: RouteEntry, tokens_in: int, tokens_out: int) -> float | None:
    """The default ``price`` hook: nothing is priced."""
    return None


def _no_ticket(ticket: Ticket, tokens: int, usd: float | None) -> None:
    """``Pipeline._settle`` without a governor: no request has a ticket."""
    raise AssertionError("a ticket without a governor")


def no_cost(provider: str, model: str, usage: Usage) -> float | None:
    """The default ``cost`` hook: nothing is priced."""
    return None


def estimate(
    entry: RouteEntry, body: bytes, max_output: int | None, price: PriceWorstCase | None = no_price
) -> Estimate:
    """What a request may cost at worst, before the upstream call.

    ``price`` None: nothing to reserve (``usd`` None).

    Prompt tokens are estimated as ``len(body) // 4`` (about four bytes of
    JSON per token; no tokenizer on the hot path). Output tokens are the
    request's own limit (``max_completion_tokens`` / ``max_tokens``, times
    the choices asked for: the callers multiply it by ``n``).

    Without a limit the output is unknown. TPM (a rate) is charged the prompt
    only up front and the real count when the request settles. Budgets (a hard
    cap) reserve ``DEFAULT_OUTPUT_ALLOWANCE`` output tokens at the output
    price, so a budget is overshot only by answers longer than that, by at
    most (requests in flight without a limit) x (their output beyond the
    allowance) x (output price).
    """
    tokens_in = len(body) // 4
    if price is None:  # no budget to reserve against: the tokens alone
        return Estimate(tokens=tokens_in + max_output if max_output else tokens_in, usd=None)
    if max_output:
        return Estimate(tokens=tokens_in + max_output, usd=price(entry, tokens_in, max_output))
    return Estimate(tokens=tokens_in, usd=price(entry, tokens_in, DEFAULT_OUTPUT_ALLOWANCE))


def failure_status(exc: BaseException) -> int:
    """The status a request's usage record gets when ``exc`` ended it."""
    if isinstance(exc, GatewayError):
        return exc.status
    if isinstance(exc, asyncio.CancelledError):
        # 503: cut off by the shutdown deadline; 499: the client went away (nginx's code).
        return 503 if exc.args and exc.args[0] == CANCEL_SHUTDOWN else 499
    return 500


class Pipeline:
    """The stages around the upstream call, built once per service: ``admit``
    before it, ``account`` / ``failed`` after it."""

    __slots__ = (
        "_clock",
        "_cost",
        "_governor",
        "_observe",
        "_price",
        "_settle",
        "_shared",
        "_sink",
        "_verdict",
        "govern",
        "local",
    )

    def __init__(
        self,
        sink: UsageSink,
        *,
        clock: Callable[[], float] = time.time,
        governor: Governor | None = None,
        price: PriceWorstCase = no_price,
        cost: CostOf = no_cost,
        observe: Observe | None = None,
        verdict: Verdict | None = None,
    ) -> None:
        self._sink = sink
        self._observe = observe
        self._verdict = verdict
        self._clock = clock
        self._governor = governor
        # A shared governor (Redis) is awaited through govern_shared; callers
        # test ``local`` (one attribute) only for a caller with limits.
        self._shared = governor if isinstance(governor, SharedGovernor) else None
        self.local = self._shared is None
        self._price = price
        # The default hook is not called at all: a call per request for a None.
        self._cost: CostOf | None = None if cost is no_cost else cost
        # govern(identity, entry, body, max_output) -> Ticket | None: the
        # governor's ticket for a request on ``entry`` (raising its 429s), for
        # a caller with limits (``identity.scopes``) on a local governor
        # (:attr:`local`). The in-process governor's own LocalGovernor.govern
        # (the estimate and the admission in one call: a Python frame less
        # per limited request), handed this pipeline's price hook (a bound
        # method: a functools.partial would cost a C-level call into a new
        # interpreter frame); any other governor's admit with
        # :func:`estimate`; None without a governor.
        if isinstance(governor, LocalGovernor):
            governor.price = price
            self.govern: Govern = governor.govern
        else:
            self.govern = self._estimate_and_admit
        # settle(ticket, tokens, usd): the governor's, for account (a ticket
        # comes only from a governor).
        self._settle: Callable[[Ticket, int, float | None], None] = (
            _no_ticket if governor is None else governor.settle
        )

    # ------------------------------------------------------------------ admit

    @staticmethod
    def route(routes: RouteTable, identity: Identity, alias: str) -> RouteEntry:
        """The route of ``alias`` for ``identity``: the one permission check.
        The key's permission comes first: a model outside its ``allowed_models``
        is a 403 whatever the state of that model's providers (a 503 naming an
        operator's env var would tell a stranger about a route it may not use)."""
        if not identity.may_use(alias):
            raise PermissionDenied(
                f"This API key is not allowed to use model '{alias}'.", param="model"
            )
        return routes.resolve(alias)

    def _estimate_and_admit(
        self, identity: Identity, entry: RouteEntry, body: bytes, max_output: int | None
    ) -> Ticket | None:
        """:attr:`govern` for a governor other than the in-process one."""
        governor = self._governor
        if governor is None:
            return None
        return governor.admit(identity.scopes, self._estimate(identity, entry, body, max_output))

    def _estimate(
        self, identity: Identity, entry: RouteEntry, body: bytes, max_output: int | None
    ) -> Estimate:
        """:func:`estimate`, priced only when a level of ``identity`` sets a budget."""
        return estimate(entry, body, max_output, self._price if identity.budgeted else None)

    async def govern_shared(
        self, identity: Identity, entry: RouteEntry, body: bytes, max_output: int | None
    ) -> Ticket | None:
        """:attr:`govern` through the shared governor (one round trip to it);
        call only when :attr:`local` is False."""
        shared = self._shared
        if not identity.scopes or shared is None:
            return None
        estimated = self._estimate(identity, entry, body, max_output)
        return await shared.admit_shared(identity.scopes, estimated)

    def admit(
        self,
        routes: RouteTable,
        identity: Identity,
        alias: str,
        body: bytes,
        max_output: int | None,
    ) -> tuple[RouteEntry, Ticket | None]:
        """:meth:`route`, then :attr:`govern`: the route and the ticket (None
        when nothing limits the caller)."""
        entry = self.route(routes, identity, alias)
        if not identity.scopes:  # the common case: no limits, no governor call
            return entry, None
        return entry, self.govern(identity, entry, body, max_output)

    # ------------------------------------------------------------------ account

    def account(
        self,
        identity: Identity,
        alias: str,
        request_id: str,
        started: float,
        endpoint: str,
        provider: str | None,
        model: str | None,
        usage: Usage | None,
        status: int,
        attempts: int,
        ticket: Ticket | None,
    ) -> None:
        """The one UsageRecord of a request (handed over with a synchronous
        ``put_nowait``, never awaited), its cost from the ``cost`` hook, and
        its ticket settled with the tokens and cost used when the request was
        served (status below 400), or when a failure still used tokens (a
        stream cut short after relaying part of its answer: those were
        spent); else released (nothing was used).

        ``provider`` / ``model``: who served (or failed last), None when no
        upstream was tried; ``usage``: None when nothing was served;
        ``started``: ``time.perf_counter()`` at arrival; ``attempts``: upstream
        attempts made (0: the request shared a coalesced call)."""
        cost: float | None = None
        counts = _NOTHING if usage is None else usage
        if usage is not None:
            price = self._cost
            if price is not None and provider is not None and model is not None:
                cost = price(provider, model, usage)
        record = UsageRecord(
            request_id,
            identity.key_id,
            identity.org_id,
            alias,
            model,
            provider,
            counts.prompt_tokens,
            counts.completion_tokens,
            counts.total_tokens,
            (time.perf_counter() - started) * 1000.0,
            status,
            self._clock(),
            endpoint,
            attempts,
            identity.team_id,
            counts.cached_prompt_tokens,
            counts.cache_write_tokens,
            counts.reasoning_tokens,
            cost,
        )
        self._sink.record_usage(record)
        observe = self._observe
        if observe is not None:
            observe(record)
        if ticket is not None and ticket.open:  # a closed one has nothing to settle
            if status < 400 or counts.total_tokens:
                self._settle(ticket, counts.total_tokens, cost)
            else:
                governor = self._governor
                assert governor is not None  # a ticket comes from it
                governor.release(ticket)

    def hit(
        self,
        identity: Identity,
        alias: str,
        request_id: str,
        started: float,
        provider: str,
        model: str,
        usage: Usage,
        ticket: Ticket | None,
        endpoint: str = "chat",
    ) -> None:
        """The UsageRecord of a request (``endpoint``) answered from the
        response cache: status 200, no attempt, ``cache_hit``, ``cost_usd`` 0
        and ``saved_usd`` what the same usage costs on ``provider`` / ``model``
        (the ``cost`` hook). The tokens are the cached answer's. The ticket
        is settled with 0 tokens and 0 USD: a hit counts for RPM (taken at
        admission, never refunded) but not for TPM or budgets."""
        price = self._cost
        saved = price(provider, model, usage) if price is not None else None
        record = UsageRecord(
            request_id,
            identity.key_id,
            identity.org_id,
            alias,
            model,
            provider,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            (time.perf_counter() - started) * 1000.0,
            200,
            self._clock(),
            endpoint,
            0,
            identity.team_id,
            usage.cached_prompt_tokens,
            usage.cache_write_tokens,
            usage.reasoning_tokens,
            0.0,
            True,
            saved,
        )
        self._sink.record_usage(record)
        observe = self._observe
        if observe is not None:
            observe(record)
        verdict = self._verdict
        if verdict is not None:
            verdict("hit")
        if ticket is not None:
            governor = self._governor
            assert governor is not None  # a ticket comes from it
            governor.settle(ticket, 0, 0.0)

    def verdict(self, label: tuple[bytes, bytes]) -> None:
        """The response cache's ``x-gandalf-cache`` header for this request
        (hit / miss / bypass), handed to the ``verdict`` hook (the access log's
        ``cache`` field and the cache metric) when there is one."""
        verdict = self._verdict
        if verdict is not None:
            verdict(label[1].decode("ascii"))

    def failed(
        self,
        identity: Identity,
        alias: str,
        request_id: str,
        started: float,
        endpoint: str,
        exc: BaseException,
        ticket: Ticket | None,
        follower: bool = False,
        shared: bool = False,
    ) -> None:
        """:meth:`account` for a request that ``exc`` ended before an answer:
        the provider, model and attempts the failure carries
        (:func:`~gandalf.app.failover.failure_of`), and :meth:`tell` the
        client its limits. ``shared``: ``exc`` is a coalesced call's, raised to
        every waiter (so not annotated here); ``follower``: this request only
        waited for that call (it made no attempt)."""
        provider, model, attempts = failure_of(exc)
        self.account(
            identity,
            alias,
            request_id,
            started,
            endpoint,
            provider,
            model,
            None,
            failure_status(exc),
            0 if follower else attempts,
            ticket,
        )
        if ticket is not None and not shared:
            tell(exc, ticket)


def tell(exc: BaseException, ticket: Ticket) -> None:
    """Add the ticket's ``x-ratelimit-*`` headers to the error response
    ``exc`` becomes (a model call's answer carries them, failed or not), in
    place of the upstream's own (an upstream 429 relays its
    ``x-ratelimit-*``: a client must not read two values for one header).
    Only for an exception this request alone raises."""
    if isinstance(exc, GatewayError) and ticket.headers:
        exc.relayed = replace_ratelimits(exc.relayed, ticket.headers)
