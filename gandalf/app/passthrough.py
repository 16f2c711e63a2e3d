"""PassthroughService: native provider APIs (Anthropic, Gemini, Azure OpenAI,
Ollama) relayed through Gandalf's routing, permissions and accounting.

The model a client names (in the body or the path) is a route alias like any
other: the route table resolves it, the key's ``allowed_models`` applies, and
the first live target whose provider speaks the caller's API serves it (the
request is relayed untouched, so only a provider of that very type can).
It goes through the request pipeline's stages (app/pipeline.py) like
``/v1/chat/completions``: ``admit`` (the key's permission, the route, the
governor), one attempt (a native call is relayed to one target: no
failover), ``account`` (one usage record, cost, the ticket settled; a
stream's when it ends).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Protocol

from gandalf.app.governance import Governor, Ticket
from gandalf.app.pipeline import (
    CostOf,
    Pipeline,
    PriceWorstCase,
    UsageSink,
    failure_status,
    no_cost,
    no_price,
    tell,
)
from gandalf.app.router import RouteEntry, RouteTable
from gandalf.domain import (
    Identity,
    NativeReply,
    NativeRequest,
    NativeStream,
    ProviderConfig,
    Target,
)
from gandalf.errors import GatewayError, InvalidRequest, printable

logger = logging.getLogger("gandalf.resilience")


def _attempt_failed(
    provider: str, target: Target | None, status: int, message: str, request_id: str
) -> None:
    """The WARNING line of a failed native attempt, as app/failover.py writes
    for /v1 calls (a native call makes one attempt: no failover)."""
    if logger.isEnabledFor(logging.WARNING):
        logger.warning(
            "upstream attempt 1 failed: provider %r, model %s, status %d: %s (request %s)",
            printable(provider),
            printable(target.model) if target is not None else "-",
            status,
            printable(message, 300),
            request_id,
        )


class NativeUpstream(Protocol):
    """One provider's native API (provider/native.py's NativeClient)."""

    name: str
    config: ProviderConfig

    async def send(self, request: NativeRequest) -> NativeReply: ...


class RecordedNativeStream:
    """A native stream accounted for (Pipeline.account) when the server closes it."""

    __slots__ = (
        "_alias",
        "_done",
        "_endpoint",
        "_identity",
        "_model",
        "_pipeline",
        "_provider",
        "_request_id",
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
        target: Target,
        provider: str,
        ticket: Ticket | None,
    ) -> None:
        self._stream = stream
        self._pipeline = pipeline
        self._identity = identity
        self._alias = alias
        self._request_id = request_id
        self._started = started
        self._endpoint = endpoint
        self._model = target.model
        self._provider = provider
        self._ticket = ticket
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()

    async def aclose(self, status: int) -> None:
        if not self._done:
            self._done = True
            self._pipeline.account(
                self._identity,
                self._alias,
                self._request_id,
                self._started,
                self._endpoint,
                self._provider,
                self._model,
                self._stream.usage,
                status,
                1,
                self._ticket,
            )
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
    __slots__ = ("_natives", "pipeline", "routes")

    def __init__(
        self,
        routes: RouteTable,
        natives: Mapping[str, NativeUpstream],
        sink: UsageSink,
        *,
        clock: Callable[[], float] = time.time,
        governor: Governor | None = None,
        price: PriceWorstCase = no_price,
        cost: CostOf = no_cost,
    ) -> None:
        """``governor``, ``price``, ``cost``: the pipeline's hooks
        (app/pipeline.py); None / unpriced by default."""
        self.routes = routes
        self._natives = natives
        self.pipeline = Pipeline(sink, clock=clock, governor=governor, price=price, cost=cost)

    def apis(self) -> set[str]:
        """The native APIs some configured provider speaks."""
        return {native.config.type for native in self._natives.values()}

    def models(self, identity: Identity, api: str) -> list[str]:
        """The aliases ``identity`` may call through ``api``, sorted."""
        return [
            alias
            for alias, _ in self.routes.models()
            if identity.may_use(alias) and self._target(self.routes.resolve(alias), api) is not None
        ]

    def _target(self, entry: RouteEntry, api: str) -> tuple[Target, NativeUpstream] | None:
        for target, _ in entry.targets:
            native = self._natives.get(target.provider)
            if native is not None and native.config.type == api:
                return target, native
        return None

    def _serving(
        self, identity: Identity, alias: str, api: str
    ) -> tuple[RouteEntry, Target, NativeUpstream]:
        entry = self.pipeline.route(self.routes, identity, alias)
        found = self._target(entry, api)
        if found is None:
            raise InvalidRequest(
                f"Model '{alias}' is not served by a provider of type '{api}', so it cannot be "
                f"called through the {api} API; call it through /v1/chat/completions instead.",
                param="model",
            )
        return entry, *found

    def resolve(self, identity: Identity, alias: str, api: str) -> tuple[Target, NativeUpstream]:
        """The target serving ``alias`` for a caller of ``api``: ModelNotFound,
        ProviderUnavailable, PermissionDenied or InvalidRequest (no target of
        that API) otherwise. The key's permission is checked first (a 403
        before any 404 or 503), as on /v1/chat/completions (Pipeline.route)."""
        _, target, native = self._serving(identity, alias, api)
        return target, native

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
        """Admit the request (permission, route, a target of ``api``, the
        governor: ``body`` and ``max_output`` estimate its tokens), build the
        upstream request for the serving target and relay it: the reply, and
        its stream (if any) wrapped so that it is accounted for when the
        server closes it."""
        pipeline = self.pipeline
        target: Target | None = None
        provider: str | None = None
        ticket: Ticket | None = None
        try:
            entry, target, native = self._serving(identity, alias, api)
            ticket = pipeline.govern(identity, entry, body, max_output)
            provider = native.name
            reply = await native.send(build(target))
        except BaseException as exc:
            if provider is not None and isinstance(exc, GatewayError):
                _attempt_failed(provider, target, exc.status, exc.message, request_id)
            # The one attempt's facts go to the record directly: a native error
            # is answered in the API's own shape, without Gandalf's routing headers.
            pipeline.account(
                identity, alias, request_id, started, endpoint, provider,
                target.model if target is not None and provider is not None else None, None,
                failure_status(exc), 0 if provider is None else 1, ticket,
            )  # fmt: skip
            if ticket is not None:
                tell(exc, ticket)
            raise
        if reply.status == 429 or reply.status >= 500:
            _attempt_failed(provider, target, reply.status, "relayed as is", request_id)
        headers = ticket.headers if ticket is not None else ()
        if reply.stream is not None:
            stream = RecordedNativeStream(
                reply.stream, pipeline, identity, alias, request_id, started, endpoint, target,
                provider, ticket,
            )  # fmt: skip
            return Relayed(reply, stream, headers)
        pipeline.account(
            identity, alias, request_id, started, endpoint, provider, target.model, reply.usage,
            reply.status, 1, ticket,
        )  # fmt: skip
        return Relayed(reply, None, headers)
