"""ProxyService: resolve the alias, route across its targets, emit one usage record.

Routing (app/failover.py). A request tries its route's targets in the order
the route's strategy gives (app/balancer.py: priority tiers first), skipping
any whose provider's circuit breaker is open (app/breaker.py); a failure that
another target may answer (app/health.py) moves on to the next target, and
targets are retried within ``max_attempts``, after a backoff, within their
provider's retry budget (app/retry.py). A stream fails over only while it is
being opened: once the provider returned it, its bytes may have reached the
client. Identical deterministic requests on a ``coalesce`` route share one
upstream call (app/coalesce.py). The healthy first attempt is made inline
here (the hot path); everything else is the failover loop's.

The answer says who served it: ``ProviderReply.provider`` / ``attempts``
(``RecordedStream.provider`` / ``attempts``), and an upstream error carries
``upstream`` / ``attempts``; the server turns them into ``x-gandalf-provider``
and ``x-gandalf-attempts`` headers.

Accounting. Every request that reaches the service leaves exactly one
UsageRecord, whatever its outcome; the record is handed over with a
synchronous ``put_nowait`` and never awaited. It names the provider that served
(or failed last) and the number of upstream attempts (0 for a request that
shared a coalesced call). A stream's record is written when the stream ends:
its status says how (200, an upstream error's status, 499 client gone, 503
shutdown).

Time and chance are injected: ``monotonic`` (breakers, budgets, latency),
``clock`` (wall time for usage records and HTTP-date Retry-After), ``rng``
(backoff jitter, weighted and P2C picks) and ``sleep`` (the backoff waits), so
tests run the whole policy without waiting.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec

from gandalf.app.balancer import Slot
from gandalf.app.breaker import BreakerSnapshot
from gandalf.app.coalesce import Coalescer, is_deterministic
from gandalf.app.failover import Attempts, Failover, observe
from gandalf.app.health import STREAM_FAILURE_WEIGHTS
from gandalf.app.retry import Backoff
from gandalf.app.router import RouteEntry, RouteTable
from gandalf.domain import (
    CANCEL_SHUTDOWN,
    ChatCall,
    ChatRequest,
    ChatStream,
    EmbeddingsCall,
    EmbeddingsRequest,
    Identity,
    ProviderReply,
    Target,
    Usage,
    UsageRecord,
)
from gandalf.errors import GatewayError, PermissionDenied

_T = TypeVar("_T")


class UsageSink(Protocol):
    def record_usage(self, record: UsageRecord) -> None: ...


_NO_USAGE = Usage()


class Accounting:
    """What one request's usage record needs, captured once."""

    __slots__ = ("alias", "endpoint", "identity", "request_id", "sink", "started", "wall")

    def __init__(
        self,
        sink: UsageSink,
        identity: Identity,
        alias: str,
        request_id: str,
        started: float,
        endpoint: str,
        wall: Callable[[], float],
    ) -> None:
        self.sink = sink
        self.identity = identity
        self.alias = alias
        self.request_id = request_id
        self.started = started
        self.endpoint = endpoint
        self.wall = wall

    def record(
        self,
        target: Target | None,
        provider: str | None,
        usage: Usage | None,
        status: int,
        attempts: int = 1,
    ) -> None:
        identity = self.identity
        if usage is None:
            usage = _NO_USAGE
        self.sink.record_usage(
            UsageRecord(
                self.request_id,
                identity.key_id,
                identity.org_id,
                self.alias,
                target.model if target is not None else None,
                provider,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                (time.perf_counter() - self.started) * 1000.0,
                status,
                self.wall(),
                self.endpoint,
                attempts,
                identity.team_id,
                usage.cached_prompt_tokens,
                usage.cache_write_tokens,
                usage.reasoning_tokens,
            )
        )


def failure_status(exc: BaseException) -> int:
    """The status a request's usage record gets when ``exc`` ended it."""
    if isinstance(exc, GatewayError):
        return exc.status
    if isinstance(exc, asyncio.CancelledError):
        # 503: cut off by the shutdown deadline; 499: the client went away (nginx's code).
        return 503 if exc.args and exc.args[0] == CANCEL_SHUTDOWN else 499
    return 500


# A stream that fails after it was opened still tells on its provider's health
# (app/health.py says how much).
_STREAM_FAILURE_WEIGHTS = STREAM_FAILURE_WEIGHTS


