"""The fake provider's error injection (``providers[].errors``): config validation,
deterministic draws with a seed, and what a client sees through the gateway (429 with
``retry-after``, 502, 504 after the provider's header timeout), in process."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig, parse_config
from gandalf.domain import FakeErrors, ProviderConfig, Resilience, Route, Target
from gandalf.errors import ConfigError
from gandalf.wiring import create_app
from tests.asgi_client import call

KEY = "gnd_" + "e" * 43
SEED = 7
N = 200


def _config(errors: FakeErrors | None, *, timeout_ms: int = 30_000) -> GandalfConfig:
    return GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="fake", type="fake", errors=errors, timeout_ms=timeout_ms),),
        routes=(Route(model_alias="m", targets=(Target(provider="fake", model="fake-1"),)),),
        keys=(KeyEntry(name="k", key=KEY, role="member"),),
        # One attempt: every injected failure reaches the client as it is.
        resilience=Resilience(max_attempts=1),
    )


def _expected(errors: FakeErrors, n: int) -> Counter[int]:
    """What the seeded draws must give: the same sequence, computed independently."""
    rng = random.Random(errors.seed)
    out: Counter[int] = Counter()
    for _ in range(n):
        u = rng.random()
        if u < errors.rate_429:
            out[429] += 1
        elif u < errors.rate_429 + errors.rate_5xx:
            out[502] += 1
        elif u < errors.rate_429 + errors.rate_5xx + errors.rate_timeout:
            out[504] += 1
        else:
            out[200] += 1
    return out


def test_config_reads_errors_for_a_fake_provider() -> None:
    config = parse_config(
        "providers: [{name: fake, errors: {rate_429: 0.05, rate_5xx: 0.02, rate_timeout: 0.01,"
        " retry_after: 3, seed: 1}}]",
        source="t.yaml",
    )
    assert config.providers[0].errors == FakeErrors(
        rate_429=0.05, rate_5xx=0.02, rate_timeout=0.01, retry_after=3, seed=1
    )
    zero = parse_config("providers: [{name: fake, errors: {}}]", source="t.yaml")
    assert zero.providers[0].errors is None  # nothing to inject: the healthy path


@pytest.mark.parametrize(
    ("yaml", "problem"),
    [
        ("{name: fake, errors: {rate_429: 1.5}}", "rate_429"),
        ("{name: fake, errors: {rate_5xx: -0.1}}", "rate_5xx"),
        ("{name: fake, errors: {rate_429: 0.6, rate_5xx: 0.6}}", "at most 1"),
        ("{name: fake, errors: {rate_oops: 0.1}}", "rate_oops"),
        ("{name: fake, errors: {retry_after: -1}}", "retry_after"),
        (
            "{name: o, type: openai, api_key: x, errors: {rate_429: 0.1}}",
            "only a provider of type 'fake'",
        ),
    ],
)
def test_config_refuses_bad_errors(yaml: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"providers: [{yaml}]", source="t.yaml")
    assert problem in str(info.value)


def test_injected_failures_follow_the_seed_and_reach_the_client() -> None:
    errors = FakeErrors(rate_429=0.2, rate_5xx=0.1, rate_timeout=0.05, retry_after=4, seed=SEED)
    expected = _expected(errors, N)
    assert all(expected[s] > 0 for s in (200, 429, 502, 504))  # the seed exercises all four
    seen: Counter[int] = Counter()
    shapes: dict[int, bytes] = {}
    retry_after: set[str | None] = set()

    async def main() -> None:
        # A 1 ms header timeout: the injected timeouts wait that long, then fail.
        app = create_app(_config(errors, timeout_ms=1), access_log=False)
        await app.startup()
        try:
            for i in range(N):
                reply = await call(
                    app,
                    "POST",
                    "/v1/chat/completions",
                    headers=[("authorization", f"Bearer {KEY}")],
                    json={
                        "model": "m",
                        "messages": [{"role": "user", "content": "hi"}],
                        "stream": i % 2 == 1,  # streams fail the same way, before any byte
                    },
                    stay=True,
                )
                seen[reply.status] += 1
                shapes.setdefault(reply.status, reply.body)
                if reply.status == 429:
                    retry_after.add(reply.header("retry-after"))
        finally:
            await app.shutdown()

    asyncio.run(main())
    assert seen == expected
    assert retry_after == {"4"}
    for status in (429, 502, 504):
        assert b'"error":{' in shapes[status] and b"injected" in shapes[status], shapes[status]
    assert b'"code":"rate_limit_exceeded"' in shapes[429]


def test_no_errors_configured_answers_every_request() -> None:
    async def main() -> Counter[int]:
        app = create_app(_config(None), access_log=False)
        await app.startup()
        seen: Counter[int] = Counter()
        try:
            for _ in range(20):
                reply = await call(
                    app,
                    "POST",
                    "/v1/chat/completions",
                    headers=[("authorization", f"Bearer {KEY}")],
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                )
                seen[reply.status] += 1
        finally:
            await app.shutdown()
        return seen

    assert asyncio.run(main()) == Counter({200: 20})
