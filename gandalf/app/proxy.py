"""ProxyService: resolve the alias, call the provider, emit one usage record.

Every request that reaches the service leaves exactly one UsageRecord, whatever
its outcome; the record is handed over with a synchronous ``put_nowait`` and
never awaited. A stream's record is written when the stream ends: its status
says how (200, an upstream error's status, 499 client gone, 503 shutdown).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from gandalf.app.router import RouteEntry, RouteTable
from gandalf.domain import (
    CANCEL_SHUTDOWN,
    ChatCall,
    ChatRequest,
    ChatStream,
    EmbeddingsCall,
    EmbeddingsRequest,
    Identity,
    Provider,
    ProviderReply,
    Target,
    Usage,
    UsageRecord,
)
from gandalf.errors import GatewayError, PermissionDenied

_T = TypeVar("_T")


class UsageSink(Protocol):
    def record_usage(self, record: UsageRecord) -> None: ...


class _Accounting:
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
        self, target: Target | None, provider: str | None, usage: Usage | None, status: int
    ) -> None:
        identity = self.identity
        if usage is not None:
            prompt, completion, total = (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
            )
        else:
            prompt = completion = total = 0
        self.sink.record_usage(
            UsageRecord(
                self.request_id,
                identity.key_id,
                identity.org_id,
                self.alias,
                target.model if target is not None else None,
                provider,
                prompt,
                completion,
                total,
                (time.perf_counter() - self.started) * 1000.0,
                status,
                self.wall(),
                self.endpoint,
            )
        )


def _failure_status(exc: BaseException) -> int:
    if isinstance(exc, GatewayError):
        return exc.status
    if isinstance(exc, asyncio.CancelledError):
        # 503: cut off by the shutdown deadline; 499: the client went away (nginx's code).
        return 503 if exc.args and exc.args[0] == CANCEL_SHUTDOWN else 499
    return 500


class RecordedStream:
    """A provider's ChatStream whose usage is recorded once, when the server
    closes it with the status it ended with. Iterating it iterates the
    provider's stream directly: no extra layer per chunk."""

    __slots__ = ("_accounting", "_done", "_provider", "_stream", "_target")

    def __init__(
        self, stream: ChatStream, accounting: _Accounting, target: Target, provider: str
    ) -> None:
        self._stream = stream
        self._accounting = accounting
        self._target = target
        self._provider = provider
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
            self._accounting.record(self._target, self._provider, usage, status)
        await self._stream.aclose()


class ProxyService:
    __slots__ = ("_clock", "_sink", "routes")

    def __init__(
        self,
        routes: RouteTable,
        sink: UsageSink,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.routes = routes
        self._sink = sink
        self._clock = clock

    def _resolve(self, identity: Identity, alias: str) -> RouteEntry:
        entry = self.routes.resolve(alias)
        if not identity.may_use(alias):
            raise PermissionDenied(
                f"This API key is not allowed to use model '{alias}'.", param="model"
            )
        return entry

    def _pick(self, entry: RouteEntry) -> tuple[Target, Provider]:
        # Failover across entry.targets comes later; today the first live target serves.
        return entry.targets[0]

    async def chat(
        self,
        identity: Identity,
        request: ChatRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> ProviderReply:
        """Serve one chat completion. ``started`` is ``time.perf_counter()`` at arrival.

        The hot path: written out flat (no helper objects or calls) on purpose.
        """
        alias = request.model
        target = provider = None
        try:
            entry = self.routes.resolve(alias)
            if not identity.may_use(alias):
                raise PermissionDenied(
                    f"This API key is not allowed to use model '{alias}'.", param="model"
                )
            # Failover across entry.targets comes later; today the first live target serves.
            target, provider = entry.targets[0]
            reply = await provider.chat(
                ChatCall(
                    body=body, request=request, alias=alias, target=target, request_id=request_id
                )
            )
        except BaseException as exc:
            self._sink.record_usage(
                UsageRecord(
                    request_id,
                    identity.key_id,
                    identity.org_id,
                    alias,
                    target.model if target is not None else None,
                    provider.name if provider is not None else None,
                    0,
                    0,
                    0,
                    (time.perf_counter() - started) * 1000.0,
                    _failure_status(exc),
                    self._clock(),
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
                target.model,
                provider.name,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                (time.perf_counter() - started) * 1000.0,
                reply.status,
                self._clock(),
            )
        )
        return reply

    async def chat_stream(
        self,
        identity: Identity,
        request: ChatRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> RecordedStream:
        """Open a streamed chat completion. Failures before the upstream accepted
        the request raise (and are recorded); later ones end the stream."""
        accounting = _Accounting(
            self._sink, identity, request.model, request_id, started, "chat", self._clock
        )
        stream, target, provider = await self._call(
            accounting,
            lambda provider, target: provider.stream(
                ChatCall(
                    body=body,
                    request=request,
                    alias=request.model,
                    target=target,
                    request_id=request_id,
                )
            ),
        )
        return RecordedStream(stream, accounting, target, provider.name)

    async def embeddings(
        self,
        identity: Identity,
        request: EmbeddingsRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> ProviderReply:
        accounting = _Accounting(
            self._sink, identity, request.model, request_id, started, "embeddings", self._clock
        )
        reply, target, provider = await self._call(
            accounting,
            lambda provider, target: provider.embeddings(
                EmbeddingsCall(
                    body=body,
                    request=request,
                    alias=request.model,
                    target=target,
                    request_id=request_id,
                )
            ),
        )
        accounting.record(target, provider.name, reply.usage, reply.status)
        return reply

    async def _call(
        self,
        accounting: _Accounting,
        invoke: Callable[[Provider, Target], Awaitable[_T]],
    ) -> tuple[_T, Target, Provider]:
        """Resolve the alias, check the key, call ``invoke`` on the serving target;
        a failure is recorded (with whatever target was reached) and re-raised."""
        target = provider = None
        try:
            target, provider = self._pick(self._resolve(accounting.identity, accounting.alias))
            return await invoke(provider, target), target, provider
        except BaseException as exc:
            accounting.record(
                target, provider.name if provider else None, None, _failure_status(exc)
            )
            raise