class RecordedStream:
    """A provider's ChatStream whose usage is recorded once, when the server
    closes it with the status it ended with. Iterating it iterates the
    provider's stream directly: no extra layer per chunk.

    ``provider`` served it after ``attempts`` upstream attempts. An upstream
    failure that ends it early (502, 504) counts against the provider's breaker.
    ``headers``: the upstream's headers relayed to the client, when the
    provider's stream has them (OpenAI-compatible upstreams).
    """

    __slots__ = (
        "_accounting",
        "_done",
        "_monotonic",
        "_slot",
        "_stream",
        "attempts",
        "headers",
        "provider",
    )

    def __init__(
        self,
        stream: ChatStream,
        accounting: Accounting,
        slot: Slot,
        attempts: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._accounting = accounting
        self._slot = slot
        self._monotonic = monotonic
        self.provider = slot.name
        self.attempts = attempts
        self.headers: tuple[tuple[bytes, bytes], ...] = getattr(stream, "headers", ())
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()

    async def aclose(self, status: int) -> None:
        if not self._done:
            self._done = True
            stream = self._stream
            usage = stream.usage
            if usage is None and stream.events:
                # Cut short before the upstream reported usage: count what was
                # relayed (one content event is about one token).
                usage = Usage(completion_tokens=stream.events, total_tokens=stream.events)
            slot = self._slot
            self._accounting.record(slot.target, slot.name, usage, status, self.attempts)
            weight = _STREAM_FAILURE_WEIGHTS.get(status)
            if weight is not None:
                slot.breaker.record(weight, self._monotonic())
        await self._stream.aclose()


class ProxyService:
    """Chat completions, streams and embeddings, routed with failover."""

    __slots__ = (
        "_clock",
        "_coalescer",
        "_failover",
        "_monotonic",
        "_rng",
        "_sink",
        "routes",
    )

    def __init__(
        self,
        routes: RouteTable,
        sink: UsageSink,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """``clock``: wall time (usage records, HTTP-date Retry-After);
        ``monotonic``: breakers, budgets and latency; ``rng``: jitter and
        picks (default: a new ``random.Random()``); ``sleep``: backoff waits.
        Backoff base and cap come from ``routes.health.resilience``."""
        self.routes = routes
        self._sink = sink
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng if rng is not None else random.Random()
        resilience = routes.health.resilience
        self._failover = Failover(
            Backoff(resilience.backoff_base, resilience.backoff_cap),
            monotonic=monotonic,
            clock=clock,
            rng=self._rng,
            sleep=sleep,
        )
        self._coalescer: Coalescer[Attempts[ProviderReply]] = Coalescer()

    def breakers(self) -> list[BreakerSnapshot]:
        """Every provider's circuit breaker now, by provider name (for the admin
        API and metrics)."""
        return self.routes.health.snapshot(self._monotonic())

    def _resolve(self, identity: Identity, alias: str) -> RouteEntry:
        """The route of ``alias`` for ``identity``. The key's permission comes
        first: a model outside its ``allowed_models`` is a 403 whatever the
        state of that model's providers (a 503 naming an operator's env var
        would tell a stranger about a route it may not use)."""
        if not identity.may_use(alias):
            raise PermissionDenied(
                f"This API key is not allowed to use model '{alias}'.", param="model"
            )
        return self.routes.resolve(alias)

    async def chat(
        self,
        identity: Identity,
        request: ChatRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> ProviderReply:
        """Serve one chat completion. ``started`` is ``time.perf_counter()`` at arrival.

        The hot path: written out flat on purpose. When the route's first
        choice (fixed for ``priority``, one draw for ``weighted``, one P2C pick
        for ``least_latency``) has a closed breaker, the first attempt costs a
        clock read, a flag test and a success count over a plain call; a
        failure hands over to ``Failover.route``, which fails over and retries.
        """
        alias = request.model
        slot: Slot | None = None
        attempts = 0
        try:
            if not identity.may_use(alias):  # before resolve: 403 before 404/503
                raise PermissionDenied(
                    f"This API key is not allowed to use model '{alias}'.", param="model"
                )
            entry = self.routes.resolve(alias)
            if entry.coalesce and is_deterministic(body):
                flight, leader = await self._coalescer.join(
                    (alias, body), lambda: self._chat_flight(entry, request, body, request_id)
                )
                slot = flight.slot
                attempts = flight.attempts if leader else 0
                if flight.error is not None:
                    raise flight.error
                reply = flight.result
                assert reply is not None and slot is not None
                if not leader:
                    reply = msgspec.structs.replace(reply, attempts=0)
            else:
                now = self._monotonic()
                slot = entry.fast or entry.pick(now, self._rng)
                if slot is not None and (slot.breaker.closed or slot.breaker.allows(now)):
                    attempts = 1
                    track = entry.tracks_latency
                    if track:
                        slot.latency.outstanding += 1
                    try:
                        reply = await slot.provider.chat(
                            ChatCall(
                                body=body,
                                request=request,
                                alias=alias,
                                target=slot.target,
                                request_id=request_id,
                            )
                        )
                    except GatewayError as exc:
                        if track:
                            slot.latency.outstanding -= 1
                        run: Attempts[ProviderReply] = Attempts(slot, 1, request_id)
                        try:
                            reply = await self._failover.route(
                                entry, _chat_invoker(request, body, request_id), run, now, exc
                            )
                        finally:
                            slot, attempts = run.slot, run.attempts
                        assert slot is not None
                        reply.attempts = attempts
                    except BaseException:
                        if track:
                            slot.latency.outstanding -= 1
                        slot.breaker.release(now)
                        raise
                    else:
                        if track:
                            observe(slot, now, self._monotonic())
                        slot.breaker.record_success(now)
                    reply.provider = slot.name
                else:
                    run = Attempts(request_id=request_id)
                    try:
                        reply = await self._failover.route(
                            entry, _chat_invoker(request, body, request_id), run, now
                        )
                    finally:
                        slot, attempts = run.slot, run.attempts
                    assert slot is not None
                    reply.provider = slot.name
                    reply.attempts = attempts
        except BaseException as exc:
            self._sink.record_usage(
                UsageRecord(
                    request_id,
                    identity.key_id,
                    identity.org_id,
                    alias,
                    slot.target.model if slot is not None else None,
                    slot.name if slot is not None else None,
                    0,
                    0,
                    0,
                    (time.perf_counter() - started) * 1000.0,
                    failure_status(exc),
                    self._clock(),
                    "chat",
                    attempts,
                    identity.team_id,
                )
            )
            raise
        usage = reply.usage
        self._sink.record_usage(
            UsageRecord(
                request_id,
                identity.key_id,
                identity.org_id,
                alias,
                slot.target.model,
                slot.name,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                (time.perf_counter() - started) * 1000.0,
                reply.status,
                self._clock(),
                "chat",
                attempts,
                identity.team_id,
                usage.cached_prompt_tokens,
                usage.cache_write_tokens,
                usage.reasoning_tokens,
            )
        )
        return reply

    async def _chat_flight(
        self, entry: RouteEntry, request: ChatRequest, body: bytes, request_id: str
    ) -> Attempts[ProviderReply]:
        """A coalesced call: its outcome, shared by every waiter, never raised
        (except a cancellation, when no waiter is left)."""
        run: Attempts[ProviderReply] = Attempts(request_id=request_id)
        try:
            reply = await self._failover.serve(
                entry, _chat_invoker(request, body, request_id), run, self._monotonic()
            )
        except GatewayError as exc:
            run.error = exc
            return run
        assert run.slot is not None
        reply.provider = run.slot.name
        reply.attempts = run.attempts
        run.result = reply
        return run

    async def chat_stream(
        self,
        identity: Identity,
        request: ChatRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> RecordedStream:
        """Open a streamed chat completion. Failures before the upstream accepted
        the request fail over, then raise (and are recorded); later ones end the
        stream."""
        alias = request.model
        accounting = Accounting(
            self._sink, identity, alias, request_id, started, "chat", self._clock
        )
        run: Attempts[ChatStream] = Attempts(request_id=request_id)
        try:
            entry = self._resolve(identity, alias)
            stream = await self._failover.serve(
                entry, _stream_invoker(request, body, request_id), run, self._monotonic()
            )
        except BaseException as exc:
            self._record_failure(accounting, run, exc)
            raise
        slot = run.slot
        assert slot is not None
        return RecordedStream(stream, accounting, slot, run.attempts, self._monotonic)

    async def embeddings(
        self,
        identity: Identity,
        request: EmbeddingsRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> ProviderReply:
        alias = request.model
        accounting = Accounting(
            self._sink, identity, alias, request_id, started, "embeddings", self._clock
        )
        run: Attempts[ProviderReply] = Attempts(request_id=request_id)
        try:
            entry = self._resolve(identity, alias)
            reply = await self._failover.serve(
                entry,
                lambda slot: slot.provider.embeddings(
                    EmbeddingsCall(
                        body=body,
                        request=request,
                        alias=alias,
                        target=slot.target,
                        request_id=request_id,
                    )
                ),
                run,
                self._monotonic(),
            )
        except BaseException as exc:
            self._record_failure(accounting, run, exc)
            raise
        slot = run.slot
        assert slot is not None
        reply.provider = slot.name
        reply.attempts = run.attempts
        accounting.record(slot.target, slot.name, reply.usage, reply.status, run.attempts)
        return reply

    @staticmethod
    def _record_failure(accounting: Accounting, run: Attempts[_T], exc: BaseException) -> None:
        slot = run.slot
        accounting.record(
            slot.target if slot is not None else None,
            slot.name if slot is not None else None,
            None,
            failure_status(exc),
            run.attempts,
        )


def _stream_invoker(
    request: ChatRequest, body: bytes, request_id: str
) -> Callable[[Slot], Awaitable[ChatStream]]:
    alias = request.model

    def invoke(slot: Slot) -> Awaitable[ChatStream]:
        return slot.provider.stream(
            ChatCall(
                body=body, request=request, alias=alias, target=slot.target, request_id=request_id
            )
        )

    return invoke


def _chat_invoker(
    request: ChatRequest, body: bytes, request_id: str
) -> Callable[[Slot], Awaitable[ProviderReply]]:
    alias = request.model

    def invoke(slot: Slot) -> Awaitable[ProviderReply]:
        return slot.provider.chat(
            ChatCall(
                body=body, request=request, alias=alias, target=slot.target, request_id=request_id
            )
        )

    return invoke
