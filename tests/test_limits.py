"""Every size a client controls is bounded: one request cannot take a worker down.

The gateway refuses oversized parameters with a 400 naming them (for every
provider), and the fake provider, which computes on the event loop, bounds its
own work. Driven in process through the ASGI app.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import (
    MAX_CHOICES,
    MAX_DIMENSIONS,
    MAX_EMBEDDING_CHARS,
    MAX_EMBEDDING_INPUTS,
    MAX_EMBEDDING_TOKENS,
    MAX_LOGIT_BIAS,
    MAX_OUTPUT_TOKENS,
    MAX_STOP,
    MAX_TOOLS,
    ProviderConfig,
    Route,
    Target,
)
from gandalf.provider.fake import MAX_EMBEDDING_VALUES, MAX_REPLY_TOKENS
from gandalf.server.asgi import GandalfApp
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call

KEY = "gnd_" + "b" * 43
AUTH = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


def config() -> GandalfConfig:
    return GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="fake", type="fake"),),
        routes=(
            Route(model_alias="fake-model", targets=(Target(provider="fake", model="fake-1"),)),
        ),
        keys=(KeyEntry(name="k", key=KEY, role="member"),),
    )


def run(scenario: Callable[[GandalfApp], Awaitable[None]]) -> None:
    async def main() -> None:
        app = create_app(config(), access_log=False)
        await app.startup()
        try:
            await scenario(app)
        finally:
            await app.shutdown()

    asyncio.run(main())


def assert_400(reply: Reply, param: str) -> str:
    assert reply.status == 400, reply.body[:300]
    assert reply.header("content-type") == "application/json"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    message: str = error["message"]
    return message


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_a_60_byte_dimensions_request_gets_a_fast_400_and_healthz_keeps_answering() -> None:
    body = b'{"model":"fake-model","input":"x","dimensions":100000000}'
    assert len(body) <= 60

    async def scenario(app: GandalfApp) -> None:
        started = time.perf_counter()
        reply = await call(app, "POST", EMBEDDINGS, headers=AUTH, body=body)
        elapsed = time.perf_counter() - started
        message = assert_400(reply, "dimensions")
        assert str(MAX_DIMENSIONS) in message
        assert elapsed < 1.0, elapsed  # refused before any work: milliseconds
        health = await call(app, "GET", "/healthz")
        assert health.status == 200 and health.json() == {"status": "ok"}

    run(scenario)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(n=MAX_CHOICES + 1), "n"),
        (chat(n=0), "n"),
        (chat(max_tokens=MAX_OUTPUT_TOKENS + 1), "max_tokens"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_completion_tokens=10**12), "max_completion_tokens"),
        (chat(stop=["a"] * (MAX_STOP + 1)), "stop"),
        (chat(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias"),
        (
            chat(tools=[{"type": "function", "function": {"name": "f"}}] * (MAX_TOOLS + 1)),
            "tools",
        ),
        (
            {"model": "fake-model", "messages": [{"role": "user", "content": "x"}] * 16_385},
            "messages",
        ),
    ],
    ids=[
        "n-high",
        "n-zero",
        "max_tokens-high",
        "max_tokens-zero",
        "max_completion_tokens-huge",
        "stop",
        "logit_bias",
        "tools",
        "messages",
    ],
)
def test_chat_sizes_over_the_bound_are_a_400_naming_the_param(
    body: dict[str, Any], param: str
) -> None:
    async def scenario(app: GandalfApp) -> None:
        assert_400(await call(app, "POST", CHAT, headers=AUTH, json=body), param)

    run(scenario)


def test_chat_sizes_at_the_bound_are_served() -> None:
    body = chat(
        n=MAX_CHOICES,
        max_tokens=MAX_OUTPUT_TOKENS,
        stop=["a"] * MAX_STOP,
        logit_bias={str(i): -100 for i in range(MAX_LOGIT_BIAS)},
        tools=[{"type": "function", "function": {"name": "f"}}] * MAX_TOOLS,
    )

    async def scenario(app: GandalfApp) -> None:
        reply = await call(app, "POST", CHAT, headers=AUTH, json=body)
        assert reply.status == 200, reply.body

    run(scenario)


@pytest.mark.parametrize(
    ("embed_input", "dimensions"),
    [
        (["x"] * (MAX_EMBEDDING_INPUTS + 1), None),
        ("x" * (MAX_EMBEDDING_CHARS + 1), None),
        ([[1] * (MAX_EMBEDDING_TOKENS + 1)], None),
        ([1] * (MAX_EMBEDDING_TOKENS + 1), None),
        ("x", MAX_DIMENSIONS + 1),
        ("x", 0),
    ],
    ids=["inputs", "string", "token-arrays", "token-array", "dimensions-high", "dimensions-zero"],
)
def test_embeddings_sizes_over_the_bound_are_a_400(
    embed_input: Any, dimensions: int | None
) -> None:
    body: dict[str, Any] = {"model": "fake-model", "input": embed_input}
    if dimensions is not None:
        body["dimensions"] = dimensions

    async def scenario(app: GandalfApp) -> None:
        reply = await call(app, "POST", EMBEDDINGS, headers=AUTH, json=body)
        assert_400(reply, "input" if dimensions is None else "dimensions")

    run(scenario)


def test_the_fake_provider_bounds_its_own_embedding_work() -> None:
    dimensions = 1024
    inputs = MAX_EMBEDDING_VALUES // dimensions

    async def scenario(app: GandalfApp) -> None:
        ok = {"model": "fake-model", "input": ["x"] * inputs, "dimensions": dimensions}
        reply = await call(app, "POST", EMBEDDINGS, headers=AUTH, json=ok)
        assert reply.status == 200, reply.body[:300]
        assert len(reply.json()["data"]) == inputs
        over = dict(ok, input=["x"] * (inputs + 1))
        message = assert_400(
            await call(app, "POST", EMBEDDINGS, headers=AUTH, json=over), "dimensions"
        )
        assert str(MAX_EMBEDDING_VALUES) in message

    run(scenario)


def test_the_fake_provider_bounds_its_reply_and_honours_the_output_limit() -> None:
    long_text = "abcd" * (MAX_REPLY_TOKENS + 500)

    async def scenario(app: GandalfApp) -> None:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": long_text}]}
        reply = await call(app, "POST", CHAT, headers=AUTH, json=body)
        assert reply.status == 200
        data = reply.json()
        assert len(data["choices"][0]["message"]["content"]) == MAX_REPLY_TOKENS * 4
        assert data["usage"]["completion_tokens"] == MAX_REPLY_TOKENS

        limited = dict(body, max_completion_tokens=3)
        reply = await call(app, "POST", CHAT, headers=AUTH, json=limited)
        assert reply.json()["choices"][0]["message"]["content"] == "abcd" * 3

        streamed = dict(body, stream=True, max_tokens=5)
        reply = await call(app, "POST", CHAT, headers=AUTH, json=streamed, stay=True)
        assert reply.status == 200
        events = [e for e in reply.body.split(b"\n\n") if e.startswith(b"data: {")]
        text = "".join(
            orjson.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events
        )
        assert text == "abcd" * 5

    run(scenario)


def test_relayed_rate_limit_headers_give_way_to_the_gateways() -> None:
    from gandalf.server.wire import relay_with_limits

    upstream = (
        (b"X-RateLimit-Limit-Requests", b"10000"),  # a native upstream's own spelling
        (b"x-ratelimit-reset-tokens", b"6ms"),
        (b"request-id", b"req_1"),
    )
    ours = [(b"x-ratelimit-limit-requests", b"5")]
    assert relay_with_limits(upstream, ours) == (
        (b"request-id", b"req_1"),
        (b"x-ratelimit-limit-requests", b"5"),
    )
    assert relay_with_limits(upstream, []) == upstream  # no limits: relayed as is


def test_the_upstreams_rate_limit_headers_come_last_and_are_cut_by_position() -> None:
    """provider/openai.py's relayed() puts the upstream's x-ratelimit-* last
    and says where they start; cutting there (a limited caller's answer)
    gives exactly what dropping them by name gives, for any mix and spelling
    of names, and the headers relayed are relayed_headers'."""
    from gandalf.provider.openai import relayed, relayed_headers
    from gandalf.server.wire import relay_with_limits

    names = [
        b"X-RateLimit-Limit-Requests",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-requests",
        b"openai-processing-ms",
        b"OpenAI-Version",
        b"x-request-id",
        b"X-Request-ID",
        b"content-type",
        b"date",
        b"openai-organization",
        b"x-other",
    ]
    ours = [(b"x-ratelimit-limit-requests", b"5"), (b"x-ratelimit-remaining-requests", b"4")]
    rng = random.Random(3)
    for _ in range(500):
        raw = tuple((rng.choice(names), b"%d" % i) for i in range(rng.randint(0, 12)))
        headers, at = relayed(raw)
        assert headers == relayed_headers(raw)
        assert all(not n.startswith(b"x-ratelimit-") for n, _ in headers[:at])
        assert all(n.startswith(b"x-ratelimit-") for n, _ in headers[at:])
        assert relay_with_limits(headers, ours, at) == relay_with_limits(headers, ours)
        assert relay_with_limits(headers, [], at) == headers


def test_chat_reserves_max_completion_tokens_over_max_tokens_on_every_path() -> None:
    """A chat request's output allowance in the TPM estimate is
    ``max_completion_tokens`` (the current name) when it is sent, else
    ``max_tokens``: plain and streamed, on a route without and with the
    response cache (four call sites in app/proxy.py). Each request has its own
    key, so its x-ratelimit-remaining-tokens is a fresh bucket less its
    estimate (a quarter of its body plus the allowance)."""
    paths = [(model, stream) for model in ("fake-model", "cached") for stream in (False, True)]
    cases = [(model, stream, both) for model, stream in paths for both in (True, False)]
    keys = ["gnd_" + format(n, "x") * 43 for n in range(len(cases))]
    cfg = GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="fake", type="fake"),),
        routes=(
            Route(model_alias="fake-model", targets=(Target(provider="fake", model="fake-1"),)),
            Route(
                model_alias="cached", targets=(Target(provider="fake", model="fake-1"),), cache=True
            ),
        ),
        keys=tuple(
            KeyEntry(name=f"tpm-{n}", key=key, role="member", tpm=1_000_000)
            for n, key in enumerate(keys)
        ),
    )

    async def main() -> None:
        app = create_app(cfg, access_log=False)
        await app.startup()
        try:
            for key, (model, stream, both) in zip(keys, cases, strict=True):
                request: dict[str, Any] = {
                    "model": model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 9,
                    "stream": stream,
                    "temperature": 0,
                }
                if both:
                    request["max_completion_tokens"] = 7
                body = orjson.dumps(request)
                reply = await call(
                    app,
                    "POST",
                    CHAT,
                    headers=[("authorization", f"Bearer {key}")],
                    body=body,
                    stay=stream,
                )
                assert reply.status == 200, (model, stream, reply.body[:200])
                left = int(reply.header("x-ratelimit-remaining-tokens") or -1)
                allowance = 7 if both else 9
                assert left == 1_000_000 - (len(body) // 4 + allowance), (model, stream, both)
        finally:
            await app.shutdown()

    asyncio.run(main())
