"""Failover: one request's attempts across its route's targets.

:meth:`Failover.route` walks the targets in the order the route's strategy
gives (app/balancer.py), skipping any whose provider's circuit breaker refuses
(app/breaker.py). A failed attempt is classified (app/health.py): the caller's
own errors end the request at once; anything another target may answer moves
on to the next target, without waiting. Once every target was tried, and while
the route's ``max_attempts`` allows, the targets that may be retried are tried
again in the same order, each after a full-jitter backoff, or the upstream's
``Retry-After`` when that is within the backoff cap (longer: that target is
not retried), and only while its provider's retry budget allows (app/retry.py).
Each failover or retry is one attempt.

:meth:`Failover.serve` is the same with the first attempt made directly, as
``ProxyService.chat`` does inline on its hot path.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from gandalf.app.balancer import Slot, plan
from gandalf.app.health import classify, retry_after_of
from gandalf.app.retry import Backoff, parse_retry_after
from gandalf.app.router import RouteEntry
from gandalf.errors import CircuitOpen, GatewayError, printable

__all__ = ["Attempts", "Failover", "observe"]

logger = logging.getLogger("gandalf.resilience")

_T = TypeVar("_T")


class Attempts(Generic[_T]):
    """One request's way through its route once it left the fast path: the
    slot tried last, the attempts so far, the request's id (for the log line
    of each failed attempt), whether a retry was refused by a provider's retry
    budget, and (for a coalesced call, which hands its outcome to several
    waiters) the result or the error."""

    __slots__ = ("attempts", "denied", "error", "request_id", "result", "slot")

    def __init__(self, slot: Slot | None = None, attempts: int = 0, request_id: str = "") -> None:
        self.slot = slot
        self.attempts = attempts
        self.request_id = request_id
        self.denied = False
        self.result: _T | None = None
        self.error: GatewayError | None = None


def observe(slot: Slot, started: float, ended: float) -> None:
    """An attempt on a least-latency route answered: one fewer in flight, one
    more latency sample."""
    stats = slot.latency
    stats.outstanding -= 1
    stats.observe(ended - started, ended)


class Failover:
    """The routing loop, with time and chance injected: ``monotonic`` for
    breakers and latency, ``clock`` (wall time) for HTTP-date Retry-After,
    ``rng`` for backoff jitter and per-request orders, ``sleep`` for the waits."""

    __slots__ = ("_backoff", "_clock", "_monotonic", "_rng", "_sleep")

    def __init__(
        self,
        backoff: Backoff,
        *,
        monotonic: Callable[[], float],
        clock: Callable[[], float],
        rng: random.Random,
        sleep: Callable[[float], Awaitable[object]],
    ) -> None:
        self._backoff = backoff
        self._monotonic = monotonic
        self._clock = clock
        self._rng = rng
        self._sleep = sleep

    async def serve(
        self,
        entry: RouteEntry,
        invoke: Callable[[Slot], Awaitable[_T]],
        run: Attempts[_T],
        now: float,
    ) -> _T:
        """Serve with ``invoke``: the first attempt goes straight to the route's
        first choice when its breaker allows (the healthy case, which
        ``ProxyService.chat`` does inline), anything else through :meth:`route`."""
        slot = entry.fast or entry.pick(now, self._rng)
        if slot is None or not (slot.breaker.closed or slot.breaker.allows(now)):
            return await self.route(entry, invoke, run, now)
        run.slot = slot
        run.attempts = 1
        track = entry.tracks_latency
        if track:
            slot.latency.outstanding += 1
        try:
            result = await invoke(slot)
        except GatewayError as exc:
            if track:
                slot.latency.outstanding -= 1
            return await self.route(entry, invoke, run, now, exc)
        except BaseException:
            if track:
                slot.latency.outstanding -= 1
            slot.breaker.release(now)
            raise
        if track:
            observe(slot, now, self._monotonic())
        slot.breaker.record_success(now)
        return result

    async def route(
        self,
        entry: RouteEntry,
        invoke: Callable[[Slot], Awaitable[_T]],
        run: Attempts[_T],
        now: float,
        failed: GatewayError | None = None,
    ) -> _T:
        """Try ``entry``'s targets with ``invoke`` until one answers; ``run``
        follows the attempts. ``failed``: the first attempt, on ``run.slot``
        (the entry's fast slot), already failed with it at ``now``.

        Raises the caller's own error at once, the last upstream error when
        every allowed attempt failed, or CircuitOpen when no target could be
        tried at all."""
        rng = self._rng
        order = entry.order
        queue = list(order) if order is not None else plan(entry.strategy, entry.tiers, now, rng)
        retries: list[tuple[Slot, float]] = []  # (slot, not before): may be tried again
        last: GatewayError | None = None
        if failed is not None:
            assert run.slot is not None
            if run.slot in queue:
                queue.remove(run.slot)
            last = self._failed(run.slot, failed, now, run, retries)
        limit = entry.max_attempts
        track = entry.tracks_latency
        retry_number = 0
        while run.attempts < limit:
            if queue:
                slot = queue.pop(0)
            elif retries:
                slot, not_before = retries.pop(0)
                # Another attempt on a provider this request already tried: a
                # retry, within that provider's budget, after a backoff.
                if not slot.breaker.available(now):
                    continue
                if not slot.budget.allow_retry(now):
                    run.denied = True  # the provider is failing for many: no retry from anyone
                    continue
                wait = max(self._backoff.delay(retry_number, rng), not_before - now)
                retry_number += 1
                if wait > 0:
                    await self._sleep(wait)
                    now = self._monotonic()
            else:
                break
            breaker = slot.breaker
            if not breaker.allows(now):
                continue
            run.slot = slot
            run.attempts += 1
            stats = slot.latency
            if track:
                stats.outstanding += 1
            try:
                result = await invoke(slot)
            except GatewayError as exc:
                end = self._monotonic()
                if track:
                    stats.outstanding -= 1
                last = self._failed(slot, exc, end, run, retries)
                now = end
                continue
            except BaseException:
                if track:
                    stats.outstanding -= 1
                breaker.release(now)
                raise
            end = self._monotonic()
            if track:
                observe(slot, now, end)
            breaker.record_success(end)
            return result
        if last is None:
            raise self.circuit_open(entry, now)
        last.attempts = run.attempts
        if run.attempts > 1 or run.denied:
            last.final = True
        raise last

    def _failed(
        self,
        slot: Slot,
        exc: GatewayError,
        now: float,
        run: Attempts[_T],
        retries: list[tuple[Slot, float]],
    ) -> GatewayError:
        """Account for a failed attempt; raise ``exc`` when no other attempt may
        help, else return it, with ``slot`` queued for a retry when that may help."""
        failure = classify(exc)
        slot.breaker.record(failure.weight, now)
        exc.upstream = slot.name
        exc.attempts = run.attempts
        # Said to the client as ``x-should-retry: false`` (errors.py): once more
        # than one attempt was made, or when a retry cannot cure the failure.
        exc.final = run.attempts > 1 or not failure.client_retry
        if logger.isEnabledFor(logging.WARNING):
            logger.warning(
                "upstream attempt %d failed: provider %r, model %s, status %d (%s): %s "
                "(request %s)",
                run.attempts,
                printable(slot.name),
                printable(slot.target.model),
                exc.status,
                failure.kind,
                printable(exc.message, 300),
                run.request_id,
            )
        if not failure.failover:
            raise exc
        if failure.retry:
            after = parse_retry_after(retry_after_of(exc), self._clock())
            if after is None:
                retries.append((slot, now))
            elif after <= self._backoff.cap:
                retries.append((slot, now + after))
            # else: the provider asked for longer than a retry may wait; other targets only.
        return exc

    def circuit_open(self, entry: RouteEntry, now: float) -> CircuitOpen:
        names = sorted({slot.name for slot in entry.slots})
        wait = min((slot.breaker.retry_in(now) for slot in entry.slots), default=1.0)
        seconds = max(1, math.ceil(wait))
        which = ", ".join(repr(name) for name in names)
        return CircuitOpen(
            f"No provider can serve model '{entry.alias}' right now: the circuit breaker of "
            f"{'provider' if len(names) == 1 else 'providers'} {which} is open after repeated "
            f"failures; retry in {seconds}s.",
            retry_after=seconds,
        )
