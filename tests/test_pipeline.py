"""The request pipeline (app/pipeline.py): the governor hook, accounting, the
ticket's headers, on every path (chat, stream, embeddings, native passthrough),
in process and through the server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from gandalf.app.cache import InProcessCache
from gandalf.app.governance import Estimate, Ticket
from gandalf.app.passthrough import PassthroughService
from gandalf.app.pipeline import Pipeline, estimate
from gandalf.app.proxy import ProxyService
from gandalf.app.router import RouteTable
from gandalf.auth.apikey import KeyCache
from gandalf.domain import (
    ApiKey,
    Budget,
    ChatCall,
    Identity,
    NativeReply,
    NativeRequest,
    ProviderConfig,
    ProviderReply,
    Scope,
    Target,
    Usage,
    UsageRecord,
)
from gandalf.errors import PermissionDenied, RateLimited, UpstreamError
from gandalf.server.asgi import GandalfApp, Runtime
from gandalf.server.handlers import Api
from gandalf.server.native import NativeApi
from tests.asgi_client import call
from tests.resilience_fakes import (
    IDENTITY,
    FakeProvider,
    FakeStream,
    Harness,
    ListSink,
    chat_body,
    embeddings_body,
    route,
    settle,
)

SCOPES = (Scope(kind="key", id="key-1", rpm=10), Scope(kind="org", id="org", tpm=1000))
SCOPED = msgspec.structs.replace(IDENTITY, team_id="team-1", scopes=SCOPES)
LIMITS = [(b"x-ratelimit-limit-requests", b"10"), (b"x-ratelimit-remaining-requests", b"9")]
DETAILED = Usage(
    prompt_tokens=10,
    completion_tokens=20,
    total_tokens=30,
    cached_prompt_tokens=4,
    cache_write_tokens=2,
    reasoning_tokens=5,
)


class FakeTicket:
    def __init__(self, number: int) -> None:
        self.number = number
        self.headers = list(LIMITS)
        self.open = True


class FakeGovernor:
    """Records every call; ``refuse``: admit raises it."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse = refuse

    def admit(self, scopes: tuple[Scope, ...], estimate: Estimate) -> Ticket:
        self.calls.append(("admit", scopes, estimate))
        if self.refuse is not None:
            raise self.refuse
        return FakeTicket(sum(1 for c in self.calls if c[0] == "admit"))

    def settle(self, ticket: Ticket, tokens: int, usd: float | None) -> None:
        assert isinstance(ticket, FakeTicket)
        self.calls.append(("settle", ticket.number, tokens, usd))

    def release(self, ticket: Ticket) -> None:
        assert isinstance(ticket, FakeTicket)
        self.calls.append(("release", ticket.number))

    def ends(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] != "admit"]


class DetailedProvider(FakeProvider):
    """Answers with every detail count set (cached, cache-write, reasoning)."""

    async def chat(self, call: ChatCall) -> ProviderReply:
        reply = await super().chat(call)
        return ProviderReply(body=reply.body, usage=DETAILED)


def price(provider: str, model: str, usage: Usage) -> float | None:
    """A cost hook: one cent per token of the target model 'a-model'."""
    return usage.total_tokens * 0.01 if (provider, model) == ("a", "a-model") else None


def harness(*providers: FakeProvider, governor: FakeGovernor | None = None, **kw: Any) -> Harness:
    names = [p.name for p in providers] or ["a"]
    return Harness(
        [route("m", *((n, i + 1) for i, n in enumerate(names)), **kw)],
        list(providers) or [FakeProvider("a")],
        governor=governor,
        cost=price,
    )


# ---------------------------------------------------------------------------- estimate


def test_the_estimate_is_a_quarter_of_the_body_plus_the_output_limit() -> None:
    h = harness()
    entry = h.service.routes.resolve("m")
    assert estimate(entry, b"x" * 400, 50) == Estimate(tokens=150, usd=None)
    assert estimate(entry, b"x" * 400, None) == Estimate(tokens=100, usd=None)
    priced = estimate(entry, b"x" * 40, 7, lambda e, i, o: (e.alias, i, o) == ("m", 10, 7) or None)
    assert priced.usd == 1.0


