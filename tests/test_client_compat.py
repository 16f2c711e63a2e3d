"""What real clients and operators met (issue 13), in process: a key's
permission before a route's state, a log line per failed upstream attempt,
and ``x-should-retry: false`` once the gateway spent what a retry could do.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import msgspec
import pytest

from gandalf.app.passthrough import PassthroughService
from gandalf.app.router import RouteTable
from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry
from gandalf.domain import BreakerPolicy, ProviderConfig, Resilience, Route, Target
from gandalf.errors import (
    GatewayError,
    PermissionDenied,
    UpstreamAuthError,
    UpstreamBodyTimeout,
    UpstreamClientError,
    UpstreamError,
)
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.resilience_fakes import (
    IDENTITY,
    FakeProvider,
    Harness,
    ListSink,
    chat_body,
    embeddings_body,
    route,
)

KEY = "gnd_" + "c" * 40
NO_BREAKER = BreakerPolicy(min_samples=1_000_000)
LIMITED = msgspec.structs.replace(IDENTITY, allowed_models=frozenset({"m"}))


def no_retry(exc: GatewayError) -> bool:
    return (b"x-should-retry", b"false") in exc.headers()


# ---------------------------------------------------------------------------- 403 before 503


def limited_harness() -> Harness:
    # "off" routes to a provider that is not enabled: resolving it is a 503.
    return Harness([route("m", ("a", 1)), route("off", ("gone", 1))], [FakeProvider("a")])


@pytest.mark.parametrize("kind", ["chat", "stream", "embeddings"])
def test_a_model_outside_allowed_models_is_403_even_when_its_provider_is_off(kind: str) -> None:
    h = limited_harness()

    async def call() -> object:
        if kind == "embeddings":
            embed, body = embeddings_body("off")
            return await h.service.embeddings(LIMITED, embed, body, "r", 0.0)
        request, body = chat_body("off", stream=kind == "stream")
        if kind == "stream":
            return await h.service.chat_stream(LIMITED, request, body, "r", 0.0)
        return await h.service.chat(LIMITED, request, body, "r", 0.0)

    with pytest.raises(PermissionDenied) as raised:
        asyncio.run(call())
    assert "not allowed to use model 'off'" in raised.value.message
    assert "gone" not in raised.value.message  # nothing about the route leaks


def test_native_paths_check_the_permission_first_too() -> None:
    table = RouteTable.build([route("off", ("gone", 1))], {}, {"gone": "GONE_KEY is not set"})
    service = PassthroughService(table, {}, ListSink())
    with pytest.raises(PermissionDenied):
        service.resolve(LIMITED, "off", "anthropic")


# ------------------------------------------------------------------ failed attempts are logged


def test_each_failed_attempt_is_logged_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    primary = FakeProvider("primary", fail=UpstreamError("Could not connect to 'primary'."))
    h = Harness(
        [route("m", ("primary", 1), ("backup", 2))],
        [primary, FakeProvider("backup")],
        resilience=Resilience(breaker=NO_BREAKER),
    )
    request, body = chat_body("m")
    with caplog.at_level(logging.WARNING, logger="gandalf.resilience"):
        reply = asyncio.run(h.service.chat(IDENTITY, request, body, "req-42", 0.0))
    assert reply.provider == "backup"
    lines = [r for r in caplog.records if r.name == "gandalf.resilience"]
    assert len(lines) == 1, caplog.text
    line = lines[0]
    assert line.levelno == logging.WARNING
    text = line.getMessage()
    for part in ("attempt 1", "'primary'", "primary-model", "502", "server", "req-42"):
        assert part in text, text
    assert isinstance(line.args, tuple)  # formatted lazily, by the logging module


def test_a_failed_native_attempt_is_logged(
    dead_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    config = GandalfConfig(
        database=DatabaseConfig(dsn=":memory:"),
        providers=(
            ProviderConfig(
                name="claude",
                type="anthropic",
                base_url=f"http://127.0.0.1:{dead_port}",
                api_key="sk-ant",
            ),
        ),
        routes=(Route(model_alias="c", targets=(Target(provider="claude", model="claude-x"),)),),
        keys=(KeyEntry(name="k", key=KEY, role="member"),),
    )

    async def main() -> Reply:
        app = create_app(config, access_log=False)
        await app.startup()
        try:
            return await call(
                app,
                "POST",
                "/v1/messages",
                headers=[("x-api-key", KEY), ("x-request-id", "req-7")],
                json={
                    "model": "c",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
        finally:
            await app.shutdown()

    with caplog.at_level(logging.WARNING, logger="gandalf.resilience"):
        reply = asyncio.run(main())
    assert reply.status == 502, reply.body
    # One line per attempt (native calls are retried like /v1 ones: 3 by default).
    lines = [r for r in caplog.records if r.name == "gandalf.resilience"]
    assert [f"attempt {n} failed" in r.getMessage() for n, r in enumerate(lines, 1)] == [True] * 3
    for line in lines:
        assert line.levelno == logging.WARNING
        assert "'claude'" in line.getMessage() and "req-7" in line.getMessage(), line.getMessage()


# ---------------------------------------------------------------------------- x-should-retry


def test_retries_spent_tell_the_client_not_to_retry() -> None:
    up = FakeProvider("a", fail=UpstreamClientError("slow down", status=429))
    h = Harness([route("m", ("a", 1), max_attempts=3)], [up])
    with pytest.raises(UpstreamClientError) as raised:
        asyncio.run(h.chat())
    assert h.calls("a") == 3 and raised.value.attempts == 3
    assert no_retry(raised.value)


def test_failover_spent_tells_the_client_not_to_retry() -> None:
    h = Harness(
        [route("m", ("a", 1), ("b", 2), max_attempts=2)],
        [FakeProvider("a", fail=UpstreamError("x")), FakeProvider("b", fail=UpstreamError("y"))],
    )
    with pytest.raises(UpstreamError) as raised:
        asyncio.run(h.chat())
    assert raised.value.attempts == 2 and no_retry(raised.value)


def test_one_attempt_allowed_leaves_the_retry_to_the_client() -> None:
    """max_attempts 1: the operator left retries to clients; a 429 or 5xx is
    worth the client's retry, so nothing tells it otherwise."""
    for failure in (UpstreamClientError("slow down", status=429), UpstreamError("boom")):
        h = Harness([route("m", ("a", 1), max_attempts=1)], [FakeProvider("a", fail=failure)])
        with pytest.raises(GatewayError) as raised:
            asyncio.run(h.chat())
        assert raised.value.attempts == 1 and not no_retry(raised.value)


