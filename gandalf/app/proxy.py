"""ProxyService: chat completions, streams and embeddings through the request
pipeline (app/pipeline.py): admit -> cache -> coalesce -> serve -> account.

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

Response cache (app/cache.py). On a route whose entry has a ``cache``, a
deterministic chat completion is looked up by its key after admission: a hit
is answered from the cache (no upstream call, ``attempts`` 0, accounted by
``Pipeline.hit``), streamed requests as a replayed SSE stream; a miss shares
one upstream call with identical requests in flight (the same Coalescer,
keyed by the cache key) and its successful answer (200) is stored. A streamed
miss is not coalesced; it fills the cache when it completes (never when the
client left or the upstream failed mid-way). Every answer of a caching route,
errors included, carries ``x-gandalf-cache`` (hit / miss / bypass).

Time and chance are injected: ``monotonic`` (breakers, budgets, latency),
``clock`` (wall time for usage records and HTTP-date Retry-After), ``rng``
(backoff jitter, weighted and P2C picks) and ``sleep`` (the backoff waits), so
tests run the whole policy without waiting.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from gandalf.app._replay import assemble, replay
from gandalf.app.balancer import Slot
from gandalf.app.breaker import BreakerSnapshot
from gandalf.app.cache import (
    BYPASS,
    HIT,
    MISS,
    NO_CACHE,
    NO_STORE,
    CachedAnswer,
    RouteCache,
    cache_key,
    embeddings_key,
)
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
    Verdict,
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

__all__ = ["ProxyService", "RecordedStream", "ReplayStream", "UsageSink", "failure_status"]


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

    ``fill``: (the route's cache, the request's key) when the completed stream
    is to be stored: then the relayed chunks are kept (up to the cache's size
    bound) and, when it closes with status 200 and a finish reason, folded
    into one chat.completion and stored. A stream that ends otherwise (client
    gone, upstream error) stores nothing.
    """

    __slots__ = (
        "_alias",
        "_attempts",
        "_capture",
        "_done",
        "_fill",
        "_identity",
        "_monotonic",
        "_pipeline",
        "_request_id",
        "_seen",
        "_slot",
        "_started",
        "_stream",
        "_ticket",
        "headers",
        "limits_at",
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
        fill: tuple[RouteCache, bytes] | None = None,
    ) -> None:
        self._stream = stream
        self._fill = fill
        self._seen: list[bytes] | None = [] if fill is not None else None
        self._capture: AsyncGenerator[bytes, None] | None = None
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
        self.limits_at: int = getattr(stream, "limits_at", -1)  # see ProviderReply
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._fill is None:
            return self._stream.__aiter__()
        self._capture = self._captured()
        return self._capture

    async def _captured(self) -> AsyncGenerator[bytes, None]:
        """The stream's chunks, kept for the cache while they fit in it."""
        fill = self._fill
        assert fill is not None
        limit = getattr(fill[0].backend, "max_bytes", 1 << 62)
        size = 0
        async for chunk in self._stream:
            seen = self._seen
            if seen is not None:
                size += len(chunk)
                if size > limit:
                    self._seen = None  # too big to cache: stop keeping it
                else:
                    seen.append(chunk)
            yield chunk

    async def aclose(self, status: int) -> None:
        if self._capture is not None:
            await self._capture.aclose()
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
            fill, seen = self._fill, self._seen
            if fill is not None and seen is not None and status == 200:
                body = assemble(seen, stream.usage)
                if body is not None:
                    answer = CachedAnswer(body, usage or Usage(), slot.name, slot.target.model)
                    await self._stream.aclose()  # the upstream first, then the cache
                    cache, key = fill
                    await cache.backend.put(key, answer, cache.ttl)
                    return
        await self._stream.aclose()


class ReplayStream:
    """A streamed request answered from the response cache: the cached answer's
    SSE events, in one chunk. Accounted for when it was made (Pipeline.hit)."""

    __slots__ = ("_events", "headers", "limits_at")

    def __init__(self, events: bytes) -> None:
        self._events = events
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.limits_at = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._events

    async def aclose(self, status: int) -> None:
        return None


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

# The x-gandalf-cache header alone (a caller without a governor ticket).
_ONLY: dict[tuple[bytes, bytes], tuple[tuple[bytes, bytes], ...]] = {
    HIT: (HIT,),
    MISS: (MISS,),
    BYPASS: (BYPASS,),
}


