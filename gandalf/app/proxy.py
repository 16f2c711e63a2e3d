"""ProxyService: chat completions, streams and embeddings through the request
pipeline (app/pipeline.py): admit -> coalesce -> serve -> account.

Routing (app/failover.py). A request tries its route's targets in the order
the route's strategy gives (app/balancer.py: priority tiers first), skipping
any whose provider's circuit breaker is open (app/breaker.py); a failure that
another target may answer (app/health.py) moves on to the next target, and
targets are retried within ``max_attempts``, after a backoff, within their
provider's retry budget (app/retry.py). A stream fails over only while it is
being opened: once the provider returned it, its bytes may have reached the
client. Identical deterministic requests on a ``coalesce`` route share one
upstream call (app/coalesce.py).

The answer says who served it: each method returns an
:class:`~gandalf.app.failover.Outcome` (the reply or stream, the slot that
served, the attempts, the governor ticket's headers); an upstream error
carries ``upstream`` / ``attempts``. The server turns them into
``x-gandalf-provider`` / ``x-gandalf-attempts`` (and ``x-ratelimit-*``).

Accounting. Every request that reaches the service leaves exactly one
UsageRecord, whatever its outcome (Pipeline.account). It names the provider
that served (or failed last) and the number of upstream attempts (0 for a
request that shared a coalesced call). A stream's record is written when the
stream ends: its status says how (200, an upstream error's status, 499 client
gone, 503 shutdown).

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

from gandalf.app.balancer import Slot
from gandalf.app.breaker import BreakerSnapshot
from gandalf.app.coalesce import Coalescer, is_deterministic
from gandalf.app.failover import AttemptHook, AttemptTracer, Failover, Outcome
from gandalf.app.governance import Governor, Ticket
from gandalf.app.health import STREAM_FAILURE_WEIGHTS
from gandalf.app.pipeline import (
    CostOf,
    Observe,
    Pipeline,
    PriceWorstCase,
    UsageSink,
    failure_status,
    no_cost,
    no_price,
)
from gandalf.app.retry import Backoff
from gandalf.app.router import RouteEntry, RouteTable
from gandalf.domain import (
    ChatCall,
    ChatRequest,
    ChatStream,
    EmbeddingsCall,
    EmbeddingsRequest,
    Identity,
    ProviderReply,
    Usage,
)
from gandalf.errors import GatewayError

__all__ = ["ProxyService", "RecordedStream", "UsageSink", "failure_status"]


# A stream that fails after it was opened still tells on its provider's health
# (app/health.py says how much).
_STREAM_FAILURE_WEIGHTS = STREAM_FAILURE_WEIGHTS


class RecordedStream:
    """A provider's ChatStream that is accounted for once (Pipeline.account:
    usage, cost, the ticket settled), when the server closes it with the status
    it ended with. Iterating it iterates the provider's stream directly: no
    extra layer per chunk.

    An upstream failure that ends it early (502, 504) counts against the
    provider's breaker. ``headers``: the upstream's headers relayed to the
    client, when the provider's stream has them (OpenAI-compatible upstreams).
    """

    __slots__ = (
        "_alias",
        "_attempts",
        "_done",
        "_identity",
        "_monotonic",
        "_pipeline",
        "_request_id",
        "_slot",
        "_started",
        "_stream",
        "_ticket",
        "headers",
    )

    def __init__(
        self,
        stream: ChatStream,
        pipeline: Pipeline,
        identity: Identity,
        alias: str,
        request_id: str,
        started: float,
        slot: Slot,
        attempts: int,
        ticket: Ticket | None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._pipeline = pipeline
        self._identity = identity
        self._alias = alias
        self._request_id = request_id
        self._started = started
        self._slot = slot
        self._attempts = attempts
        self._ticket = ticket
        self._monotonic = monotonic
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
            self._pipeline.account(
                self._identity,
                self._alias,
                self._request_id,
                self._started,
                "chat",
                slot.name,
                slot.target.model,
                usage,
                status,
                self._attempts,
                self._ticket,
            )
            weight = _STREAM_FAILURE_WEIGHTS.get(status)
            if weight is not None:
                slot.breaker.record(weight, self._monotonic())
        await self._stream.aclose()


_Job = tuple[ChatRequest, bytes, str]  # (request, body, request id): an invoke's argument


def _call(slot: Slot, job: _Job) -> ChatCall:
    request, body, request_id = job
    return ChatCall(
        body=body, request=request, alias=request.model, target=slot.target, request_id=request_id
    )


def _chat(slot: Slot, job: _Job) -> Awaitable[ProviderReply]:
    return slot.provider.chat(_call(slot, job))


def _stream(slot: Slot, job: _Job) -> Awaitable[ChatStream]:
    return slot.provider.stream(_call(slot, job))


def _embed(slot: Slot, job: tuple[EmbeddingsRequest, bytes, str]) -> Awaitable[ProviderReply]:
    request, body, request_id = job
    return slot.provider.embeddings(
        EmbeddingsCall(
            body=body,
            request=request,
            alias=request.model,
            target=slot.target,
            request_id=request_id,
        )
    )


_Landed = Outcome[ProviderReply] | GatewayError  # a coalesced call's result, shared as a value


class ProxyService:
    """Chat completions, streams and embeddings, routed with failover."""

    __slots__ = ("_coalescer", "_failover", "_monotonic", "_rng", "pipeline", "routes")

    def __init__(
        self,
        routes: RouteTable,
        sink: UsageSink,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        governor: Governor | None = None,
        price: PriceWorstCase = no_price,
        cost: CostOf = no_cost,
        observe: Observe | None = None,
        attempt: AttemptHook | None = None,
        tracer: AttemptTracer | None = None,
    ) -> None:
        """``clock``: wall time (usage records, HTTP-date Retry-After);
        ``monotonic``: breakers, budgets and latency; ``rng``: jitter and
        picks (default: a new ``random.Random()``); ``sleep``: backoff waits.
        Backoff base and cap come from ``routes.health.resilience``.
        ``governor``, ``price``, ``cost``: the pipeline's hooks
        (app/pipeline.py); None / unpriced by default."""
        self.routes = routes
        self.pipeline = Pipeline(
            sink, clock=clock, governor=governor, price=price, cost=cost, observe=observe
        )
        self._monotonic = monotonic
        self._rng = rng if rng is not None else random.Random()
        resilience = routes.health.resilience
        self._failover = Failover(
            Backoff(resilience.backoff_base, resilience.backoff_cap),
            monotonic=monotonic,
            clock=clock,
            rng=self._rng,
            sleep=sleep,
            attempt=attempt,
            tracer=tracer,
        )
        self._coalescer: Coalescer[_Landed] = Coalescer()

    def breakers(self) -> list[BreakerSnapshot]:
        """Every provider's circuit breaker now, by provider name (for the admin
        API and metrics)."""
        return self.routes.health.snapshot(self._monotonic())

    async def chat(
        self,
        identity: Identity,
        request: ChatRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> Outcome[ProviderReply]:
        """Serve one chat completion. ``started`` is ``time.perf_counter()`` at arrival."""
        alias = request.model
        pipeline = self.pipeline
        ticket: Ticket | None = None
        shared = follower = False
        try:
            entry, ticket = pipeline.admit(self.routes, identity, alias, body, request.output_limit)
            if entry.coalesce and is_deterministic(body):
                shared = True
                landed, leader = await self._coalescer.join(
                    (alias, body), lambda: self._flight(entry, request, body, request_id)
                )
                follower = not leader
                if isinstance(landed, GatewayError):
                    raise landed
                outcome = landed if leader else Outcome(landed.value, landed.slot, 0)
            else:
                job = (request, body, request_id)
                outcome = await self._failover.serve(
                    entry, _chat, job, request_id, self._monotonic()
                )
        except BaseException as exc:
            pipeline.failed(
                identity, alias, request_id, started, "chat", exc, ticket, follower, shared
            )
            raise
        reply, slot = outcome.value, outcome.slot
        pipeline.account(
            identity, alias, request_id, started, "chat", slot.name, slot.target.model,
            reply.usage, reply.status, outcome.attempts, ticket,
        )  # fmt: skip
        if ticket is not None:
            outcome.headers = ticket.headers
        return outcome

    async def _flight(
        self, entry: RouteEntry, request: ChatRequest, body: bytes, request_id: str
    ) -> _Landed:
        """A coalesced call: its outcome, shared by every waiter, never raised
        (except a cancellation, when no waiter is left)."""
        try:
            return await self._failover.serve(
                entry, _chat, (request, body, request_id), request_id, self._monotonic()
            )
        except GatewayError as exc:
            return exc

    async def chat_stream(
        self,
        identity: Identity,
        request: ChatRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> Outcome[RecordedStream]:
        """Open a streamed chat completion. Failures before the upstream accepted
        the request fail over, then raise (and are accounted for); later ones
        end the stream, which is accounted for when the server closes it."""
        alias = request.model
        pipeline = self.pipeline
        ticket: Ticket | None = None
        try:
            entry, ticket = pipeline.admit(self.routes, identity, alias, body, request.output_limit)
            opened = await self._failover.serve(
                entry, _stream, (request, body, request_id), request_id, self._monotonic()
            )
        except BaseException as exc:
            pipeline.failed(identity, alias, request_id, started, "chat", exc, ticket)
            raise
        slot, attempts = opened.slot, opened.attempts
        stream = RecordedStream(
            opened.value, pipeline, identity, alias, request_id, started, slot, attempts, ticket,
            self._monotonic,
        )  # fmt: skip
        return Outcome(stream, slot, attempts, ticket.headers if ticket is not None else ())

    async def embeddings(
        self,
        identity: Identity,
        request: EmbeddingsRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> Outcome[ProviderReply]:
        alias = request.model
        pipeline = self.pipeline
        ticket: Ticket | None = None
        try:
            entry, ticket = pipeline.admit(self.routes, identity, alias, body, None)
            outcome = await self._failover.serve(
                entry, _embed, (request, body, request_id), request_id, self._monotonic()
            )
        except BaseException as exc:
            pipeline.failed(identity, alias, request_id, started, "embeddings", exc, ticket)
            raise
        reply, slot = outcome.value, outcome.slot
        pipeline.account(
            identity, alias, request_id, started, "embeddings", slot.name, slot.target.model,
            reply.usage, reply.status, outcome.attempts, ticket,
        )  # fmt: skip
        if ticket is not None:
            outcome.headers = ticket.headers
        return outcome
