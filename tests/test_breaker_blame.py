"""What may open a provider's circuit breaker: its health, never a request's length.

Against the mock upstream, through the whole app (auth, proxy, failover,
OpenAI adapter), with small timeouts and the default breaker (opens at a
weighted error rate of 0.5 over at least 20 requests). Requests that time out
after the upstream sent its response headers (the upstream is answering; the
generation is long) must not open it, or any one key could shut a provider
off for every tenant; connect failures and 5xx must.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry
from gandalf.domain import ProviderConfig, Route, Target
from gandalf.server.asgi import GandalfApp
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.test_server import MEMBER, bearer
from tests.upstream import MockUpstream

OTHER = "gnd_" + "o" * 43  # a second tenant's key


@pytest.fixture
def dead_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        yield holder.getsockname()[1]


def config(mock: MockUpstream, dead_port: int) -> GandalfConfig:
    def route(alias: str, provider: str, model: str) -> Route:
        return Route(
            model_alias=alias, targets=(Target(provider=provider, model=model),), max_attempts=1
        )

    return GandalfConfig(
        database=DatabaseConfig(dsn=":memory:"),
        providers=(
            ProviderConfig(
                name="up", type="openai", base_url=mock.base_url, api_key="k", timeout_ms=150
            ),
            ProviderConfig(  # the same mock, with a first-byte bound below the total
                name="bounded",
                type="openai",
                base_url=mock.base_url,
                api_key="k",
                # Far apart, so that on a loaded machine the total cannot run out
                # first (connecting 20 connections counts against it).
                timeout_ms=10_000,
                first_byte_timeout_ms=100,
            ),
            ProviderConfig(  # the same mock, for answers that fail fast (500s)
                name="erring",
                type="openai",
                base_url=mock.base_url,
                api_key="k",
                # Not "up"'s 150 ms: on a loaded machine (CI) 20 concurrent 500s took
                # longer than that and were counted as timeouts (504), not 5xx.
                timeout_ms=10_000,
            ),
            ProviderConfig(
                name="dark",
                type="openai",
                base_url=f"http://127.0.0.1:{dead_port}/v1",
                api_key="k",
                # Refused at once; a loaded machine must not turn that into a timeout.
                timeout_ms=10_000,
            ),
        ),
        routes=(
            route("long", "up", "headers-then-hang"),
            route("late", "up", "late"),
            route("late-bounded", "bounded", "late"),
            Route(
                model_alias="late-then-fine",
                targets=(
                    Target(provider="up", model="late", priority=1),
                    Target(provider="bounded", model="ok-1", priority=2),
                ),
                max_attempts=2,
            ),
            route("silent", "up", "stream-silent"),
            route("broken", "erring", "status-500"),
            route("fine-erring", "erring", "ok-1"),
            route("fine", "up", "ok-1"),
            route("dark", "dark", "ok-1"),
        ),
        keys=(
            KeyEntry(name="attacker", key=MEMBER, role="member"),
            KeyEntry(name="victim", key=OTHER, role="member"),
        ),
    )


async def chat(app: GandalfApp, key: str, model: str) -> Reply:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": model}]}
    if model == "silent":
        body["stream"] = True
    return await call(app, "POST", "/v1/chat/completions", headers=bearer(key), json=body)


def run(mock: MockUpstream, dead_port: int, model: str, times: int) -> tuple[list[int], Reply]:
    """``times`` concurrent requests for ``model`` by one key; then one for
    the same provider (or, for ``dark``, the same route) by another key."""

    async def main() -> tuple[list[int], Reply]:
        app = create_app(config(mock, dead_port), access_log=False)
        await app.startup()
        try:
            replies = await asyncio.gather(*(chat(app, MEMBER, model) for _ in range(times)))
            if model == "dark":
                after = await chat(app, OTHER, "dark")
            elif model == "broken":
                after = await chat(app, OTHER, "fine-erring")
            elif model == "late-bounded":
                after = await chat(app, OTHER, "late-bounded")
            else:
                after = await chat(app, OTHER, "fine")
            return [r.status for r in replies], after
        finally:
            await app.shutdown()

    return asyncio.run(main())


def test_long_answers_that_time_out_do_not_open_the_breaker(
    mock: MockUpstream, dead_port: int
) -> None:
    statuses, after = run(mock, dead_port, "long", 25)
    assert statuses == [504] * 25
    assert after.status == 200, after.body


def test_streams_that_go_silent_do_not_open_the_breaker(mock: MockUpstream) -> None:
    """25 streams that stop after one event: each ends with a 504 error event
    (timeout_ms of silence); the provider still serves the next caller."""

    async def main() -> tuple[list[Reply], Reply]:
        app = create_app(config(mock, 9), access_log=False)
        await app.startup()
        try:
            replies = await asyncio.gather(*(chat(app, MEMBER, "silent") for _ in range(25)))
            return list(replies), await chat(app, OTHER, "fine")
        finally:
            await app.shutdown()

    replies, after = asyncio.run(main())
    for reply in replies:
        assert reply.status == 200 and b"upstream_timeout" in reply.body, reply.body
    assert after.status == 200, after.body


@pytest.mark.parametrize(("model", "status"), [("broken", 502), ("dark", 502)])
def test_5xx_and_connect_failures_open_it(
    mock: MockUpstream, dead_port: int, model: str, status: int
) -> None:
    statuses, after = run(mock, dead_port, model, 20)
    assert statuses == [status] * 20
    assert after.status == 503, after.body
    assert after.json()["error"]["code"] == "circuit_open"


def test_non_streamed_answers_that_use_up_timeout_ms_do_not_open_the_breaker(
    mock: MockUpstream, dead_port: int
) -> None:
    """Most providers send no headers until a non-streamed answer is complete: a
    request that runs out of ``timeout_ms`` before them may only be long."""
    statuses, after = run(mock, dead_port, "late", 25)
    assert statuses == [504] * 25
    assert after.status == 200, after.body


def test_a_first_byte_timeout_is_the_providers_and_opens_it(
    mock: MockUpstream, dead_port: int
) -> None:
    """With ``first_byte_timeout_ms`` below ``timeout_ms`` the operator said how
    soon an answer must start: missing it is the provider's failure."""
    statuses, after = run(mock, dead_port, "late-bounded", 20)
    assert statuses == [504] * 20
    assert after.status == 503, after.body
    assert after.json()["error"]["code"] == "circuit_open"


def test_a_non_streamed_total_timeout_still_fails_over(mock: MockUpstream) -> None:
    async def main() -> Reply:
        app = create_app(config(mock, 9), access_log=False)
        await app.startup()
        try:
            return await chat(app, MEMBER, "late-then-fine")
        finally:
            await app.shutdown()

    reply = asyncio.run(main())
    assert reply.status == 200, reply.body
    assert reply.header("x-gandalf-provider") == "bounded"
    assert reply.header("x-gandalf-attempts") == "2"
