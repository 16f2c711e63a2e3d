"""Pricing: rates resolved once per (provider, model), cost as arithmetic.

The arithmetic is checked against hand-computed figures and against the
price library's own calculator; ``pricing:`` overrides and adds prices; a
model with no price costs None and is warned about once, at start-up; the
library is never imported unless a price must be looked up; usage records
reach the database with their detail counts and cost.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import orjson
import pytest

from gandalf.app.pricing import (
    LibraryLookup,
    Pricing,
    Rates,
    build_pricing,
    configured_rates,
    library_in_subprocess,
    library_rates,
)
from gandalf.app.router import RouteEntry
from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig, parse_config
from gandalf.domain import ModelPrice, ProviderConfig, Route, Target, Usage
from gandalf.errors import ConfigError
from gandalf.wiring import create_app
from tests.asgi_client import call
from tests.mock_anthropic import MockAnthropic

ROOT = Path(__file__).resolve().parent.parent
KEY = "gnd_" + "p" * 43


def rates(input: float, output: float, cached: float, write: float) -> Rates:
    """Rates from USD-per-million figures."""
    return configured_rates(
        ModelPrice(
            provider="p",
            model="m",
            input=input,
            output=output,
            cached_input=cached,
            cache_write=write,
        )
    )


# --------------------------------------------------------------------------- arithmetic


def test_cached_and_cache_write_tokens_at_their_own_rates() -> None:
    r = rates(input=3.0, output=15.0, cached=0.3, write=3.75)
    usage = Usage(
        prompt_tokens=2112,  # 12 fresh + 2000 read from the cache + 100 written to it
        completion_tokens=6,
        total_tokens=2118,
        cached_prompt_tokens=2000,
        cache_write_tokens=100,
    )
    expected = (12 * 3.0 + 2000 * 0.3 + 100 * 3.75 + 6 * 15.0) / 1e6
    assert r.cost(usage) == pytest.approx(expected, rel=1e-12)
    # Without the detail counts every prompt token would be charged at input.
    plain = Usage(prompt_tokens=2112, completion_tokens=6, total_tokens=2118)
    assert r.cost(plain) == pytest.approx((2112 * 3.0 + 6 * 15.0) / 1e6, rel=1e-12)


def test_reasoning_tokens_inside_completion_at_the_output_rate() -> None:
    r = rates(input=1.1, output=4.4, cached=0.55, write=1.1)
    usage = Usage(
        prompt_tokens=1200,
        completion_tokens=300,
        total_tokens=1500,
        cached_prompt_tokens=1024,
        reasoning_tokens=192,
    )
    expected = (176 * 1.1 + 1024 * 0.55 + 300 * 4.4) / 1e6
    assert r.cost(usage) == pytest.approx(expected, rel=1e-12)
    assert r.reasoning == r.output


def test_cache_prices_default_to_the_input_price() -> None:
    r = configured_rates(ModelPrice(provider="p", model="m", input=2.0, output=8.0))
    assert r.cached_input == r.input == r.cache_write == pytest.approx(2e-6)


def test_tier_applies_above_its_prompt_threshold() -> None:
    low = rates(3.0, 15.0, 0.3, 3.75)
    high = rates(6.0, 22.5, 0.6, 7.5)
    tiered = Rates(
        input=low.input,
        output=low.output,
        cached_input=low.cached_input,
        cache_write=low.cache_write,
        reasoning=low.reasoning,
        tiers=((200_000, high),),
    )
    at = Usage(prompt_tokens=200_000, completion_tokens=10)
    above = Usage(prompt_tokens=200_001, completion_tokens=10)
    assert tiered.cost(at) == pytest.approx(low.cost(at))
    assert tiered.cost(above) == pytest.approx(high.cost(above))


USAGES = [
    Usage(prompt_tokens=1000, completion_tokens=100),
    Usage(prompt_tokens=1000, completion_tokens=100, cached_prompt_tokens=500),
    Usage(
        prompt_tokens=1600, completion_tokens=100, cached_prompt_tokens=500, cache_write_tokens=100
    ),
    Usage(prompt_tokens=250_000, completion_tokens=500, cached_prompt_tokens=10_000),
]


@pytest.mark.parametrize(
    ("type_", "model", "provider_id"),
    [
        ("openai", "gpt-4o", "openai"),
        ("openai", "gpt-4", "openai"),  # no cache price: cached tokens at input
        ("openai", "o3-mini", "openai"),
        ("anthropic", "claude-sonnet-4-5", "anthropic"),  # tiered above 200k
        ("gemini", "gemini-2.5-pro", "google"),  # tiered above 200k
        ("azure", "gpt-4o", "azure"),
    ],
)
def test_library_rates_agree_with_the_library_calculator(
    type_: str, model: str, provider_id: str
) -> None:
    genai_prices = pytest.importorskip("genai_prices")
    found = library_rates(ProviderConfig(name="p", type=type_), model)
    assert found is not None
    for usage in USAGES:
        theirs = genai_prices.calc_price(
            genai_prices.Usage(
                input_tokens=usage.prompt_tokens,
                cache_read_tokens=usage.cached_prompt_tokens,
                cache_write_tokens=usage.cache_write_tokens,
                output_tokens=usage.completion_tokens,
            ),
            model,
            provider_id=provider_id,
        ).total_price
        assert found.cost(usage) == pytest.approx(float(theirs), rel=1e-9), usage


def test_library_has_no_price_for_unknown_models_and_local_types() -> None:
    assert library_rates(ProviderConfig(name="p", type="openai"), "no-such-model-xyz") is None
    assert library_rates(ProviderConfig(name="p", type="ollama"), "llama3") is None
    assert library_rates(ProviderConfig(name="p", type="fake"), "gpt-4o") is None


# --------------------------------------------------------------------------- building


def fixed_library(table: dict[tuple[str, str], Rates]) -> tuple[list[str], LibraryLookup]:
    asked: list[str] = []

    def lookup(provider: ProviderConfig, model: str) -> Rates | None:
        asked.append(f"{provider.name}/{model}")
        return table.get((provider.type, model))

    return asked, lookup


def test_config_price_overrides_and_adds() -> None:
    library = {("openai", "gpt-4o"): rates(2.5, 10.0, 1.25, 2.5)}
    asked, lookup = fixed_library(library)
    providers = [
        ProviderConfig(name="oa", type="openai", models=("gpt-4o", "gpt-4o-mini")),
        ProviderConfig(name="oa2", type="openai", models=("gpt-4o",)),
        ProviderConfig(name="mine", type="fake", models=("echo",)),
    ]
    prices = [
        # by name: this provider only
        ModelPrice(provider="oa", model="gpt-4o", input=2.0, output=8.0, cached_input=0.5),
        # by type: every openai provider, for a model the library lacks
        ModelPrice(provider="openai", model="gpt-4o-mini", input=0.15, output=0.6),
        # the fake is priced only when asked to
        ModelPrice(provider="mine", model="echo", input=1.0, output=1.0),
    ]
    warned: list[str] = []
    pricing = build_pricing(providers, [], prices, library=lookup, warn=warned.append)
    usage = Usage(prompt_tokens=1000, completion_tokens=100, cached_prompt_tokens=400)
    assert pricing.cost("oa", "gpt-4o", usage) == pytest.approx((600 * 2 + 400 * 0.5 + 800) / 1e6)
    assert pricing.cost("oa2", "gpt-4o", usage) == pytest.approx(
        (600 * 2.5 + 400 * 1.25 + 1000) / 1e6
    )
    assert pricing.cost("oa", "gpt-4o-mini", usage) == pytest.approx((1000 * 0.15 + 60) / 1e6)
    assert pricing.cost("mine", "echo", usage) == pytest.approx(1100 / 1e6)
    rated = pricing.rates("oa", "gpt-4o")
    assert rated is not None and rated.source == "config"
    assert asked == ["oa2/gpt-4o"]  # a configured price is never looked up
    assert warned == [] and pricing.unpriced == ()


def test_unknown_model_costs_none_and_is_warned_once() -> None:
    _, lookup = fixed_library({})
    providers = [
        ProviderConfig(name="oa", type="openai", models=("mystery",)),
        ProviderConfig(name="f", type="fake", models=("echo",)),
    ]
    routes = [
        # the same pair reached through two routes and the provider's models
        Route(model_alias="a", targets=(Target(provider="oa", model="mystery"),)),
        Route(model_alias="b", targets=(Target(provider="oa", model="mystery"),)),
        Route(model_alias="c", targets=(Target(provider="f", model="echo"),)),
    ]
    warned: list[str] = []
    pricing = build_pricing(providers, routes, [], library=lookup, warn=warned.append)
    assert pricing.cost("oa", "mystery", Usage(prompt_tokens=5)) is None
    assert pricing.cost("f", "echo", Usage(prompt_tokens=5)) is None
    assert pricing.rates("oa", "mystery") is None
    assert pricing.cost(None, None, Usage()) is None
    assert len(warned) == 1  # not the fake's
    assert "'mystery'" in warned[0] and "'oa'" in warned[0]
    assert "pricing:" in warned[0] and "{ provider: oa, model: mystery, input:" in warned[0]
    assert "\n" not in warned[0]
    assert set(pricing.unpriced) == {("oa", "mystery"), ("f", "echo")}


def test_disabled_providers_are_neither_looked_up_nor_warned() -> None:
    asked, lookup = fixed_library({})
    providers = [
        ProviderConfig(name="oa", type="openai", models=("gpt-4o",), enabled=False),
    ]
    routes = [Route(model_alias="a", targets=(Target(provider="oa", model="gpt-4o"),))]
    warned: list[str] = []
    pricing = build_pricing(providers, routes, [], library=lookup, warn=warned.append)
    assert asked == [] and warned == [] and pricing.unpriced == ()


def test_cost_and_worst_case_of_a_route() -> None:
    """cost(): the record's price (cached tokens at their own rate); worst_case():
    the dearest priced target of the route (failover may land on any), None when
    none is priced."""
    pricing = Pricing(
        {("oa", "gpt-4o"): rates(2.0, 8.0, 0.5, 2.0), ("ob", "big"): rates(10.0, 30.0, 10.0, 10.0)}
    )
    usage = Usage(prompt_tokens=1000, completion_tokens=100, total_tokens=1100)
    usage.cached_prompt_tokens = 400
    assert pricing.cost("oa", "gpt-4o", usage) == pytest.approx((600 * 2 + 400 * 0.5 + 800) / 1e6)
    assert pricing.cost("oa", "other", usage) is None and pricing.cost(None, None, usage) is None

    def entry(*pairs: tuple[str, str]) -> RouteEntry:
        return route_entry(pairs)

    both = entry(("oa", "gpt-4o"), ("ob", "big"))
    assert pricing.worst_case(both, 100, 10) == pytest.approx((100 * 10 + 10 * 30) / 1e6)
    assert pricing.worst_case(entry(("oa", "gpt-4o"), ("x", "y")), 100, 10) == pytest.approx(
        (100 * 2 + 10 * 8) / 1e6
    )
    assert pricing.worst_case(entry(("x", "y")), 100, 10) is None


def route_entry(pairs: Sequence[tuple[str, str]]) -> RouteEntry:
    """A route over (provider name, model) targets (only what pricing reads)."""
    slots: Any = tuple(
        SimpleNamespace(name=p, target=Target(provider=p, model=m)) for p, m in pairs
    )
    return RouteEntry("a", (), None, slots=slots)


def test_worst_case_agrees_with_every_target_priced_each_time() -> None:
    """worst_case() keeps a route's dominant rates on the entry; whatever the
    route (dominant target or crossing prices, tiers, unpriced targets), it
    returns exactly the largest cost_of over its priced targets, on the first
    call and the later ones."""
    rng = random.Random(7)
    for _ in range(300):
        table: dict[tuple[str, str], Rates] = {}
        pairs = []
        for i in range(rng.randint(1, 4)):
            name = f"p{i}"
            pairs.append((name, "m"))
            if rng.random() < 0.2:
                continue  # unpriced
            base = rates(rng.choice((0.1, 1.0, 2.5, 3.0)), rng.choice((0.4, 5.0, 10.0)), 0.1, 1.0)
            if rng.random() < 0.15:
                high = rates(base.input * 2e6, base.output * 2e6, 0.1, 1.0)
                base = msgspec.structs.replace(base, tiers=((1000, high),))
            table[(name, "m")] = base
        pricing = Pricing(table)
        entry = route_entry(pairs)
        for _ in range(5):
            tokens_in, tokens_out = rng.randint(0, 5000), rng.randint(0, 5000)
            costs = [table[p].cost_of(tokens_in, tokens_out, 0, 0, 0) for p in pairs if p in table]
            assert pricing.worst_case(entry, tokens_in, tokens_out) == (
                max(costs) if costs else None
            )


def test_worst_case_follows_adopted_prices() -> None:
    """A route's kept rates are those of the prices in force: after adopt()
    (a route added at run time) the same entry is priced anew."""
    pricing = Pricing({("oa", "gpt-4o"): rates(2.0, 8.0, 0.5, 2.0)})
    entry = route_entry([("oa", "gpt-4o")])
    assert pricing.worst_case(entry, 100, 10) == pytest.approx((100 * 2 + 10 * 8) / 1e6)
    pricing.adopt(Pricing({("oa", "gpt-4o"): rates(4.0, 16.0, 0.5, 2.0)}))
    assert pricing.worst_case(entry, 100, 10) == pytest.approx((100 * 4 + 10 * 16) / 1e6)
    pricing.adopt(Pricing({}))
    assert pricing.worst_case(entry, 100, 10) is None


def test_the_gateway_never_imports_the_library() -> None:
    """Importing the gateway, pricing the shipped config (a fake provider,
    keyless ones disabled), configured prices, or models only the library
    prices never imports genai-prices into the process: the library is read
    by a child process (a worker would otherwise hold ~14 MB for it)."""
    code = (
        "import sys\n"
        "import gandalf.wiring, gandalf.cli\n"
        "from gandalf.app.pricing import build_pricing\n"
        "from gandalf.config import load_config\n"
        "c = load_config('gandalf.yaml')\n"
        "build_pricing(c.providers, c.routes, c.pricing)\n"
        "from gandalf.domain import ModelPrice, ProviderConfig\n"
        "build_pricing([ProviderConfig(name='f', type='fake', models=('m',)),"
        " ProviderConfig(name='o', type='openai', models=('x',))],"
        " [], [ModelPrice(provider='o', model='x', input=1, output=1)])\n"
        "p = build_pricing([ProviderConfig(name='o', type='openai', models=('gpt-4o',))], [], [])\n"
        "assert p.rates('o', 'gpt-4o') is not None, 'the library priced nothing'\n"
        "assert 'genai_prices' not in sys.modules, 'imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------- config


def test_pricing_section_parses() -> None:
    config = parse_config(
        "providers:\n"
        "  - { name: oa, type: openai, api_key: sk-x, models: [gpt-4o] }\n"
        "pricing:\n"
        "  - { provider: oa, model: gpt-4o, input: 2.50, output: 10.00, cached_input: 1.25 }\n"
        "  - { provider: openai, model: gpt-x, input: 1, output: 2, cache_write: 1.5 }\n",
        source="gandalf.yaml",
    )
    assert config.pricing == (
        ModelPrice(provider="oa", model="gpt-4o", input=2.5, output=10.0, cached_input=1.25),
        ModelPrice(provider="openai", model="gpt-x", input=1.0, output=2.0, cache_write=1.5),
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{ provider: oa, model: m, input: 1, output: 2, cached_inputs: 1 }",
            "gandalf.yaml: pricing[0].cached_inputs: unknown key (did you mean 'cached_input'?)",
        ),
        (
            "{ provider: nope, model: m, input: 1, output: 2 }",
            "gandalf.yaml: pricing[0].provider: no provider is named or typed 'nope' "
            "(known: oa, openai)",
        ),
        (
            "{ provider: oa, model: m, input: -1, output: 2 }",
            "gandalf.yaml: pricing[0].input: expected number >= 0.0",
        ),
        (
            "{ provider: oa, model: m, input: 1 }",
            "gandalf.yaml: pricing[0].output: required but missing",
        ),
        (
            "{ provider: oa, model: ' ', input: 1, output: 1 }",
            "gandalf.yaml: pricing[0].model: must not be empty",
        ),
    ],
)
def test_pricing_section_refuses_bad_entries_in_one_line(entry: str, message: str) -> None:
    text = f"providers:\n  - {{ name: oa, type: openai, api_key: sk-x }}\npricing:\n  - {entry}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="gandalf.yaml")
    assert str(caught.value) == message


def test_pricing_duplicate_pair_refused() -> None:
    text = (
        "providers:\n  - { name: oa, type: openai, api_key: sk-x }\n"
        "pricing:\n"
        "  - { provider: oa, model: m, input: 1, output: 2 }\n"
        "  - { provider: oa, model: m, input: 3, output: 4 }\n"
    )
    with pytest.raises(ConfigError, match=r"pricing\[1\]: duplicate price for oa/m"):
        parse_config(text, source="gandalf.yaml")


# --------------------------------------------------------------------------- end to end


def test_usage_rows_carry_detail_counts_and_cost(
    anthropic_mock: MockAnthropic, tmp_path: Path
) -> None:
    """Translated (/v1/chat/completions) and native (/v1/messages) calls,
    streamed and not, to an Anthropic upstream that reads half the prompt from its cache: the rows
    hold the cache reads and a cost with them at the cached rate."""
    db = tmp_path / "g.db"
    config = GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=str(db)),
        providers=(
            ProviderConfig(
                name="claude", type="anthropic", base_url=anthropic_mock.base_url, api_key="sk-a"
            ),
        ),
        routes=(Route(model_alias="c", targets=(Target(provider="claude", model="claude-ok"),)),),
        keys=(KeyEntry(name="k", key=KEY, role="member"),),
        pricing=(
            ModelPrice(
                provider="claude", model="claude-ok", input=3.0, output=15.0, cached_input=0.3
            ),
        ),
    )
    chat = {"model": "c", "messages": [{"role": "user", "content": "hello " * 40}]}
    native = {**chat, "max_tokens": 20}

    async def main() -> None:
        app = create_app(config, access_log=False)
        await app.startup()
        try:
            auth = [("authorization", f"Bearer {KEY}")]
            reply = await call(
                app, "POST", "/v1/chat/completions", headers=auth, body=orjson.dumps(chat)
            )
            assert reply.status == 200, reply.body
            headers = [("x-api-key", KEY), ("anthropic-version", "2023-06-01")]
            reply = await call(
                app, "POST", "/v1/messages", headers=headers, body=orjson.dumps(native)
            )
            assert reply.status == 200, reply.body
            streamed = orjson.dumps({**chat, "stream": True})
            reply = await call(app, "POST", "/v1/chat/completions", headers=auth, body=streamed)
            assert reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n"), reply.body
            streamed = orjson.dumps({**native, "stream": True})
            reply = await call(app, "POST", "/v1/messages", headers=headers, body=streamed)
            assert reply.status == 200 and b"message_stop" in reply.body, reply.body
        finally:
            await app.shutdown()

    asyncio.run(main())
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT endpoint, prompt_tokens, completion_tokens, cached_prompt_tokens, "
            "cache_write_tokens, reasoning_tokens, cost_usd FROM usage_records ORDER BY id"
        ).fetchall()
    assert len(rows) == 4, rows
    for endpoint, prompt, completion, cached, write, reasoning, cost in rows:
        assert cached > 0 and write == 0 and reasoning == 0, endpoint
        expected = ((prompt - cached) * 3.0 + cached * 0.3 + completion * 15.0) / 1e6
        assert cost == pytest.approx(expected, rel=1e-9), endpoint


def test_a_failed_library_child_leaves_models_unpriced_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with caplog.at_level("WARNING", logger="gandalf.pricing"):
        found = library_in_subprocess([(ProviderConfig(name="o", type="openai"), "gpt-4o")])
    assert found == {}
    (line,) = [r.getMessage() for r in caplog.records if "genai-prices" in r.getMessage()]
    assert "unpriced" in line
