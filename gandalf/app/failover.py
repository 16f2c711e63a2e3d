"""Failover: one request's attempts across its route's targets.

The failover loop walks the targets in the order the route's strategy
gives (app/balancer.py), skipping any whose provider's circuit breaker refuses
(app/breaker.py). A failed attempt is classified (app/health.py): the caller's
own errors end the request at once; anything another target may answer moves
on to the next target, without waiting. Once every target was tried, and while
the route's ``max_attempts`` allows, the targets that may be retried are tried
again in the same order, each after a full-jitter backoff, or the upstream's
``Retry-After`` when that is within the backoff cap (longer: that target is
not retried), and only while its provider's retry budget allows (app/retry.py).
Each failover or retry is one attempt.

:meth:`Failover.serve` is the only attempt code of the request pipeline
(app/pipeline.py): the healthy first attempt made directly (a closed-breaker
first pick costs a clock read, a flag test and a success count over a plain
call), anything else through the loop. It returns an :class:`Outcome`; a
failure raises an exception that carries the same facts (:func:`failure_of`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

import msgspec

from gandalf.app.balancer import Slot, plan
from gandalf.app.health import classify, retry_after_of
from gandalf.app.retry import Backoff, parse_retry_after
from gandalf.app.router import RouteEntry
from gandalf.errors import CircuitOpen, GatewayError, printable

__all__ = ["AttemptHook", "AttemptTracer", "Failover", "Outcome", "failure_of", "observe"]

logger = logging.getLogger("gandalf.resilience")

# ``attempt(slot, seconds, ok)``: one upstream attempt on ``slot`` ended (metrics).
AttemptHook = Callable[[Slot, float, bool], object]


class AttemptTracer(Protocol):
    """Wraps each upstream attempt in a span (observability/tracing.py): ``begin``
    before the call (it may set what the call forwards upstream), ``end`` after
    it with the exception that ended it (None: it answered) and its result."""

    def begin(self, slot: Slot) -> object: ...

    def end(self, span: object, error: BaseException | None, result: object) -> None: ...


_T = TypeVar("_T")
_A = TypeVar("_A")


class Outcome(msgspec.Struct, Generic[_T]):
    """What serving a request gave: the ``value`` (a reply or a stream), the
    ``slot`` that served it and the upstream ``attempts`` it took (0: it shared
    another request's call). ``headers``: response headers the pipeline adds
    for the client (the governor ticket's ``x-ratelimit-*``), empty when none."""

    value: _T
    slot: Slot
    attempts: int
    headers: Sequence[tuple[bytes, bytes]] = ()

    @property
    def provider(self) -> str:
        """The provider that served (for ``x-gandalf-provider``)."""
        return self.slot.name


def failure_of(exc: BaseException) -> tuple[str | None, str | None, int]:
    """(provider, its model, attempts) of the last attempt a failure came from,
    as :meth:`Failover.serve` left them on the exception: a GatewayError's
    ``upstream`` / ``upstream_model`` / ``attempts``; the same attributes on an
    exception that ended an attempt from outside (a cancellation: the client
    went away, the server shuts down). (None, None, 0) when no attempt was made."""
    return (
        getattr(exc, "upstream", None),
        getattr(exc, "upstream_model", None),
        getattr(exc, "attempts", 0),
    )


def _interrupted(exc: BaseException, slot: Slot, attempts: int) -> None:
    """An attempt on ``slot`` ended by ``exc`` (not a GatewayError: typically a
    cancellation): leave the facts of :func:`failure_of` on it. Exceptions
    accept attributes; this is the one place that sets them on foreign ones."""
    if isinstance(exc, GatewayError):  # a bug path: GatewayErrors are handled per attempt
        exc.upstream, exc.upstream_model, exc.attempts = slot.name, slot.target.model, attempts
        return
    exc.upstream = slot.name  # type: ignore[attr-defined]
    exc.upstream_model = slot.target.model  # type: ignore[attr-defined]
    exc.attempts = attempts  # type: ignore[attr-defined]


def observe(slot: Slot, started: float, ended: float) -> None:
    """An attempt on a least-latency route answered: one fewer in flight, one
    more latency sample."""
    stats = slot.latency
    stats.outstanding -= 1
    stats.observe(ended - started, ended)


class Failover:
    """The routing loop, with time and chance injected: ``monotonic`` for
    breakers and latency, ``clock`` (wall time) for HTTP-date Retry-After,
    ``rng`` for backoff jitter and per-request orders, ``sleep`` for the waits.
    ``attempt``: told of each attempt's duration and outcome (None: not called;
    an attempt ended by a cancellation is not told). ``tracer``: a span around
    each attempt (None: tracing off)."""

    __slots__ = ("_attempt", "_backoff", "_clock", "_monotonic", "_rng", "_sleep", "_tracer")

    def __init__(
        self,
        backoff: Backoff,
        *,
        monotonic: Callable[[], float],
        clock: Callable[[], float],
        rng: random.Random,
        sleep: Callable[[float], Awaitable[object]],
        attempt: AttemptHook | None = None,
        tracer: AttemptTracer | None = None,
    ) -> None:
        self._attempt = attempt
        self._tracer = tracer
        self._backoff = backoff
        self._monotonic = monotonic
        self._clock = clock
        self._rng = rng
        self._sleep = sleep

    async def serve(
        self,
        entry: RouteEntry,
        invoke: Callable[[Slot, _A], Awaitable[_T]],
        arg: _A,
        request_id: str,
        now: float,
    ) -> Outcome[_T]:
        """Serve with ``invoke(slot, arg)`` (a module-level function and its
        per-request argument: no closure per request): the first attempt goes
        straight to the route's first choice when its breaker allows (the
        healthy case), anything else through the failover loop.

        Returns the Outcome; raises the caller's own error at once, the last
        upstream error when every allowed attempt failed (both carrying
        ``upstream`` / ``upstream_model`` / ``attempts``), CircuitOpen when no
        target could be tried, or whatever ended an attempt from outside (a
        cancellation), with the same facts on it (:func:`failure_of`)."""
        slot = entry.fast or entry.pick(now, self._rng)
        if slot is None or not (slot.breaker.closed or slot.breaker.allows(now)):
            return await self._route(entry, invoke, arg, request_id, now, None, None)
        track = entry.tracks_latency
        if track:
            slot.latency.outstanding += 1
        tracer = self._tracer
        if tracer is not None:
            return await self._traced(entry, invoke, arg, request_id, now, slot, tracer)
        try:
            result = await invoke(slot, arg)
        except GatewayError as exc:
            if track:
                slot.latency.outstanding -= 1
            hook = self._attempt
            if hook is not None:
                hook(slot, self._monotonic() - now, False)
            return await self._route(entry, invoke, arg, request_id, now, slot, exc)
        except BaseException as exc:
            if track:
                slot.latency.outstanding -= 1
            slot.breaker.release(now)
            _interrupted(exc, slot, 1)
            raise
        hook = self._attempt
        if track or hook is not None:
            ended = self._monotonic()
            if track:
                observe(slot, now, ended)
            if hook is not None:
                hook(slot, ended - now, True)
        slot.breaker.record_success(now)
        return Outcome(result, slot, 1)

    async def _traced(
        self,
        entry: RouteEntry,
        invoke: Callable[[Slot, _A], Awaitable[_T]],
        arg: _A,
        request_id: str,
        now: float,
        slot: Slot,
        tracer: AttemptTracer,
    ) -> Outcome[_T]:
        """:meth:`serve`'s first attempt inside a span (tracing on): the same
        steps, kept apart so the untraced path pays nothing for it."""
        track = entry.tracks_latency
        span = tracer.begin(slot)
        try:
            result = await invoke(slot, arg)
        except GatewayError as exc:
            tracer.end(span, exc, None)
            if track:
                slot.latency.outstanding -= 1
            hook = self._attempt
            if hook is not None:
                hook(slot, self._monotonic() - now, False)
            return await self._route(entry, invoke, arg, request_id, now, slot, exc)
        except BaseException as exc:
            tracer.end(span, exc, None)
            if track:
                slot.latency.outstanding -= 1
            slot.breaker.release(now)
            _interrupted(exc, slot, 1)
            raise
        tracer.end(span, None, result)
        hook = self._attempt
        if track or hook is not None:
            ended = self._monotonic()
            if track:
                observe(slot, now, ended)
            if hook is not None:
                hook(slot, ended - now, True)
        slot.breaker.record_success(now)
        return Outcome(result, slot, 1)

    async def _route(
        self,
        entry: RouteEntry,
        invoke: Callable[[Slot, _A], Awaitable[_T]],
        arg: _A,
        request_id: str,
        now: float,
        first: Slot | None,
        failed: GatewayError | None,
    ) -> Outcome[_T]:
        """Try ``entry``'s targets with ``invoke`` until one answers.
        ``first``: the slot whose attempt (the first) already failed with
        ``failed`` at ``now``; None when no attempt was made yet."""
        rng = self._rng
        order = entry.order
        queue = list(order) if order is not None else plan(entry.strategy, entry.tiers, now, rng)
        retries: list[tuple[Slot, float]] = []  # (slot, not before): may be tried again
        last: GatewayError | None = None
        attempts = 0
        denied = False  # a retry was refused by a provider's retry budget
        tried = first  # the slot of the last attempt
        if first is not None and failed is not None:
            if first in queue:
                queue.remove(first)
            attempts = 1
            last = self._failed(first, failed, now, attempts, request_id, retries)
        limit = entry.max_attempts
        track = entry.tracks_latency
        retry_number = 0
        while attempts < limit:
            if queue:
                slot = queue.pop(0)
            elif retries:
                slot, not_before = retries.pop(0)
                # Another attempt on a provider this request already tried: a
                # retry, within that provider's budget, after a backoff.
                if not slot.breaker.available(now):
                    continue
                if not slot.budget.allow_retry(now):
                    denied = True  # the provider is failing for many: no retry from anyone
                    continue
                wait = max(self._backoff.delay(retry_number, rng), not_before - now)
                retry_number += 1
                if wait > 0:
                    try:
                        await self._sleep(wait)
                    except BaseException as exc:
                        if tried is not None:  # cancelled while waiting: the last attempt's facts
                            _interrupted(exc, tried, attempts)
                        raise
                    now = self._monotonic()
            else:
                break
            breaker = slot.breaker
            if not breaker.allows(now):
                continue
            attempts += 1
            tried = slot
            stats = slot.latency
            if track:
                stats.outstanding += 1
            # ``now`` may be older than this attempt (a failed first one): time it alone.
            began = self._monotonic() if self._attempt is not None else now
            tracer = self._tracer
            span = tracer.begin(slot) if tracer is not None else None
            try:
                result = await invoke(slot, arg)
            except GatewayError as exc:
                if tracer is not None:
                    tracer.end(span, exc, None)
                end = self._monotonic()
                if track:
                    stats.outstanding -= 1
                if self._attempt is not None:
                    self._attempt(slot, end - began, False)
                last = self._failed(slot, exc, end, attempts, request_id, retries)
                now = end
                continue
            except BaseException as exc:
                if tracer is not None:
                    tracer.end(span, exc, None)
                if track:
                    stats.outstanding -= 1
                breaker.release(now)
                _interrupted(exc, slot, attempts)
                raise
            if tracer is not None:
                tracer.end(span, None, result)
            end = self._monotonic()
            if track:
                observe(slot, now, end)
            if self._attempt is not None:
                self._attempt(slot, end - began, True)
            breaker.record_success(end)
            return Outcome(result, slot, attempts)
        if last is None:
            raise self.circuit_open(entry, now)
        last.attempts = attempts
        if attempts > 1 or denied:
            last.final = True
        raise last

    def _failed(
        self,
        slot: Slot,
        exc: GatewayError,
        now: float,
        attempts: int,
        request_id: str,
        retries: list[tuple[Slot, float]],
    ) -> GatewayError:
        """Account for failed attempt number ``attempts``; raise ``exc`` when no
        other attempt may help, else return it, with ``slot`` queued for a
        retry when that may help."""
        failure = classify(exc)
        slot.breaker.record(failure.weight, now)
        exc.upstream = slot.name
        exc.upstream_model = slot.target.model
        exc.attempts = attempts
        # Said to the client as ``x-should-retry: false`` (errors.py): once more
        # than one attempt was made, or when a retry cannot cure the failure.
        exc.final = attempts > 1 or not failure.client_retry
        if logger.isEnabledFor(logging.WARNING):
            logger.warning(
                "upstream attempt %d failed: provider %r, model %s, status %d (%s): %s "
                "(request %s)",
                attempts,
                printable(slot.name),
                printable(slot.target.model),
                exc.status,
                failure.kind,
                printable(exc.message, 300),
                request_id,
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
