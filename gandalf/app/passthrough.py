"""PassthroughService: native provider APIs (Anthropic, Gemini, Azure OpenAI,
Ollama) relayed through Gandalf's routing, permissions and accounting.

The model a client names (in the body or the path) is a route alias like any
other: the route table resolves it, the key's ``allowed_models`` applies, and
the first live target whose provider speaks the caller's API serves it (the
request is relayed untouched, so only a provider of that very type can).
Every request that reaches the service leaves one usage record, as for
``/v1/chat/completions``; a stream's record is written when it ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

from gandalf.app.proxy import Accounting, UsageSink, failure_status
from gandalf.app.router import RouteTable
from gandalf.domain import (
    Identity,
    NativeReply,
    NativeRequest,
    NativeStream,
    ProviderConfig,
    Target,
)
from gandalf.errors import GatewayError, InvalidRequest, PermissionDenied, printable

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
    """A native stream whose usage is recorded when the server closes it."""

    __slots__ = ("_accounting", "_done", "_provider", "_stream", "_target")

    def __init__(
        self, stream: NativeStream, accounting: Accounting, target: Target, provider: str
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
            self._accounting.record(self._target, self._provider, self._stream.usage, status)
        await self._stream.aclose()


class PassthroughService:
    __slots__ = ("_clock", "_natives", "_sink", "routes")

    def __init__(
        self,
        routes: RouteTable,
        natives: Mapping[str, NativeUpstream],
        sink: UsageSink,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.routes = routes
        self._natives = natives
        self._sink = sink
        self._clock = clock

    def apis(self) -> set[str]:
        """The native APIs some configured provider speaks."""
        return {native.config.type for native in self._natives.values()}

    def models(self, identity: Identity, api: str) -> list[str]:
        """The aliases ``identity`` may call through ``api``, sorted."""
        return [
            alias
            for alias, _ in self.routes.models()
            if identity.may_use(alias) and self._target(alias, api) is not None
        ]

    def _target(self, alias: str, api: str) -> tuple[Target, NativeUpstream] | None:
        entry = self.routes.resolve(alias)
        for target, _ in entry.targets:
            native = self._natives.get(target.provider)
            if native is not None and native.config.type == api:
                return target, native
        return None

    def resolve(self, identity: Identity, alias: str, api: str) -> tuple[Target, NativeUpstream]:
        """The target serving ``alias`` for a caller of ``api``: ModelNotFound,
        ProviderUnavailable, PermissionDenied or InvalidRequest (no target of
        that API) otherwise. The key's permission is checked first (a 403
        before any 404 or 503), as on /v1/chat/completions."""
        if not identity.may_use(alias):
            raise PermissionDenied(
                f"This API key is not allowed to use model '{alias}'.", param="model"
            )
        self.routes.resolve(alias)
        found = self._target(alias, api)
        if found is None:
            raise InvalidRequest(
                f"Model '{alias}' is not served by a provider of type '{api}', so it cannot be "
                f"called through the {api} API; call it through /v1/chat/completions instead.",
                param="model",
            )
        return found

    async def forward(
        self,
        identity: Identity,
        api: str,
        alias: str,
        endpoint: str,
        build: Callable[[Target], NativeRequest],
        request_id: str,
        started: float,
    ) -> tuple[NativeReply, RecordedNativeStream | None]:
        """Resolve ``alias``, build the upstream request for the serving target
        and relay it: the reply, and its stream (if any) wrapped so that its
        usage is recorded when the server closes it."""
        accounting = Accounting(
            self._sink, identity, alias, request_id, started, endpoint, self._clock
        )
        target: Target | None = None
        provider: str | None = None
        try:
            target, native = self.resolve(identity, alias, api)
            provider = native.name
            reply = await native.send(build(target))
        except BaseException as exc:
            if provider is not None and isinstance(exc, GatewayError):
                _attempt_failed(provider, target, exc.status, exc.message, request_id)
            accounting.record(target, provider, None, failure_status(exc))
            raise
        if reply.status == 429 or reply.status >= 500:
            _attempt_failed(native.name, target, reply.status, "relayed as is", request_id)
        if reply.stream is not None:
            return reply, RecordedNativeStream(reply.stream, accounting, target, native.name)
        accounting.record(target, provider, reply.usage, reply.status)
        return reply, None
