"""PassthroughService: native provider APIs (Anthropic, Gemini, Azure OpenAI,
Ollama) relayed through Gandalf's routing, permissions and accounting.

The model a client names (in the body or the path) is a route alias like any
other: the route table resolves it, the key's ``allowed_models`` applies, and
the first live target whose provider speaks the caller's API serves it (the
request is relayed untouched, so only a provider of that very type can).
It goes through the request pipeline's stages (app/pipeline.py) like
``/v1/chat/completions``: ``admit`` (the key's permission, the route, the
governor), ``Failover.serve`` over the route's targets of the caller's API
(breakers, failover and retries as on /v1: an upstream 408, 429 or 5xx is
tried on the next target, and the last one is relayed as is when none
served), ``account`` (one usage record, cost, the ticket settled; a
stream's when it ends). Native calls are never coalesced.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from gandalf.app.balancer import Slot
from gandalf.app.failover import AttemptHook, AttemptTracer, Failover, failure_of
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
    tell,
)
from gandalf.app.retry import Backoff
from gandalf.app.router import RouteEntry, RouteTable
from gandalf.domain import (
    Identity,
    NativeReply,
    NativeRequest,
    NativeStream,
    ProviderConfig,
    Target,
)
from gandalf.errors import InvalidRequest, UpstreamClientError

# Native answers another target (or a retry) may serve better, as app/health.py
# classifies /v1 failures: 408 and 5xx (server), 429 (rate limited).
_RETRYABLE_FROM = 500


class RelayedFailure(UpstreamClientError):
    """A native answer of a failed attempt (408, 429, 5xx), raised inside the
    failover loop so that the route fails over or retries like a /v1 call;
    when no target served, the last one's ``reply`` is relayed to the caller
    as is (it is in the caller's API already)."""

    def __init__(self, provider: str, reply: NativeReply) -> None:
        retry_after = next((v for k, v in reply.headers if k == b"retry-after"), None)
        super().__init__(
            f"Upstream provider '{provider}' answered HTTP {reply.status}.",
            status=reply.status,
            retry_after=retry_after.decode("latin-1") if retry_after is not None else None,
        )
        self.reply = reply


_Job = tuple[Mapping[str, "NativeUpstream"], Callable[[Target], NativeRequest]]


def _send(slot: Slot, job: _Job) -> Awaitable[NativeReply]:
    natives, build = job
    return _relay(natives[slot.name], build(slot.target))


async def _relay(native: NativeUpstream, request: NativeRequest) -> NativeReply:
    reply = await native.send(request)
    status = reply.status
    if status >= _RETRYABLE_FROM or status in (408, 429):
        raise RelayedFailure(native.name, reply)
    return reply


class NativeUpstream(Protocol):
    """One provider's native API (provider/native.py's NativeClient)."""

    name: str
    config: ProviderConfig

    async def send(self, request: NativeRequest) -> NativeReply: ...


class RecordedNativeStream:
    """A native stream accounted for (Pipeline.account) when the server closes
    it; a stream the upstream broke (502) counts against its provider's
    breaker, as a /v1 stream does (app/health.py STREAM_FAILURE_WEIGHTS)."""

    __slots__ = (
        "_alias",
        "_attempts",
        "_done",
        "_endpoint",
        "_identity",
        "_monotonic",
        "_pipeline",
        "_request_id",
        "_slot",
        "_started",
        "_stream",
        "_ticket",
    )

    def __init__(
        self,
        stream: NativeStream,
        pipeline: Pipeline,
        identity: Identity,
        alias: str,
        request_id: str,
        started: float,
        endpoint: str,
        slot: Slot,
        ticket: Ticket | None,
        attempts: int = 1,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._pipeline = pipeline
        self._identity = identity
        self._alias = alias
        self._request_id = request_id
        self._started = started
        self._endpoint = endpoint
        self._slot = slot
        self._ticket = ticket
        self._attempts = attempts
        self._monotonic = monotonic
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()

    async def aclose(self, status: int) -> None:
        if not self._done:
            self._done = True
            slot = self._slot
            self._pipeline.account(
                self._identity,
                self._alias,
                self._request_id,
                self._started,
                self._endpoint,
                slot.name,
                slot.target.model,
                self._stream.usage,
                status,
                self._attempts,
                self._ticket,
            )
            weight = STREAM_FAILURE_WEIGHTS.get(status)
            if weight is not None:
                slot.breaker.record(weight, self._monotonic())
        await self._stream.aclose()


class Relayed:
    """What :meth:`PassthroughService.forward` gives the server: the upstream's
    reply, its stream wrapped for accounting (None when not streamed), and the
    governor ticket's response headers (empty when the caller has no limits)."""

    __slots__ = ("headers", "reply", "stream")

    def __init__(
        self,
        reply: NativeReply,
        stream: RecordedNativeStream | None,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> None:
        self.reply = reply
        self.stream = stream
        self.headers = headers


class PassthroughService:
    __slots__ = ("_entries", "_failover", "_monotonic", "_natives", "pipeline", "routes")

    def __init__(
        self,
        routes: RouteTable,
        natives: Mapping[str, NativeUpstream],
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
        """``governor``, ``price``, ``cost``: the pipeline's hooks
        (app/pipeline.py); None / unpriced by default. ``monotonic``, ``rng``,
        ``sleep``: the failover's clock, picks and backoff waits."""
        self.routes = routes
        self._natives = natives
        self._monotonic = monotonic
        self.pipeline = Pipeline(
            sink, clock=clock, governor=governor, price=price, cost=cost, observe=observe
        )
        resilience = routes.health.resilience
        self._failover = Failover(
            Backoff(resilience.backoff_base, resilience.backoff_cap),
            monotonic=monotonic,
            clock=clock,
            rng=rng if rng is not None else random.Random(),
            sleep=sleep,
            attempt=attempt,
            tracer=tracer,
        )
        # (alias, api) -> (the route's entry, its targets of that API as an entry
        # of their own: the same slots, so breakers and latency are shared).
        self._entries: dict[tuple[str, str], tuple[RouteEntry, RouteEntry | None]] = {}

    def apis(self) -> set[str]:
        """The native APIs some configured provider speaks."""
        return {native.config.type for native in self._natives.values()}

    def models(self, identity: Identity, api: str) -> list[str]:
        """The aliases ``identity`` may call through ``api``, sorted."""
        return [
            alias
            for alias, _ in self.routes.models()
            if identity.may_use(alias) and self._of_api(self.routes.resolve(alias), api) is not None
        ]

    def _of_api(self, entry: RouteEntry, api: str) -> RouteEntry | None:
        """``entry`` narrowed to the targets whose provider speaks ``api`` (None:
        none does), built once per route and API."""
        key = (entry.alias, api)
        known = self._entries.get(key)
        if known is not None and known[0] is entry:
            return known[1]
        natives = self._natives

        def speaks(provider: str) -> bool:
            native = natives.get(provider)
            return native is not None and native.config.type == api

        targets = tuple((t, p) for t, p in entry.targets if speaks(t.provider))
        narrowed = (
            RouteEntry(
                entry.alias,
                targets,
                None,
                slots=tuple(slot for slot in entry.slots if speaks(slot.name)),
                strategy=entry.strategy,
                max_attempts=entry.max_attempts,
            )
            if targets
            else None
        )
        self._entries[key] = (entry, narrowed)
        return narrowed

    def _serving(self, identity: Identity, alias: str, api: str) -> tuple[RouteEntry, RouteEntry]:
        entry = self.pipeline.route(self.routes, identity, alias)
        narrowed = self._of_api(entry, api)
        if narrowed is None:
            raise InvalidRequest(
                f"Model '{alias}' is not served by a provider of type '{api}', so it cannot be "
                f"called through the {api} API; call it through /v1/chat/completions instead.",
                param="model",
            )
        return entry, narrowed

    def resolve(self, identity: Identity, alias: str, api: str) -> tuple[Target, NativeUpstream]:
        """The first target serving ``alias`` for a caller of ``api``:
        ModelNotFound, ProviderUnavailable, PermissionDenied or InvalidRequest
        (no target of that API) otherwise. The key's permission is checked
        first (a 403 before any 404 or 503), as on /v1/chat/completions."""
        _, narrowed = self._serving(identity, alias, api)
        target = narrowed.targets[0][0]
        return target, self._natives[target.provider]

    async def forward(
        self,
        identity: Identity,
        api: str,
        alias: str,
        endpoint: str,
        build: Callable[[Target], NativeRequest],
        request_id: str,
        started: float,
        body: bytes = b"",
        max_output: int | None = None,
    ) -> Relayed:
        """Admit the request (permission, route, targets of ``api``, the
        governor: ``body`` and ``max_output`` estimate its tokens), then serve
        it with failover over those targets, ``build`` making the upstream
        request for each; relay the reply, and its stream (if any) wrapped so
        that it is accounted for when the server closes it. When every attempt
        got a 408, 429 or 5xx, the last answer is relayed as is."""
        pipeline = self.pipeline
        ticket: Ticket | None = None
        try:
            entry, narrowed = self._serving(identity, alias, api)
            if identity.scopes:
                ticket = (
                    pipeline.govern(identity, entry, body, max_output)
                    if pipeline.local
                    else await pipeline.govern_shared(identity, entry, body, max_output)
                )
            outcome = await self._failover.serve(
                narrowed, _send, (self._natives, build), request_id, self._monotonic()
            )
        except RelayedFailure as failed:
            provider, model, attempts = failure_of(failed)
            reply = failed.reply
            pipeline.account(
                identity, alias, request_id, started, endpoint, provider, model, None,
                reply.status, attempts, ticket,
            )  # fmt: skip
            return Relayed(reply, None, ticket.headers if ticket is not None else ())
        except BaseException as exc:
            provider, model, attempts = failure_of(exc)
            # A native error is answered in the API's own shape, without
            # Gandalf's routing headers.
            pipeline.account(
                identity, alias, request_id, started, endpoint, provider, model, None,
                failure_status(exc), attempts, ticket,
            )  # fmt: skip
            if ticket is not None:
                tell(exc, ticket)
            raise
        reply, slot = outcome.value, outcome.slot
        headers = ticket.headers if ticket is not None else ()
        if reply.stream is not None:
            stream = RecordedNativeStream(
                reply.stream, pipeline, identity, alias, request_id, started, endpoint,
                slot, ticket, outcome.attempts, self._monotonic,
            )  # fmt: skip
            return Relayed(reply, stream, headers)
        pipeline.account(
            identity, alias, request_id, started, endpoint, slot.name, slot.target.model,
            reply.usage, reply.status, outcome.attempts, ticket,
        )  # fmt: skip
        return Relayed(reply, None, headers)
