"""ProxyService routing: failover, retries, budgets, breakers, strategies, coalescing.

Every test runs the real service over scripted fake providers, a fake monotonic
clock (moved by the fake providers' latency and by the recording sleep), a
seeded random source and a sleep that records waits instead of waiting.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from gandalf.domain import BreakerPolicy, Resilience
from gandalf.errors import (
    CircuitOpen,
    GatewayError,
    InvalidRequest,
    UpstreamAuthError,
    UpstreamClientError,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
)
from tests.resilience_fakes import (
    IDENTITY,
    FakeProvider,
    Harness,
    chat_body,
    embeddings_body,
    route,
    served_by,
    settle,
)

NO_BREAKER = BreakerPolicy(min_samples=1_000_000)


def server_error() -> UpstreamError:
    return UpstreamError("Upstream provider returned HTTP 500.")


def rate_limited(retry_after: str | None = None) -> UpstreamClientError:
    return UpstreamClientError("slow down", status=429, retry_after=retry_after)


# ---------------------------------------------------------------------------- failover


def test_healthy_first_target_serves_in_one_attempt() -> None:
    h = Harness([route("m", ("a", 1), ("b", 2))], [FakeProvider("a"), FakeProvider("b")])
    reply = asyncio.run(h.chat())
    assert served_by(reply) == "a" and (reply.provider, reply.attempts) == ("a", 1)
    (record,) = h.sink.records
    assert (record.provider, record.target_model, record.attempts, record.status) == (
        "a",
        "a-model",
        1,
        200,
    )
    assert h.calls("b") == 0 and h.sleep.waits == []


@pytest.mark.parametrize(
    "failure",
    [
        server_error(),
        UpstreamError("Upstream provider 'a' is unreachable: connection failed."),
        UpstreamTimeout("timed out"),
        UpstreamOverloaded("overloaded"),
        rate_limited(),
        UpstreamClientError("busy", status=503),
        UpstreamAuthError("the gateway's key for 'a' was refused"),
    ],
    ids=["5xx", "network", "timeout", "overloaded", "429", "client-error-503", "upstream-auth"],
)
def test_retryable_failures_fail_over_in_priority_order(failure: GatewayError) -> None:
    a, b, c = (
        FakeProvider("a", fail=failure),
        FakeProvider("b", fail=server_error()),
        FakeProvider("c"),
    )
    h = Harness([route("m", ("c", 3), ("a", 1), ("b", 2))], [a, b, c])
    reply = asyncio.run(h.chat())
    assert served_by(reply) == "c" and (reply.provider, reply.attempts) == ("c", 3)
    assert [h.calls(n) for n in "abc"] == [1, 1, 1]
    assert h.sleep.waits == []  # moving to another target does not wait
    (record,) = h.sink.records
    assert (record.provider, record.attempts, record.status) == ("c", 3, 200)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_never_fail_over(status: int) -> None:
    a = FakeProvider("a", fail=UpstreamClientError("bad request", status=status))
    b = FakeProvider("b")
    h = Harness([route("m", ("a", 1), ("b", 2))], [a, b])
    with pytest.raises(UpstreamClientError) as info:
        asyncio.run(h.chat())
    assert info.value.status == status
    assert (info.value.upstream, info.value.attempts) == ("a", 1)
    assert dict(info.value.headers())[b"x-gandalf-provider"] == b"a"
    assert h.calls("b") == 0
    (record,) = h.sink.records
    assert (record.provider, record.attempts, record.status) == ("a", 1, status)


def test_a_request_the_adapter_cannot_translate_does_not_fail_over() -> None:
    a = FakeProvider("a", fail=InvalidRequest("'tools' cannot be sent to this provider"))
    h = Harness([route("m", ("a", 1), ("b", 2))], [a, FakeProvider("b")])
    with pytest.raises(InvalidRequest):
        asyncio.run(h.chat())
    assert h.calls("b") == 0


def test_upstream_auth_failure_fails_over_but_is_never_retried() -> None:
    a = FakeProvider("a", fail=UpstreamAuthError("refused the gateway's key"))
    h = Harness([route("m", ("a", 1), max_attempts=3)], [a])
    with pytest.raises(UpstreamAuthError) as info:
        asyncio.run(h.chat())
    assert h.calls("a") == 1 and info.value.status == 502


def test_every_target_failing_raises_the_last_error_with_the_attempts() -> None:
    a = FakeProvider("a", fail=UpstreamTimeout("a timed out"))
    b = FakeProvider("b", fail=server_error())
    h = Harness([route("m", ("a", 1), ("b", 2), max_attempts=2)], [a, b])
    with pytest.raises(UpstreamError) as info:
        asyncio.run(h.chat())
    assert (info.value.upstream, info.value.attempts, info.value.status) == ("b", 2, 502)
    headers = dict(info.value.headers())
    assert headers[b"x-gandalf-provider"] == b"b" and headers[b"x-gandalf-attempts"] == b"2"
    (record,) = h.sink.records
    assert (record.provider, record.attempts, record.status) == ("b", 2, 502)


def test_max_attempts_counts_failovers_and_retries() -> None:
    providers = [FakeProvider(n, fail=server_error()) for n in "abcd"]
    h = Harness([route("m", *((n, i) for i, n in enumerate("abcd")), max_attempts=3)], providers)
    with pytest.raises(UpstreamError):
        asyncio.run(h.chat())
    assert [h.calls(n) for n in "abcd"] == [1, 1, 1, 0]


def test_embeddings_fail_over_too() -> None:
    h = Harness(
        [route("m", ("a", 1), ("b", 2))],
        [FakeProvider("a", fail=server_error()), FakeProvider("b")],
    )
    request, body = embeddings_body()
    reply = asyncio.run(h.service.embeddings(IDENTITY, request, body, "req", 0.0))
    assert reply.value.body == b"b" and (reply.provider, reply.attempts) == ("b", 2)
    (record,) = h.sink.records
    assert (record.endpoint, record.provider, record.attempts) == ("embeddings", "b", 2)


# ---------------------------------------------------------------------------- streams


def test_a_stream_fails_over_while_it_is_being_opened() -> None:
    a = FakeProvider("a", fail=UpstreamOverloaded("overloaded"))
    h = Harness([route("m", ("a", 1), ("b", 2))], [a, FakeProvider("b")])
    request, body = chat_body(stream=True)

    async def scenario() -> list[bytes]:
        opened = await h.service.chat_stream(IDENTITY, request, body, "req", 0.0)
        assert (opened.provider, opened.attempts) == ("b", 2)
        stream = opened.value
        chunks = [chunk async for chunk in stream]
        await stream.aclose(200)
        return chunks

    assert asyncio.run(scenario()) == [b"data: b\n\n"]
    (record,) = h.sink.records
    assert (record.provider, record.attempts, record.status) == ("b", 2, 200)


def test_a_stream_never_fails_over_once_it_started() -> None:
    a = FakeProvider("a")
    a.stream_fail = UpstreamError("Upstream provider 'a' ended the stream before [DONE].")
    h = Harness(
        [route("m", ("a", 1), ("b", 2))],
        [a, FakeProvider("b")],
        resilience=Resilience(breaker=BreakerPolicy(min_samples=2)),
    )
    request, body = chat_body(stream=True)

    async def scenario() -> None:
        stream = (await h.service.chat_stream(IDENTITY, request, body, "req", 0.0)).value
        chunks: list[bytes] = []
        with pytest.raises(UpstreamError):
            async for chunk in stream:
                chunks.append(chunk)
        assert chunks == [b"data: a\n\n"]  # the first byte had gone: no other target
        await stream.aclose(502)  # as the server closes it after the error

    asyncio.run(scenario())
    assert h.calls("b") == 0
    (record,) = h.sink.records
    assert (record.provider, record.attempts, record.status) == ("a", 1, 502)
    # The failure after the start still counts against the provider's breaker.
    (snap, _) = h.service.breakers()
    assert (snap.provider, snap.samples, snap.failures, snap.state) == ("a", 2, 1.0, "open")


def test_a_stream_that_no_target_opens_raises_before_any_byte() -> None:
    h = Harness([route("m", ("a", 1))], [FakeProvider("a", fail=UpstreamTimeout("t"))])
    request, body = chat_body(stream=True)
    with pytest.raises(UpstreamTimeout) as info:
        asyncio.run(h.service.chat_stream(IDENTITY, request, body, "req", 0.0))
    assert info.value.attempts == 3 and h.calls("a") == 3
    (record,) = h.sink.records
    assert (record.status, record.attempts) == (504, 3)


# ---------------------------------------------------------------------------- retries


def test_retries_back_off_with_full_jitter_within_the_bounds() -> None:
    a = FakeProvider("a", fail=server_error())
    resilience = Resilience(max_attempts=6, breaker=NO_BREAKER)
    h = Harness([route("m", ("a", 1))], [a], resilience=resilience)
    with pytest.raises(UpstreamError):
        asyncio.run(h.chat())
    assert h.calls("a") == 6
    waits = h.sleep.waits
    assert len(waits) == 5
    for n, wait in enumerate(waits):
        assert 0.0 <= wait <= 0.1 * 2**n
    assert (h.sink.records[0].attempts, h.sink.records[0].status) == (6, 502)


def test_backoff_is_capped() -> None:
    resilience = Resilience(max_attempts=10, backoff_base=1.0, backoff_cap=2.0, breaker=NO_BREAKER)
    h = Harness(
        [route("m", ("a", 1))], [FakeProvider("a", fail=server_error())], resilience=resilience
    )
    with pytest.raises(UpstreamError):
        asyncio.run(h.chat())
    assert len(h.sleep.waits) == 9 and max(h.sleep.waits) <= 2.0


def test_a_retry_that_succeeds() -> None:
    a = FakeProvider("a")
    a.script = [server_error(), UpstreamTimeout("t")]
    h = Harness([route("m", ("a", 1))], [a])
    reply = asyncio.run(h.chat())
    assert (reply.provider, reply.attempts) == ("a", 3) and h.calls("a") == 3
    assert h.sink.records[0].attempts == 3


def test_retry_after_is_honoured_when_within_the_cap() -> None:
    a = FakeProvider("a")
    a.script = [rate_limited(retry_after="7")]
    h = Harness([route("m", ("a", 1))], [a])
    reply = asyncio.run(h.chat())
    assert reply.attempts == 2
    assert h.sleep.waits == [pytest.approx(7.0)]  # max(backoff <= 0.1 s, Retry-After 7 s)


def test_retry_after_as_an_http_date() -> None:
    a = FakeProvider("a")
    a.script = [UpstreamOverloaded("busy", retry_after="Tue, 14 Nov 2023 22:13:25 GMT")]
    h = Harness([route("m", ("a", 1))], [a])  # the fake wall clock reads 22:13:20 GMT
    asyncio.run(h.chat())
    assert h.sleep.waits == [pytest.approx(5.0)]


def test_retry_after_beyond_the_cap_gives_up_that_target() -> None:
    a = FakeProvider("a", fail=rate_limited(retry_after="60"))
    h = Harness([route("m", ("a", 1))], [a])
    with pytest.raises(UpstreamClientError) as info:
        asyncio.run(h.chat())
    assert h.calls("a") == 1 and h.sleep.waits == []
    headers = dict(info.value.headers())
    assert headers[b"retry-after"] == b"60" and headers[b"x-gandalf-attempts"] == b"1"


def test_retry_after_does_not_delay_failover_to_another_target() -> None:
    a = FakeProvider("a", fail=rate_limited(retry_after="7"))
    h = Harness([route("m", ("a", 1), ("b", 2))], [a, FakeProvider("b")])
    reply = asyncio.run(h.chat())
    assert reply.provider == "b" and h.sleep.waits == []


def test_retries_come_after_every_target_was_tried_once() -> None:
    a = FakeProvider("a", fail=server_error())
    b = FakeProvider("b")
    b.script = [server_error()]
    h = Harness([route("m", ("a", 1), ("b", 2), max_attempts=4)], [a, b])
    reply = asyncio.run(h.chat())
    # a, b (failover), then the retries in the same order: a again, then b serves.
    assert (reply.provider, reply.attempts) == ("b", 4)
    assert [h.calls("a"), h.calls("b")] == [2, 2] and len(h.sleep.waits) == 2


def test_retry_budget_caps_amplification_during_an_outage() -> None:
    """1000 requests, 10 ms apart, against a dead single-target route with
    max_attempts 3: without a budget that is 3000 upstream calls; with it,
    retries stay within 20% of the requests (plus the 1/s floor)."""
    a = FakeProvider("a", fail=server_error())
    resilience = Resilience(max_attempts=3, breaker=NO_BREAKER)
    h = Harness([route("m", ("a", 1))], [a], resilience=resilience)

    async def outage() -> None:
        for _ in range(1000):
            with pytest.raises(UpstreamError):
                await h.chat()
            h.clock.advance(0.01)

    asyncio.run(outage())
    calls = h.calls("a")
    assert 1000 < calls <= 1000 * 1.2 + 10
    attempts = Counter(r.attempts for r in h.sink.records)
    assert sum(attempts.values()) == 1000 and attempts[1] > 700


def test_the_budget_allows_retries_again_once_traffic_is_healthy() -> None:
    a = FakeProvider("a")
    resilience = Resilience(max_attempts=2, breaker=NO_BREAKER)
    h = Harness([route("m", ("a", 1))], [a], resilience=resilience)

    async def traffic() -> None:
        for _ in range(100):
            await h.chat()
        a.script = [server_error()]
        await h.chat()

    asyncio.run(traffic())
    assert h.sink.records[-1].attempts == 2  # retried: 1 retry after 100 requests fits


# ---------------------------------------------------------------------------- breakers

BREAKER = BreakerPolicy(error_rate=0.5, min_samples=5, open_for=30.0, window=60.0)


def test_an_open_breaker_is_skipped_then_a_half_open_probe_closes_it() -> None:
    a = FakeProvider("a", fail=server_error())
    b = FakeProvider("b")
    h = Harness([route("m", ("a", 1), ("b", 2))], [a, b], resilience=Resilience(breaker=BREAKER))

    async def scenario() -> None:
        for _ in range(5):
            assert (await h.chat()).attempts == 2  # a fails, b serves
        assert [s.state for s in h.service.breakers()] == ["open", "closed"]
        for _ in range(20):
            reply = await h.chat()
            assert (reply.provider, reply.attempts) == ("b", 1)  # a skipped: no attempt
        assert h.calls("a") == 5
        h.clock.advance(30.0)
        a.fail = None  # a has recovered
        reply = await h.chat()  # this one probes a
        assert (reply.provider, reply.attempts) == ("a", 1)
        assert [s.state for s in h.service.breakers()] == ["closed", "closed"]
        assert (await h.chat()).provider == "a"

    asyncio.run(scenario())


def test_a_failed_probe_keeps_the_breaker_open() -> None:
    a = FakeProvider("a", fail=UpstreamTimeout("t"))
    h = Harness(
        [route("m", ("a", 1), ("b", 2))],
        [a, FakeProvider("b")],
        resilience=Resilience(breaker=BREAKER),
    )

    async def scenario() -> None:
        for _ in range(5):
            await h.chat()
        h.clock.advance(30.0)
        assert (await h.chat()).attempts == 2  # the probe to a failed; b served
        assert h.service.breakers()[0].state == "open"
        assert (await h.chat()).attempts == 1  # skipped again
        assert h.calls("a") == 6

    asyncio.run(scenario())


def test_when_every_breaker_is_open_the_request_fails_fast_with_503() -> None:
    a = FakeProvider("a", fail=server_error())
    policy = BreakerPolicy(error_rate=0.5, min_samples=3, open_for=20.0)
    h = Harness([route("m", ("a", 1), max_attempts=1)], [a], resilience=Resilience(breaker=policy))

    async def scenario() -> CircuitOpen:
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await h.chat()
        h.clock.advance(5.0)
        with pytest.raises(CircuitOpen) as info:
            await h.chat()
        return info.value

    exc = asyncio.run(scenario())
    assert h.calls("a") == 3
    assert (exc.status, exc.code, exc.type) == (503, "circuit_open", "provider_unavailable")
    assert dict(exc.headers()) == {b"retry-after": b"15"}
    assert "'a'" in exc.message
    record = h.sink.records[-1]
    assert (record.status, record.provider, record.attempts) == (503, None, 0)


def test_a_cancelled_probe_lets_the_next_request_probe() -> None:
    a = FakeProvider("a", fail=server_error())
    policy = BreakerPolicy(error_rate=0.5, min_samples=3, open_for=20.0)
    h = Harness([route("m", ("a", 1), max_attempts=1)], [a], resilience=Resilience(breaker=policy))

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await h.chat()
        h.clock.advance(20.0)
        a.fail = None
        a.gate = asyncio.Event()
        probe = asyncio.create_task(h.chat())
        await settle()
        probe.cancel()  # the probe's client went away
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert h.sink.records[-1].status == 499
        a.gate = None
        assert (await h.chat()).provider == "a"  # probes at once, and closes it

    asyncio.run(scenario())
    assert h.service.breakers()[0].state == "closed"


# ---------------------------------------------------------------------------- strategies


def test_weighted_route_spreads_by_weight() -> None:
    providers = [FakeProvider("a"), FakeProvider("b")]
    h = Harness([route("m", ("a", 1, 1), ("b", 1, 3), strategy="weighted")], providers)

    async def traffic() -> None:
        for _ in range(4000):
            await h.chat()

    asyncio.run(traffic())
    assert h.calls("b") / 4000 == pytest.approx(0.75, abs=0.03)


def test_weighted_route_fails_over_within_and_across_tiers() -> None:
    a, b = FakeProvider("a", fail=server_error()), FakeProvider("b", fail=server_error())
    h = Harness(
        [route("m", ("a", 1, 5), ("b", 1, 5), ("c", 2), strategy="weighted")],
        [a, b, FakeProvider("c")],
    )
    reply = asyncio.run(h.chat())
    assert (reply.provider, reply.attempts) == ("c", 3)


def test_least_latency_route_prefers_the_faster_target() -> None:
    slow, fast = FakeProvider("slow", latency=0.8), FakeProvider("fast", latency=0.1)
    h = Harness([route("m", ("slow", 1), ("fast", 1), strategy="least_latency")], [slow, fast])

    async def traffic() -> None:
        for _ in range(200):
            await h.chat()

    asyncio.run(traffic())
    # Each is measured once (an unmeasured target is tried first), then the fast one wins.
    assert h.calls("slow") <= 3 and h.calls("fast") >= 197


def test_least_latency_counts_requests_in_flight() -> None:
    a, b = FakeProvider("a", latency=0.1), FakeProvider("b", latency=0.15)
    h = Harness([route("m", ("a", 1), ("b", 1), strategy="least_latency")], [a, b])
    slot_a, slot_b = h.service.routes.resolve("m").slots
    slot_a.latency.observe(0.1, h.clock.now)  # both measured: a is faster
    slot_b.latency.observe(0.15, h.clock.now)

    async def scenario() -> None:
        a.gate = asyncio.Event()
        parked = asyncio.create_task(h.chat())
        await settle()
        assert (h.calls("a"), slot_a.latency.outstanding) == (1, 1)
        # a with a request in flight (0.1 * 2) costs more than idle b (0.15 * 1).
        assert (await h.chat()).provider == "b"
        assert (await h.chat()).provider == "b"
        a.gate.set()
        assert (await parked).provider == "a"
        assert slot_a.latency.outstanding == 0

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- coalescing


def test_identical_deterministic_requests_share_one_upstream_call() -> None:
    a = FakeProvider("a")
    a.gate = asyncio.Event()
    h = Harness([route("m", ("a", 1), coalesce=True)], [a])

    async def scenario() -> None:
        waiters = [asyncio.create_task(h.chat(temperature=0)) for _ in range(8)]
        await settle()
        assert h.calls("a") == 1
        assert a.gate is not None
        a.gate.set()
        replies = await asyncio.gather(*waiters)
        assert {r.value.body for r in replies} == {replies[0].value.body}
        assert sorted(r.attempts for r in replies) == [0] * 7 + [1]
        assert {r.provider for r in replies} == {"a"}

    asyncio.run(scenario())
    assert h.calls("a") == 1
    assert sorted(r.attempts for r in h.sink.records) == [0] * 7 + [1]
    assert {(r.provider, r.status, r.total_tokens) for r in h.sink.records} == {("a", 200, 7)}


def test_waiters_that_leave_and_a_leader_that_leaves_on_a_coalescing_route() -> None:
    """A follower leaving disturbs nobody; the leader leaving takes its call
    along (it was the leader's own), and a follower leads one new call for the
    rest (app/coalesce.py)."""
    a = FakeProvider("a")
    a.gate = asyncio.Event()
    h = Harness([route("m", ("a", 1), coalesce=True)], [a])

    async def scenario() -> None:
        leader = asyncio.create_task(h.chat(seed=7))
        followers = [asyncio.create_task(h.chat(seed=7)) for _ in range(3)]
        await settle()
        assert h.calls("a") == 1
        leader.cancel()
        followers[0].cancel()
        await settle()
        assert a.gate is not None
        a.gate.set()
        replies = await asyncio.gather(*followers[1:])
        assert all(served_by(r) == "a" for r in replies)
        assert leader.cancelled() and followers[0].cancelled()

    asyncio.run(scenario())
    assert h.calls("a") == 2
    assert sorted(r.status for r in h.sink.records) == [200, 200, 499, 499]
    assert sorted(r.attempts for r in h.sink.records if r.status == 200) == [0, 1]


def test_a_shared_failure_reaches_every_waiter_with_its_attempts() -> None:
    a = FakeProvider("a", fail=UpstreamClientError("bad", status=400))
    a.gate = asyncio.Event()
    h = Harness([route("m", ("a", 1), coalesce=True)], [a])

    async def scenario() -> list[BaseException | object]:
        waiters = [asyncio.create_task(h.chat(temperature=0)) for _ in range(3)]
        await settle()
        assert a.gate is not None
        a.gate.set()
        return await asyncio.gather(*waiters, return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, UpstreamClientError) for r in results)
    assert h.calls("a") == 1
    assert sorted(r.attempts for r in h.sink.records) == [0, 0, 1]
    assert {r.status for r in h.sink.records} == {400}


@pytest.mark.parametrize(
    ("coalesce", "fields"),
    [
        (True, {"temperature": 0.7}),
        (True, {"temperature": 0, "n": 2}),
        (True, {}),
        (False, {"temperature": 0}),
    ],
)
def test_coalescing_needs_the_route_and_a_deterministic_request(
    coalesce: bool, fields: dict[str, Any]
) -> None:
    a = FakeProvider("a")
    a.gate = asyncio.Event()
    h = Harness([route("m", ("a", 1), coalesce=coalesce)], [a])

    async def scenario() -> None:
        waiters = [asyncio.create_task(h.chat(**fields)) for _ in range(4)]
        await settle()
        assert a.gate is not None
        a.gate.set()
        await asyncio.gather(*waiters)

    asyncio.run(scenario())
    assert h.calls("a") == 4


# ---------------------------------------------------------------------------- odds and ends


def test_breakers_snapshot_lists_every_provider() -> None:
    h = Harness([route("m", ("b", 1), ("a", 2))], [FakeProvider("a"), FakeProvider("b")])
    asyncio.run(h.chat())
    snaps = h.service.breakers()
    assert [(s.provider, s.state, s.samples) for s in snaps] == [
        ("a", "closed", 0),
        ("b", "closed", 1),
    ]


def test_a_bug_in_an_adapter_is_not_retried_nor_held_against_the_provider() -> None:
    a = FakeProvider("a", fail=RuntimeError("bug"))
    h = Harness([route("m", ("a", 1), ("b", 2))], [a, FakeProvider("b")])
    with pytest.raises(RuntimeError):
        asyncio.run(h.chat())
    assert h.calls("b") == 0 and h.service.breakers()[0].samples == 0
    assert h.sink.records[0].status == 500


def test_a_provider_name_cannot_break_the_headers() -> None:
    exc = UpstreamError("boom")
    exc.upstream, exc.attempts = "evil\r\nset-cookie: x", 2
    assert dict(exc.headers()) == {
        b"x-gandalf-provider": b"evil??set-cookie: x",
        b"x-gandalf-attempts": b"2",
    }
