"""Config for routing and resilience: timeouts, breakers, strategies, retries, coalescing."""

from __future__ import annotations

import textwrap

import pytest

from gandalf.config import GandalfConfig, parse_config
from gandalf.domain import BreakerPolicy, Resilience
from gandalf.errors import ConfigError

PROVIDERS = """\
providers:
  - { name: fake, models: [fake-model] }
  - { name: up, type: openai, base_url: "http://127.0.0.1:1/v1", api_key: sk }
"""
ROUTE = "routes: [{ model_alias: m, targets: [{ provider: fake, model: x }] }]\n"


def parse(text: str) -> GandalfConfig:
    return parse_config(textwrap.dedent(text), source="gandalf.yaml", env={})


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message and message.startswith("gandalf.yaml: ")
    return message.removeprefix("gandalf.yaml: ")


def test_defaults() -> None:
    cfg = parse(PROVIDERS + ROUTE)
    assert cfg.resilience == Resilience()
    assert cfg.resilience == Resilience(
        max_attempts=3,
        backoff_base=0.1,
        backoff_cap=10.0,
        retry_budget_ratio=0.2,
        retry_budget_min_per_second=1.0,
        breaker=BreakerPolicy(error_rate=0.5, min_samples=20, open_for=30.0, window=60.0),
    )
    up = cfg.providers[1]
    assert (up.connect_timeout_ms, up.first_byte_timeout_ms, up.breaker) == (5000, None, None)
    (route,) = cfg.routes
    assert (route.strategy, route.max_attempts, route.coalesce) == ("priority", None, False)


def test_everything_set() -> None:
    cfg = parse(
        """\
        resilience:
          max_attempts: 4
          backoff_base: 50ms
          backoff_cap: 2s
          retry_budget_ratio: 0.1
          retry_budget_min_per_second: 0.5
          breaker: { error_rate: 0.4, min_samples: 10, open_for: 1m, window: 30s }
        providers:
          - name: up
            type: openai
            base_url: "http://127.0.0.1:1/v1"
            api_key: sk
            timeout_ms: 20000
            connect_timeout_ms: 1500
            first_byte_timeout_ms: 8000
            breaker: { open_for: 5s }
        routes:
          - model_alias: m
            strategy: least_latency
            max_attempts: 2
            coalesce: true
            targets: [{ provider: up, model: a }, { provider: up, model: b }]
          - model_alias: w
            strategy: weighted
            targets: [{ provider: up, model: a, weight: 3 }, { provider: up, model: b }]
        """
    )
    assert cfg.resilience == Resilience(
        max_attempts=4,
        backoff_base=0.05,
        backoff_cap=2.0,
        retry_budget_ratio=0.1,
        retry_budget_min_per_second=0.5,
        breaker=BreakerPolicy(error_rate=0.4, min_samples=10, open_for=60.0, window=30.0),
    )
    (up,) = cfg.providers
    assert (up.connect_timeout_ms, up.first_byte_timeout_ms) == (1500, 8000)
    # A provider's breaker takes the gateway's values for what it does not set.
    assert up.breaker == BreakerPolicy(error_rate=0.4, min_samples=10, open_for=5.0, window=30.0)
    m, w = cfg.routes
    assert (m.strategy, m.max_attempts, m.coalesce) == ("least_latency", 2, True)
    assert w.strategy == "weighted" and [t.weight for t in w.targets] == [3, 1]


def test_connect_timeout_is_capped_at_the_total() -> None:
    cfg = parse(
        "providers: [{ name: up, type: openai, base_url: 'http://h/v1', api_key: k, "
        "timeout_ms: 2000, connect_timeout_ms: 9000 }]\n"
    )
    assert cfg.providers[0].connect_timeout_ms == 2000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "resilience: { max_attempts: 0 }\n",
            "resilience.max_attempts: expected integer >= 1",
        ),
        (
            "resilience: { max_attempts: 11 }\n",
            "resilience.max_attempts: expected integer <= 10",
        ),
        (
            "resilience: { backoff_base: 1s, backoff_cap: 500ms }\n",
            "resilience.backoff_cap: must be at least backoff_base (1s), got 0.5s",
        ),
        (
            "resilience: { backoff_base: soon }\n",
            "resilience.backoff_base: invalid duration 'soon' (use e.g. 500ms, 30s, 2m, 1h)",
        ),
        (
            "resilience: { retry_budget_ratio: 1.5 }\n",
            "resilience.retry_budget_ratio: expected number <= 1.0",
        ),
        (
            "resilience: { breaker: { error_rate: 0 } }\n",
            "resilience.breaker.error_rate: expected number > 0.0",
        ),
        (
            "resilience: { breaker: { min_samples: 0 } }\n",
            "resilience.breaker.min_samples: expected integer >= 1",
        ),
        (
            "resilience: { breaker: { window: 500ms } }\n",
            "resilience.breaker.window: expected number >= 1.0",
        ),
        (
            "resilience: { breaker: { open_for: -1s } }\n",
            "resilience.breaker.open_for: invalid duration '-1s' (use e.g. 500ms, 30s, 2m, 1h)",
        ),
        (
            "resilience: { breaker: { error_rat: 0.5 } }\n",
            "resilience.breaker.error_rat: unknown key (did you mean 'error_rate'?)",
        ),
        (
            "resilience: { retries: 2 }\n",
            "resilience.retries: unknown key (expected one of: max_attempts, backoff_base, "
            "backoff_cap, retry_budget_ratio, retry_budget_min_per_second, breaker)",
        ),
    ],
)
def test_resilience_errors(text: str, message: str) -> None:
    assert error(PROVIDERS + text) == message


@pytest.mark.parametrize(
    ("provider", "message"),
    [
        ("connect_timeout_ms: 0", "providers[1].connect_timeout_ms: expected integer >= 1"),
        ("first_byte_timeout_ms: -5", "providers[1].first_byte_timeout_ms: expected integer >= 1"),
        (
            "breaker: { open_for: never }",
            "providers[1].breaker.open_for: invalid duration 'never' (use e.g. 500ms, 30s, 2m, 1h)",
        ),
        (
            "breaker: { min_sample: 3 }",
            "providers[1].breaker.min_sample: unknown key (did you mean 'min_samples'?)",
        ),
    ],
)
def test_provider_errors(provider: str, message: str) -> None:
    text = (
        "providers:\n  - { name: fake }\n"
        f"  - {{ name: up, type: openai, base_url: 'http://h/v1', api_key: k, {provider} }}\n"
    )
    assert error(text) == message


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            "strategy: fastest",
            "routes[0].strategy: expected one of priority, weighted, least_latency, got 'fastest'",
        ),
        ("max_attempts: 0", "routes[0].max_attempts: expected integer >= 1"),
        ("coalesce: maybe", "routes[0].coalesce: expected boolean, got string"),
    ],
)
def test_route_errors(route: str, message: str) -> None:
    text = (
        PROVIDERS
        + f"routes: [{{ model_alias: m, {route}, targets: [{{ provider: fake, model: x }}] }}]\n"
    )
    assert error(text) == message


def test_a_weighted_route_needs_some_weight() -> None:
    text = PROVIDERS + (
        "routes: [{ model_alias: m, strategy: weighted, "
        "targets: [{ provider: fake, model: x, weight: 0 }] }]\n"
    )
    assert error(text) == "routes[0].targets: a weighted route needs a target of weight > 0"


def test_the_shipped_config_still_loads() -> None:
    from pathlib import Path

    from gandalf.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "gandalf.yaml", env={})
    assert cfg.resilience == Resilience()