def test_only_a_budget_gets_a_worst_case_price() -> None:
    """Limits alone need the tokens; the worst-case cost (a lookup and
    arithmetic per request) is worked out only when a level sets a budget."""
    priced: list[str] = []

    def worst(entry: Any, tokens_in: int, tokens_out: int) -> float:
        priced.append(entry.alias)
        return 0.5

    governor = FakeGovernor()
    h = harness(governor=governor)
    pipeline = Pipeline(h.sink, governor=governor, price=worst)
    entry = h.service.routes.resolve("m")
    pipeline.govern(SCOPED, entry, b"x" * 40, 8)  # rpm and tpm, no budget
    assert priced == [] and governor.calls[-1][2] == Estimate(tokens=18, usd=None)
    budget = Scope(kind="team", id="team-1", budget=Budget(usd=5.0, period="daily"))
    funded = msgspec.structs.replace(SCOPED, scopes=(*SCOPES, budget), budgeted=True)
    pipeline.govern(funded, entry, b"x" * 40, 8)
    assert priced == ["m"] and governor.calls[-1][2] == Estimate(tokens=18, usd=0.5)


def test_without_a_governor_a_limited_caller_is_not_governed() -> None:
    h = harness()
    pipeline = Pipeline(h.sink)
    assert pipeline.govern(SCOPED, h.service.routes.resolve("m"), b"x" * 40, 8) is None


def test_a_closed_ticket_is_neither_settled_nor_released() -> None:
    """A ticket with nothing to settle (rpm alone: ``open`` False) costs the
    pipeline no governor call when the request ends, served or failed."""
    governor = FakeGovernor()
    h = harness(governor=governor)
    pipeline = Pipeline(h.sink, governor=governor)
    closed = FakeTicket(1)
    closed.open = False
    pipeline.account(SCOPED, "m", "r1", 0.0, "chat", "p", "m", DETAILED, 200, 1, closed)
    pipeline.account(SCOPED, "m", "r2", 0.0, "chat", "p", "m", None, 502, 1, closed)
    assert governor.ends() == []
    pipeline.account(SCOPED, "m", "r3", 0.0, "chat", "p", "m", DETAILED, 200, 1, FakeTicket(2))
    assert governor.ends() == [("settle", 2, 30, None)]


# ---------------------------------------------------------------------------- chat


