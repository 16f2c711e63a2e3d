"""ProxyService: resolve the alias, call the provider, emit one usage record.

Every request that reaches the service leaves exactly one UsageRecord, whatever
its outcome; the record is handed over with a synchronous ``put_nowait`` and
never awaited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from gandalf.app.router import RouteTable
from gandalf.domain import ChatCall, ChatRequest, Identity, ProviderReply, UsageRecord
from gandalf.errors import GatewayError, PermissionDenied


class UsageSink(Protocol):
    def record_usage(self, record: UsageRecord) -> None: ...


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

    async def chat(
        self,
        identity: Identity,
        request: ChatRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> ProviderReply:
        """Serve one chat completion. ``started`` is ``time.perf_counter()`` at arrival."""
        alias = request.model
        target = None
        provider_name = None
        try:
            entry = self.routes.resolve(alias)
            if not identity.may_use(alias):
                raise PermissionDenied(
                    f"This API key is not allowed to use model '{alias}'.", param="model"
                )
            # Failover across entry.targets comes later; today the first live target serves.
            target, provider = entry.targets[0]
            provider_name = provider.name
            reply = await provider.chat(
                ChatCall(
                    body=body, request=request, alias=alias, target=target, request_id=request_id
                )
            )
        except GatewayError as exc:
            self._record(
                identity,
                alias,
                target.model if target else None,
                provider_name,
                None,
                exc.status,
                request_id,
                started,
            )
            raise
        except BaseException as exc:
            # 499: the client went away and the request was cancelled (nginx's convention).
            status = 499 if isinstance(exc, asyncio.CancelledError) else 500
            self._record(
                identity,
                alias,
                target.model if target else None,
                provider_name,
                None,
                status,
                request_id,
                started,
            )
            raise
        self._record(
            identity, alias, target.model, provider_name, reply, reply.status, request_id, started
        )
        return reply

    def _record(
        self,
        identity: Identity,
        alias: str,
        target_model: str | None,
        provider: str | None,
        reply: ProviderReply | None,
        status: int,
        request_id: str,
        started: float,
    ) -> None:
        if reply is not None:
            usage = reply.usage
            prompt, completion, total = (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
            )
        else:
            prompt = completion = total = 0
        self._sink.record_usage(
            UsageRecord(
                request_id,
                identity.key_id,
                identity.org_id,
                alias,
                target_model,
                provider,
                prompt,
                completion,
                total,
                (time.perf_counter() - started) * 1000.0,
                status,
                self._clock(),
            )
        )
