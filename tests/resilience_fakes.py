"""Fakes for the routing and resilience tests: a scripted provider, a clock, a sleep."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec

from gandalf.app.failover import Outcome
from gandalf.app.governance import Governor
from gandalf.app.health import HealthRegistry
from gandalf.app.pipeline import CostOf, no_cost
from gandalf.app.proxy import ProxyService
from gandalf.app.router import RouteTable
from gandalf.domain import (
    ChatCall,
    ChatRequest,
    EmbeddingsCall,
    EmbeddingsRequest,
    Identity,
    ProviderConfig,
    ProviderReply,
    Resilience,
    Route,
    Target,
    Usage,
    UsageRecord,
)

T0 = 1000.0  # the fake monotonic clock's start
WALL0 = 1_700_000_000.0  # the fake wall clock at T0


class FakeClock:
    """A monotonic clock that only moves when told."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + (self.now - T0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSleep:
    """``sleep`` for ProxyService: records each wait and moves the clock by it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)


class ListSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record_usage(self, record: UsageRecord) -> None:
        self.records.append(record)


Scripted = BaseException | None  # None: answer


class FakeStream:
    def __init__(self, chunks: Sequence[bytes], fail: BaseException | None = None) -> None:
        self._chunks = list(chunks)
        self._fail = fail
        self.closed = False

    @property
    def usage(self) -> Usage | None:
        return None

    @property
    def events(self) -> int:
        return len(self._chunks)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
        if self._fail is not None:
            raise self._fail

    async def aclose(self) -> None:
        self.closed = True


class FakeProvider:
    """A provider whose answers are scripted.

    ``fail``: raise this on every call (None: answer). ``script``: outcomes for
    the next calls, taking precedence over ``fail`` while it lasts. ``latency``:
    seconds the fake clock moves during a call. ``gate``: calls wait for it.
    """

    def __init__(
        self,
        name: str,
        *,
        clock: FakeClock | None = None,
        fail: BaseException | None = None,
        latency: float = 0.0,
    ) -> None:
        self.name = name
        self.config = ProviderConfig(name=name, type="fake")
        self.clock = clock
        self.fail = fail
        self.script: list[Scripted] = []
        self.latency = latency
        self.gate: asyncio.Event | None = None
        self.calls: list[ChatCall | EmbeddingsCall] = []
        self.stream_fail: BaseException | None = None  # raised while iterating a stream

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _answer(self, call: ChatCall | EmbeddingsCall) -> None:
        self.calls.append(call)
        if self.gate is not None:
            await self.gate.wait()
        if self.clock is not None and self.latency:
            self.clock.advance(self.latency)
        outcome = self.script.pop(0) if self.script else self.fail
        if outcome is not None:
            raise outcome

    async def chat(self, call: ChatCall) -> ProviderReply:
        await self._answer(call)
        body = msgspec.json.encode({"served_by": self.name, "model": call.target.model})
        return ProviderReply(
            body=body, usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
        )

    async def stream(self, call: ChatCall) -> FakeStream:
        await self._answer(call)
        return FakeStream([b"data: " + self.name.encode() + b"\n\n"], self.stream_fail)

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply:
        await self._answer(call)
        return ProviderReply(body=self.name.encode(), usage=Usage(prompt_tokens=2, total_tokens=2))


IDENTITY = Identity(
    key_id="key-1",
    key_hash="h",
    name="test",
    org_id="org",
    team_id=None,
    role="member",
    permissions=0b1111111,
    allowed_models=None,
    expires_at=None,
)


def chat_body(model: str = "m", **fields: Any) -> tuple[ChatRequest, bytes]:
    body = msgspec.json.encode(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    )
    return msgspec.json.decode(body, type=ChatRequest), body


def embeddings_body(model: str = "m") -> tuple[EmbeddingsRequest, bytes]:
    body = msgspec.json.encode({"model": model, "input": "hi"})
    return msgspec.json.decode(body, type=EmbeddingsRequest), body


def route(
    alias: str,
    *targets: tuple[str, int] | tuple[str, int, int],
    strategy: str = "priority",
    max_attempts: int | None = None,
    coalesce: bool = False,
) -> Route:
    """``targets``: (provider, priority) or (provider, priority, weight); the
    target model is ``<provider>-model``."""
    return Route(
        model_alias=alias,
        targets=tuple(
            Target(
                provider=t[0],
                model=f"{t[0]}-model",
                priority=t[1],
                weight=t[2] if len(t) > 2 else 1,
            )
            for t in targets
        ),
        strategy=strategy,
        max_attempts=max_attempts,
        coalesce=coalesce,
    )


class Harness:
    """A ProxyService over fake providers, a fake clock, a seeded rng and a
    recording sleep (and the pipeline's ``governor`` / ``cost`` hooks)."""

    def __init__(
        self,
        routes: Sequence[Route],
        providers: Sequence[FakeProvider],
        *,
        resilience: Resilience | None = None,
        seed: int = 1,
        governor: Governor | None = None,
        cost: CostOf = no_cost,
    ) -> None:
        self.clock = FakeClock()
        for provider in providers:
            provider.clock = self.clock
        self.sleep = RecordingSleep(self.clock)
        self.sink = ListSink()
        self.providers = {p.name: p for p in providers}
        table = RouteTable.build(
            routes, self.providers, {}, health=HealthRegistry(resilience or Resilience())
        )
        self.service = ProxyService(
            table,
            self.sink,
            clock=self.clock.wall,
            monotonic=self.clock,
            rng=random.Random(seed),
            sleep=self.sleep,
            governor=governor,
            cost=cost,
        )

    async def chat(self, model: str = "m", **fields: Any) -> Outcome[ProviderReply]:
        request, body = chat_body(model, **fields)
        return await self.service.chat(IDENTITY, request, body, "req", 0.0)

    def calls(self, name: str) -> int:
        return len(self.providers[name].calls)


def served_by(outcome: Outcome[ProviderReply]) -> str:
    name: str = msgspec.json.decode(outcome.value.body)["served_by"]
    return name


async def settle() -> None:
    """Let every task that can run, run (a few loop turns; no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)