def test_chat_admits_with_the_scopes_and_settles_with_the_usage() -> None:
    governor = FakeGovernor()
    h = harness(governor=governor)
    request, body = chat_body(max_completion_tokens=64)
    outcome = asyncio.run(h.service.chat(SCOPED, request, body, "req", 0.0))
    assert governor.calls[0] == ("admit", SCOPES, Estimate(tokens=len(body) // 4 + 64, usd=None))
    assert governor.ends() == [("settle", 1, 7, pytest.approx(0.07))]
    assert list(outcome.headers) == LIMITS
    (record,) = h.sink.records
    assert (record.team_id, record.cost_usd, record.total_tokens) == ("team-1", 0.07, 7)


@pytest.mark.parametrize("cached", [False, True], ids=["route", "caching-route"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("fields", "output"),
    [
        ({"max_tokens": 40, "n": 3}, 120),
        ({"max_completion_tokens": 40, "max_tokens": 999, "n": 2}, 80),
        ({"max_tokens": 40, "n": 1}, 40),
        ({"max_tokens": 40}, 40),
        ({"n": 4}, None),  # no limit: the allowance (README: the bound without max_tokens)
    ],
)
def test_the_output_limit_counts_once_per_choice(
    fields: dict[str, Any], output: int | None, stream: bool, cached: bool
) -> None:
    # max_tokens bounds each of the n choices: a budget reserving it once
    # would be overshot by a request asking for many choices.
    governor = FakeGovernor()
    table = RouteTable.build(
        [route("m", ("a", 1))],
        {"a": FakeProvider("a")},
        {},
        cache=InProcessCache(clock=time.monotonic) if cached else None,
        cache_all=cached,
    )
    service = ProxyService(table, ListSink(), governor=governor)
    request, body = chat_body(temperature=0, stream=stream, **fields)

    async def scenario() -> None:
        if stream:
            opened = await service.chat_stream(SCOPED, request, body, "s", 0.0)
            await opened.value.aclose(200)
        else:
            await service.chat(SCOPED, request, body, "c", 0.0)

    asyncio.run(scenario())
    tokens = len(body) // 4 + (output or 0)
    assert governor.calls[0] == ("admit", SCOPES, Estimate(tokens=tokens, usd=None))


def test_no_scopes_no_governor_call_and_no_headers() -> None:
    governor = FakeGovernor()
    h = harness(governor=governor)
    outcome = asyncio.run(h.chat())
    request, body = chat_body(stream=True)

    async def stream() -> None:
        opened = await h.service.chat_stream(IDENTITY, request, body, "s", 0.0)
        assert opened.headers == ()
        await opened.value.aclose(200)

    asyncio.run(stream())
    embed, ebody = embeddings_body()
    asyncio.run(h.service.embeddings(IDENTITY, embed, ebody, "e", 0.0))
    assert governor.calls == [] and outcome.headers == ()
    assert len(h.sink.records) == 3


def test_a_failed_chat_releases_its_ticket() -> None:
    governor = FakeGovernor()
    h = harness(FakeProvider("a", fail=UpstreamError("down")), governor=governor)
    request, body = chat_body()
    with pytest.raises(UpstreamError):
        asyncio.run(h.service.chat(SCOPED, request, body, "req", 0.0))
    assert governor.ends() == [("release", 1)]
    (record,) = h.sink.records
    assert (record.status, record.provider, record.target_model) == (502, "a", "a-model")
    assert (record.team_id, record.cost_usd) == ("team-1", None)


def test_a_failed_call_tells_its_limits_on_the_error() -> None:
    governor = FakeGovernor()
    h = harness(FakeProvider("a", fail=UpstreamError("down")), governor=governor)
    request, body = chat_body()
    with pytest.raises(UpstreamError) as raised:
        asyncio.run(h.service.chat(SCOPED, request, body, "req", 0.0))
    headers = dict(raised.value.headers())
    assert headers[b"x-ratelimit-limit-requests"] == b"10"
    assert headers[b"x-gandalf-provider"] == b"a"


def test_a_shared_failure_is_not_annotated_by_each_waiter() -> None:
    governor = FakeGovernor()
    a = FakeProvider("a", fail=UpstreamError("down"))
    a.gate = asyncio.Event()
    h = harness(a, governor=governor, coalesce=True)
    request, body = chat_body(temperature=0)

    async def scenario() -> list[BaseException | object]:
        tasks = [
            asyncio.create_task(h.service.chat(SCOPED, request, body, f"r{i}", 0.0))
            for i in range(3)
        ]
        await settle()
        assert a.gate is not None
        a.gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    (error, *others) = asyncio.run(scenario())
    assert isinstance(error, UpstreamError) and all(o is error for o in others)
    assert error.relayed == ()  # one exception for three requests: nobody's limits on it
    assert sorted(governor.ends()) == [("release", n) for n in (1, 2, 3)]
    assert sorted(r.attempts for r in h.sink.records) == [0, 0, 3]  # the leader retried


def test_the_permission_check_comes_before_the_governor() -> None:
    governor = FakeGovernor()
    h = harness(governor=governor)
    limited = msgspec.structs.replace(SCOPED, allowed_models=frozenset({"other"}))
    request, body = chat_body()
    with pytest.raises(PermissionDenied):
        asyncio.run(h.service.chat(limited, request, body, "req", 0.0))
    assert governor.calls == []
    assert [r.status for r in h.sink.records] == [403]


def test_a_refusal_by_the_governor_is_the_answer_and_is_recorded() -> None:
    governor = FakeGovernor(refuse=RateLimited("Rate limit of key 'x' reached: 10 rpm."))
    h = harness(governor=governor)
    request, body = chat_body()
    with pytest.raises(RateLimited):
        asyncio.run(h.service.chat(SCOPED, request, body, "req", 0.0))
    assert h.calls("a") == 0 and governor.ends() == []
    (record,) = h.sink.records
    assert (record.status, record.provider, record.attempts) == (429, None, 0)


def test_a_client_leaving_a_chat_releases_its_ticket() -> None:
    governor = FakeGovernor()
    a = FakeProvider("a")
    a.gate = asyncio.Event()
    h = harness(a, governor=governor)
    request, body = chat_body()

    async def scenario() -> None:
        task = asyncio.create_task(h.service.chat(SCOPED, request, body, "req", 0.0))
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert governor.ends() == [("release", 1)]
    (record,) = h.sink.records
    assert (record.status, record.provider, record.attempts) == (499, "a", 1)


def test_detail_counts_and_cost_reach_the_record() -> None:
    h = harness(DetailedProvider("a"))
    request, body = chat_body()
    asyncio.run(h.service.chat(SCOPED, request, body, "req", 0.0))
    (record,) = h.sink.records
    assert (
        record.prompt_tokens,
        record.completion_tokens,
        record.total_tokens,
        record.cached_prompt_tokens,
        record.cache_write_tokens,
        record.reasoning_tokens,
        record.team_id,
    ) == (10, 20, 30, 4, 2, 5, "team-1")
    assert record.cost_usd == pytest.approx(0.30)


def test_coalesced_waiters_each_settle_their_own_ticket() -> None:
    governor = FakeGovernor()
    a = FakeProvider("a")
    a.gate = asyncio.Event()
    h = harness(a, governor=governor, coalesce=True)
    request, body = chat_body(temperature=0)

    async def scenario() -> None:
        tasks = [
            asyncio.create_task(h.service.chat(SCOPED, request, body, f"r{i}", 0.0))
            for i in range(3)
        ]
        await settle()
        assert a.gate is not None
        a.gate.set()
        outcomes = await asyncio.gather(*tasks)
        assert all(list(o.headers) == LIMITS for o in outcomes)
        assert sorted(o.attempts for o in outcomes) == [0, 0, 1]

    asyncio.run(scenario())
    assert h.calls("a") == 1
    assert sorted(governor.ends()) == [("settle", n, 7, pytest.approx(0.07)) for n in (1, 2, 3)]
    assert len(h.sink.records) == 3


# ---------------------------------------------------------------------------- streams


def test_a_stream_settles_when_it_ends() -> None:
    governor = FakeGovernor()
    h = harness(governor=governor)
    request, body = chat_body(stream=True)

    async def scenario() -> None:
        opened = await h.service.chat_stream(SCOPED, request, body, "req", 0.0)
        assert list(opened.headers) == LIMITS and governor.ends() == []
        assert [chunk async for chunk in opened.value] == [b"data: a\n\n"]
        assert h.sink.records == []  # not before it ends
        await opened.value.aclose(200)
        await opened.value.aclose(200)  # idempotent

    asyncio.run(scenario())
    assert governor.ends() == [("settle", 1, 1, pytest.approx(0.01))]
    (record,) = h.sink.records
    assert (record.status, record.total_tokens, record.team_id) == (200, 1, "team-1")


def test_a_stream_that_fails_to_open_releases_its_ticket() -> None:
    governor = FakeGovernor()
    h = harness(FakeProvider("a", fail=UpstreamError("down")), governor=governor)
    request, body = chat_body(stream=True)
    with pytest.raises(UpstreamError):
        asyncio.run(h.service.chat_stream(SCOPED, request, body, "req", 0.0))
    assert governor.ends() == [("release", 1)]
    assert [r.status for r in h.sink.records] == [502]


def test_a_client_leaving_before_the_stream_opened_releases_its_ticket() -> None:
    governor = FakeGovernor()
    a = FakeProvider("a")
    a.gate = asyncio.Event()
    h = harness(a, governor=governor)
    request, body = chat_body(stream=True)

    async def scenario() -> None:
        task = asyncio.create_task(h.service.chat_stream(SCOPED, request, body, "req", 0.0))
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert governor.ends() == [("release", 1)]
    assert [(r.status, r.provider) for r in h.sink.records] == [(499, "a")]


class _Empty(FakeProvider):
    async def stream(self, call: ChatCall) -> FakeStream:
        await super().stream(call)
        return FakeStream([], UpstreamError("cut"))


def test_a_stream_failing_before_any_event_releases_its_ticket() -> None:
    governor = FakeGovernor()
    h = harness(_Empty("a"), governor=governor)
    request, body = chat_body(stream=True)

    async def scenario() -> None:
        opened = await h.service.chat_stream(SCOPED, request, body, "req", 0.0)
        with pytest.raises(UpstreamError):
            async for _ in opened.value:
                pass
        await opened.value.aclose(502)

    asyncio.run(scenario())
    assert governor.ends() == [("release", 1)]
    assert [r.status for r in h.sink.records] == [502]


def test_a_stream_cut_after_some_events_settles_what_it_spent() -> None:
    """Tokens relayed before the cut were spent upstream: they are settled
    (the client leaving cannot take them off its budget)."""
    governor = FakeGovernor()
    h = harness(governor=governor)
    request, body = chat_body(stream=True)

    async def scenario() -> None:
        opened = await h.service.chat_stream(SCOPED, request, body, "req", 0.0)
        async for _ in opened.value:
            break
        await opened.value.aclose(499)

    asyncio.run(scenario())
    assert governor.ends() == [("settle", 1, 1, pytest.approx(0.01))]
    assert [r.status for r in h.sink.records] == [499]


# ---------------------------------------------------------------------------- embeddings


def test_embeddings_go_through_the_same_stages() -> None:
    governor = FakeGovernor()
    h = harness(governor=governor)
    embed, body = embeddings_body()
    outcome = asyncio.run(h.service.embeddings(SCOPED, embed, body, "req", 0.0))
    assert governor.calls[0] == ("admit", SCOPES, Estimate(tokens=len(body) // 4, usd=None))
    assert governor.ends() == [("settle", 1, 2, pytest.approx(0.02))]
    assert list(outcome.headers) == LIMITS
    (record,) = h.sink.records
    assert (record.endpoint, record.team_id, record.cost_usd) == ("embeddings", "team-1", 0.02)


# ---------------------------------------------------------------------------- native passthrough


class _NativeStream:
    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.chunks = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self.chunks += 1
        yield b"event: message_stop\ndata: {}\n\n"
        self.usage = DETAILED

    async def aclose(self) -> None:
        return None


class FakeNative:
    """An Anthropic-type native upstream named 'a'; ``fail``: raise it."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.name = "a"
        self.config = ProviderConfig(name="a", type="anthropic")
        self.fail = fail
        self.sent: list[NativeRequest] = []

    async def send(self, request: NativeRequest) -> NativeReply:
        self.sent.append(request)
        if self.fail is not None:
            raise self.fail
        headers = [(b"content-type", b"application/json")]
        if request.stream:
            headers = [(b"content-type", b"text/event-stream")]
            return NativeReply(200, headers, stream=_NativeStream())
        return NativeReply(200, headers, b'{"type":"message"}', usage=DETAILED)


def passthrough(
    native: FakeNative, governor: FakeGovernor | None
) -> tuple[PassthroughService, ListSink]:
    sink = ListSink()
    table = RouteTable.build([route("m", ("a", 1))], {"a": FakeProvider("a")}, {})
    service = PassthroughService(table, {"a": native}, sink, governor=governor, cost=price)
    return service, sink


def _build(stream: bool) -> Any:
    def build(target: Target) -> NativeRequest:
        return NativeRequest(api="anthropic", method="POST", path="/v1/messages", headers={},
                             body=b"{}", stream=stream)  # fmt: skip

    return build


def test_native_calls_admit_settle_and_record_once() -> None:
    governor = FakeGovernor()
    service, sink = passthrough(FakeNative(), governor)
    body = b'{"model":"m","max_tokens":100}' + b" " * 370
    relayed = asyncio.run(
        service.forward(SCOPED, "anthropic", "m", "anthropic.messages", _build(False), "r", 0.0,
                        body, 100)
    )  # fmt: skip
    assert relayed.stream is None and list(relayed.headers) == LIMITS
    assert governor.calls[0] == ("admit", SCOPES, Estimate(tokens=100 + 100, usd=None))
    assert governor.ends() == [("settle", 1, 30, pytest.approx(0.30))]
    (record,) = sink.records
    assert (record.endpoint, record.provider, record.target_model, record.attempts) == (
        "anthropic.messages",
        "a",
        "a-model",
        1,
    )
    assert (record.team_id, record.cached_prompt_tokens, record.reasoning_tokens) == (
        "team-1",
        4,
        5,
    )


def test_a_native_stream_settles_when_it_ends() -> None:
    governor = FakeGovernor()
    service, sink = passthrough(FakeNative(), governor)

    async def scenario() -> None:
        relayed = await service.forward(
            SCOPED, "anthropic", "m", "anthropic.messages", _build(True), "r", 0.0
        )
        assert relayed.stream is not None and list(relayed.headers) == LIMITS
        assert [c async for c in relayed.stream] and governor.ends() == []
        await relayed.stream.aclose(200)

    asyncio.run(scenario())
    assert governor.ends() == [("settle", 1, 30, pytest.approx(0.30))]
    assert [(r.status, r.total_tokens, r.cache_write_tokens) for r in sink.records] == [
        (200, 30, 2)
    ]


def test_a_failed_native_call_releases_and_records_once() -> None:
    governor = FakeGovernor()
    native = FakeNative(fail=UpstreamError("down"))
    service, sink = passthrough(native, governor)
    with pytest.raises(UpstreamError):
        asyncio.run(
            service.forward(SCOPED, "anthropic", "m", "anthropic.messages", _build(False), "r",
                            0.0)
        )  # fmt: skip
    assert governor.ends() == [("release", 1)]
    # Native calls go through Failover.serve: retried (default max_attempts 3), one record.
    assert [(r.status, r.provider, r.team_id, r.attempts) for r in sink.records] == [
        (502, "a", "team-1", 3)
    ]
    assert isinstance(native.fail, UpstreamError)
    headers = dict(native.fail.headers())  # the routing facts as on /v1, and the ticket's
    assert headers == {
        b"x-gandalf-provider": b"a",
        b"x-gandalf-attempts": b"3",
        b"x-should-retry": b"false",
        b"x-ratelimit-limit-requests": b"10",
        b"x-ratelimit-remaining-requests": b"9",
    }


def test_native_calls_without_scopes_never_call_the_governor() -> None:
    governor = FakeGovernor()
    service, sink = passthrough(FakeNative(), governor)
    relayed = asyncio.run(
        service.forward(IDENTITY, "anthropic", "m", "anthropic.messages", _build(False), "r", 0.0)
    )
    assert governor.calls == [] and relayed.headers == ()
    assert len(sink.records) == 1


# ---------------------------------------------------------------------------- through the server

KEY = "gnd_" + "p" * 43


class _ScopedKeys(KeyCache):
    """Every credential is SCOPED's (the tenancy that builds scopes is elsewhere)."""

    def from_headers(self, authorization: bytes | None, api_key: bytes | None) -> Identity | None:
        return SCOPED

    async def load(self, key: str) -> Identity:
        return SCOPED


class _NoKeys:
    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        return None


class _Ready:
    async def ping(self) -> bool:
        return True


def server(
    governor: FakeGovernor, provider: FakeProvider | None = None
) -> tuple[GandalfApp, ListSink]:
    sink = ListSink()
    table = RouteTable.build([route("m", ("a", 1))], {"a": provider or FakeProvider("a")}, {})
    keys = _ScopedKeys(_NoKeys())
    api = Api(ProxyService(table, sink, governor=governor), keys, _Ready())
    native = NativeApi(
        PassthroughService(table, {"a": FakeNative()}, sink, governor=governor), keys, created=0
    )

    async def build() -> Runtime:
        async def close() -> None: ...

        endpoints = api.endpoints()
        exact, prefixed = native.endpoints(endpoints, api.prefixes())
        return Runtime({**endpoints, **exact}, close, [*api.prefixes(), *prefixed])

    return GandalfApp(build, access_log=False), sink


@pytest.mark.parametrize(
    ("path", "json"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        (
            "/v1/chat/completions",
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("/v1/embeddings", {"model": "m", "input": "hi"}),
        ("/v1/messages", {"model": "m", "max_tokens": 10, "messages": []}),
        ("/v1/messages", {"model": "m", "max_tokens": 10, "stream": True, "messages": []}),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    ],
    ids=["chat", "stream", "embeddings", "native", "native-stream", "failed"],
)
def test_ticket_headers_reach_every_model_call_response(path: str, json: Any) -> None:
    governor = FakeGovernor()
    failing = json.get("messages") == [{"role": "user", "content": "x"}]
    app, sink = server(governor, FakeProvider("a", fail=UpstreamError("down")) if failing else None)

    async def scenario() -> None:
        await app.startup()
        try:
            headers = [("authorization", f"Bearer {KEY}"), ("anthropic-version", "2023-06-01")]
            reply = await call(app, "POST", path, headers=headers, json=json, stay=True)
            assert reply.status == (502 if failing else 200), reply.body
            assert reply.header("x-ratelimit-limit-requests") == "10"
            assert reply.header("x-ratelimit-remaining-requests") == "9"
        finally:
            await app.shutdown()

    asyncio.run(scenario())
    assert [c[0] for c in governor.calls] == ["admit", "release" if failing else "settle"]
    assert len(sink.records) == 1 and isinstance(sink.records[0], UsageRecord)
    assert sink.records[0].team_id == "team-1"


def test_a_native_stream_the_upstream_broke_counts_against_its_breaker() -> None:
    """As on /v1: a stream ended by the upstream (502) is a failure of that
    provider; one the client left (499) is not."""
    service, _ = passthrough(FakeNative(), None)
    slot = service.routes.resolve("m").slots[0]

    def failures() -> float:
        return slot.breaker.snapshot(time.monotonic()).failures

    async def stream(status: int) -> None:
        relayed = await service.forward(
            IDENTITY, "anthropic", "m", "anthropic.messages", _build(True), "r", 0.0
        )
        assert relayed.stream is not None
        await relayed.stream.aclose(status)

    before = failures()
    asyncio.run(stream(499))
    assert failures() == before
    asyncio.run(stream(502))
    assert failures() == before + 1


def test_a_limited_answer_carries_the_gateways_rate_limits_instead_of_the_upstreams() -> None:
    # handlers._served: the governor's x-ratelimit-* replace the upstream's,
    # whether the reply says where the upstream's begin (limits_at, the
    # OpenAI adapter's slice) or not (-1: dropped by name); with no relayed
    # headers they are simply added, and without limits the relayed ones stay.
    from types import SimpleNamespace

    from gandalf.app.failover import Outcome
    from gandalf.server.handlers import ServedHeaders, _served

    served = ServedHeaders(((b"content-type", b"application/json"),))
    slot: Any = SimpleNamespace(name="p")
    ours = [(b"x-ratelimit-limit-tokens", b"100"), (b"x-ratelimit-remaining-tokens", b"90")]
    upstream = ((b"x-request-id", b"r1"), (b"x-ratelimit-limit-tokens", b"9999"))
    base = [
        (b"content-type", b"application/json"),
        (b"x-gandalf-provider", b"p"),
        (b"x-gandalf-attempts", b"1"),
    ]

    def answer(headers: Any, limits_at: int, limits: Any) -> list[tuple[bytes, bytes]]:
        reply = ProviderReply(body=b"{}", usage=Usage(), headers=headers, limits_at=limits_at)
        return list(_served(served, Outcome(reply, slot, 1, limits)).headers)

    expected = [*base, (b"x-request-id", b"r1"), *ours]
    assert answer(upstream, 1, ours) == expected  # sliced
    assert answer(upstream, -1, ours) == expected  # by name
    assert answer((), -1, ours) == [*base, *ours]
    assert answer(upstream, 1, ()) == [*base, *upstream]