def _with(ticket: Ticket | None, label: tuple[bytes, bytes]) -> tuple[tuple[bytes, bytes], ...]:
    """The answer's pipeline headers: the ticket's x-ratelimit-* and ``label``."""
    return _ONLY[label] if ticket is None else (*ticket.headers, label)


def _label(key: bytes | None, control: int) -> tuple[bytes, bytes]:
    """``x-gandalf-cache`` before the lookup: bypass when the request is not
    cacheable or the client said ``no-cache``, else miss (until a hit)."""
    return BYPASS if key is None or control & NO_CACHE else MISS


def _slot_of(entry: RouteEntry, answer: CachedAnswer) -> Slot:
    """The route's slot that served ``answer`` (the first one if the route
    changed since: only the x-gandalf-provider header depends on it)."""
    for slot in entry.slots:
        if slot.name == answer.provider and slot.target.model == answer.model:
            return slot
    return entry.slots[0]


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
        verdict: Verdict | None = None,
    ) -> None:
        """``clock``: wall time (usage records, HTTP-date Retry-After);
        ``monotonic``: breakers, budgets and latency; ``rng``: jitter and
        picks (default: a new ``random.Random()``); ``sleep``: backoff waits.
        Backoff base and cap come from ``routes.health.resilience``.
        ``governor``, ``price``, ``cost``: the pipeline's hooks
        (app/pipeline.py); None / unpriced by default."""
        self.routes = routes
        self.pipeline = Pipeline(
            sink,
            clock=clock,
            governor=governor,
            price=price,
            cost=cost,
            observe=observe,
            verdict=verdict,
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

    @property
    def failover(self) -> Failover:
        """The attempt policy (the Responses API serves through it too)."""
        return self._failover

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
        cache_control: int = 0,
    ) -> Outcome[ProviderReply]:
        """Serve one chat completion. ``started`` is ``time.perf_counter()`` at
        arrival; ``cache_control``: the client's ``cache-control`` directives
        (app/cache.py's NO_CACHE / NO_STORE bits)."""
        alias = request.model
        pipeline = self.pipeline
        ticket: Ticket | None = None
        shared = follower = False
        try:
            entry = pipeline.route(self.routes, identity, alias)
        except BaseException as exc:
            pipeline.failed(identity, alias, request_id, started, "chat", exc, None)
            raise
        if entry.cache is not None:
            return await self._cached_chat(
                entry, entry.cache, identity, request, body, request_id, started, cache_control
            )
        try:
            if identity.scopes:
                # request.output_limit, read as its two fields: a property of a
                # msgspec Struct costs ~0.8k instructions (its type lookup misses
                # CPython's attribute cache), the fields ~0.1k.
                limit = request.max_completion_tokens
                if limit is None:
                    limit = request.max_tokens
                if request.n is not None and limit is not None:
                    limit *= request.n  # a limit per choice: n choices may write n times it
                ticket = (
                    pipeline.govern(identity, entry, body, limit)
                    if pipeline.local
                    else await pipeline.govern_shared(identity, entry, body, limit)
                )
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

    async def _cached_chat(
        self,
        entry: RouteEntry,
        cache: RouteCache,
        identity: Identity,
        request: ChatRequest,
        body: bytes,
        request_id: str,
        started: float,
        control: int,
    ) -> Outcome[ProviderReply]:
        """:meth:`chat` on a caching route: admission, the lookup (unless the
        request is not cacheable or says ``no-cache``), then one coalesced
        upstream call per key that stores its answer (unless ``no-store``)."""
        alias = request.model
        pipeline = self.pipeline
        ticket: Ticket | None = None
        shared = follower = False
        key = cache_key(alias, body)
        label = _label(key, control)
        pipeline.verdict(label)
        try:
            if identity.scopes:
                limit = request.max_completion_tokens  # request.output_limit (see chat)
                if limit is None:
                    limit = request.max_tokens
                if request.n is not None and limit is not None:
                    limit *= request.n  # per choice (see chat)
                ticket = (
                    pipeline.govern(identity, entry, body, limit)
                    if pipeline.local
                    else await pipeline.govern_shared(identity, entry, body, limit)
                )
            if key is not None:
                if label is MISS:
                    answer = await cache.backend.get(key)
                    if answer is not None:
                        pipeline.hit(
                            identity, alias, request_id, started, answer.provider, answer.model,
                            answer.usage, ticket,
                        )  # fmt: skip
                        reply = ProviderReply(body=answer.body, usage=answer.usage)
                        return Outcome(reply, _slot_of(entry, answer), 0, _with(ticket, HIT))
                shared = True
                store = not control & NO_STORE
                landed, leader = await self._coalescer.join(
                    key, lambda: self._fill(entry, cache, key, store, request, body, request_id)
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
            if not shared and isinstance(exc, GatewayError):
                exc.relayed = (*exc.relayed, label)  # a shared error got it in _fill
            raise
        reply, slot = outcome.value, outcome.slot
        pipeline.account(
            identity, alias, request_id, started, "chat", slot.name, slot.target.model,
            reply.usage, reply.status, outcome.attempts, ticket,
        )  # fmt: skip
        outcome.headers = _with(ticket, label)
        return outcome

    async def _fill(
        self,
        entry: RouteEntry,
        cache: RouteCache,
        key: bytes,
        store: bool,
        request: ChatRequest,
        body: bytes,
        request_id: str,
    ) -> _Landed:
        """A cache miss's upstream call (coalesced: shared by every request
        with ``key`` in flight): its outcome, stored when it succeeded (200)
        and its leader allows; an error is returned (never stored), marked
        ``x-gandalf-cache: miss`` once for every waiter."""
        try:
            outcome = await self._failover.serve(
                entry, _chat, (request, body, request_id), request_id, self._monotonic()
            )
        except GatewayError as exc:
            exc.relayed = (*exc.relayed, MISS)
            return exc
        reply = outcome.value
        if store and reply.status == 200:
            slot = outcome.slot
            answer = CachedAnswer(reply.body, reply.usage, slot.name, slot.target.model)
            await cache.backend.put(key, answer, cache.ttl)
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
        cache_control: int = 0,
    ) -> Outcome[RecordedStream | ReplayStream]:
        """Open a streamed chat completion. Failures before the upstream accepted
        the request fail over, then raise (and are accounted for); later ones
        end the stream, which is accounted for when the server closes it.
        ``cache_control`` as for :meth:`chat`."""
        alias = request.model
        pipeline = self.pipeline
        ticket: Ticket | None = None
        try:
            entry = pipeline.route(self.routes, identity, alias)
        except BaseException as exc:
            pipeline.failed(identity, alias, request_id, started, "chat", exc, None)
            raise
        if entry.cache is not None:
            return await self._cached_stream(
                entry, entry.cache, identity, request, body, request_id, started, cache_control
            )
        try:
            if identity.scopes:
                limit = request.max_completion_tokens  # request.output_limit (see chat)
                if limit is None:
                    limit = request.max_tokens
                if request.n is not None and limit is not None:
                    limit *= request.n  # per choice (see chat)
                ticket = (
                    pipeline.govern(identity, entry, body, limit)
                    if pipeline.local
                    else await pipeline.govern_shared(identity, entry, body, limit)
                )
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

    async def _cached_stream(
        self,
        entry: RouteEntry,
        cache: RouteCache,
        identity: Identity,
        request: ChatRequest,
        body: bytes,
        request_id: str,
        started: float,
        control: int,
    ) -> Outcome[RecordedStream | ReplayStream]:
        """:meth:`chat_stream` on a caching route: a hit replays the cached
        answer as SSE; a miss streams from upstream (not coalesced) and, unless
        ``no-store``, fills the cache once it completed."""
        alias = request.model
        pipeline = self.pipeline
        ticket: Ticket | None = None
        key = cache_key(alias, body)
        label = _label(key, control)
        pipeline.verdict(label)
        try:
            if identity.scopes:
                limit = request.max_completion_tokens  # request.output_limit (see chat)
                if limit is None:
                    limit = request.max_tokens
                if request.n is not None and limit is not None:
                    limit *= request.n  # per choice (see chat)
                ticket = (
                    pipeline.govern(identity, entry, body, limit)
                    if pipeline.local
                    else await pipeline.govern_shared(identity, entry, body, limit)
                )
            if key is not None and label is MISS:
                answer = await cache.backend.get(key)
                events = replay(answer.body, request.wants_usage) if answer is not None else None
                if answer is not None and events is not None:
                    pipeline.hit(
                        identity, alias, request_id, started, answer.provider, answer.model,
                        answer.usage, ticket,
                    )  # fmt: skip
                    slot = _slot_of(entry, answer)
                    return Outcome(ReplayStream(events), slot, 0, _with(ticket, HIT))
            opened = await self._failover.serve(
                entry, _stream, (request, body, request_id), request_id, self._monotonic()
            )
        except BaseException as exc:
            pipeline.failed(identity, alias, request_id, started, "chat", exc, ticket)
            if isinstance(exc, GatewayError):
                exc.relayed = (*exc.relayed, label)
            raise
        slot, attempts = opened.slot, opened.attempts
        fill = (cache, key) if key is not None and not control & NO_STORE else None
        stream = RecordedStream(
            opened.value, pipeline, identity, alias, request_id, started, slot, attempts, ticket,
            self._monotonic, fill,
        )  # fmt: skip
        return Outcome(stream, slot, attempts, _with(ticket, label))

    async def embeddings(
        self,
        identity: Identity,
        request: EmbeddingsRequest,
        body: bytes,
        request_id: str,
        started: float,
        cache_control: int = 0,
    ) -> Outcome[ProviderReply]:
        """Serve one embeddings request (``cache_control`` as for :meth:`chat`)."""
        alias = request.model
        pipeline = self.pipeline
        ticket: Ticket | None = None
        try:
            entry = pipeline.route(self.routes, identity, alias)
        except BaseException as exc:
            pipeline.failed(identity, alias, request_id, started, "embeddings", exc, None)
            raise
        if entry.cache is not None:
            return await self._cached_embeddings(
                entry, entry.cache, identity, request, body, request_id, started, cache_control
            )
        try:
            if identity.scopes:
                ticket = (
                    pipeline.govern(identity, entry, body, None)
                    if pipeline.local
                    else await pipeline.govern_shared(identity, entry, body, None)
                )
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

    async def _cached_embeddings(
        self,
        entry: RouteEntry,
        cache: RouteCache,
        identity: Identity,
        request: EmbeddingsRequest,
        body: bytes,
        request_id: str,
        started: float,
        control: int,
    ) -> Outcome[ProviderReply]:
        """:meth:`embeddings` on a caching route: the lookup (unless
        ``no-cache``), else the upstream call (not coalesced), its successful
        answer stored (unless ``no-store``)."""
        alias = request.model
        pipeline = self.pipeline
        ticket: Ticket | None = None
        key = embeddings_key(alias, body)
        label = _label(key, control)
        pipeline.verdict(label)
        try:
            if identity.scopes:
                ticket = (
                    pipeline.govern(identity, entry, body, None)
                    if pipeline.local
                    else await pipeline.govern_shared(identity, entry, body, None)
                )
            if key is not None and label is MISS:
                answer = await cache.backend.get(key)
                if answer is not None:
                    pipeline.hit(
                        identity, alias, request_id, started, answer.provider, answer.model,
                        answer.usage, ticket, "embeddings",
                    )  # fmt: skip
                    reply = ProviderReply(body=answer.body, usage=answer.usage)
                    return Outcome(reply, _slot_of(entry, answer), 0, _with(ticket, HIT))
            outcome = await self._failover.serve(
                entry, _embed, (request, body, request_id), request_id, self._monotonic()
            )
        except BaseException as exc:
            pipeline.failed(identity, alias, request_id, started, "embeddings", exc, ticket)
            if isinstance(exc, GatewayError):
                exc.relayed = (*exc.relayed, label)
            raise
        reply, slot = outcome.value, outcome.slot
        pipeline.account(
            identity, alias, request_id, started, "embeddings", slot.name, slot.target.model,
            reply.usage, reply.status, outcome.attempts, ticket,
        )  # fmt: skip
        if key is not None and not control & NO_STORE and reply.status == 200:
            answer = CachedAnswer(reply.body, reply.usage, slot.name, slot.target.model)
            await cache.backend.put(key, answer, cache.ttl)
        outcome.headers = _with(ticket, label)
        return outcome