@pytest.mark.parametrize(
    "failure",
    [
        UpstreamAuthError("Upstream provider 'a' rejected the gateway's credentials."),
        UpstreamBodyTimeout("Upstream provider 'a' did not finish its answer in time."),
    ],
)
def test_a_failure_no_retry_can_cure_says_so_after_one_attempt(failure: GatewayError) -> None:
    h = Harness([route("m", ("a", 1), max_attempts=1)], [FakeProvider("a", fail=failure)])
    with pytest.raises(GatewayError) as raised:
        asyncio.run(h.chat())
    assert raised.value.attempts == 1 and no_retry(raised.value)


def test_a_client_error_relayed_from_upstream_keeps_the_clients_own_rules() -> None:
    bad = UpstreamClientError("bad request", status=400)
    h = Harness([route("m", ("a", 1), max_attempts=3)], [FakeProvider("a", fail=bad)])
    with pytest.raises(UpstreamClientError) as raised:
        asyncio.run(h.chat())
    assert raised.value.attempts == 1 and not no_retry(raised.value)


def test_a_retry_refused_by_the_budget_tells_the_client_not_to_retry() -> None:
    h = Harness(
        [route("m", ("a", 1), max_attempts=3)],
        [FakeProvider("a", fail=UpstreamError("boom"))],
        resilience=Resilience(
            breaker=NO_BREAKER, retry_budget_ratio=0.0, retry_budget_min_per_second=0.0
        ),
    )
    with pytest.raises(UpstreamError) as raised:
        asyncio.run(h.chat())
    assert raised.value.attempts == 1 and no_retry(raised.value)


def test_no_upstream_tried_no_header() -> None:
    """CircuitOpen carries retry-after: the client's retry after it may well succeed."""
    h = Harness(
        [route("m", ("a", 1))],
        [FakeProvider("a")],
        resilience=Resilience(breaker=BreakerPolicy(min_samples=1, error_rate=0.01)),
    )
    health = next(iter(h.service.routes.health))
    health.breaker.record(1.0, h.clock())
    with pytest.raises(GatewayError) as raised:
        asyncio.run(h.chat())
    assert raised.value.attempts == 0 and not no_retry(raised.value)


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]
