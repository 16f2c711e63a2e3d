"""The response cache's parts (app/cache.py, app/_replay.py): the key, the
in-process store's bounds, TTL and eviction, the SSE replay and assembly, the
config and the route's trip through the store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from gandalf.app._replay import assemble, replay
from gandalf.app.cache import (
    BYPASS,
    ENTRY_OVERHEAD,
    HIT,
    MISS,
    NO_CACHE,
    NO_STORE,
    CachedAnswer,
    InProcessCache,
    cache_control,
    cache_key,
    embeddings_key,
)
from gandalf.app.proxy import ProxyService
from gandalf.app.router import RouteTable
from gandalf.config import parse_config, parse_size
from gandalf.domain import ProviderConfig, Route, Target, Usage
from gandalf.errors import ConfigError, GatewayError, RateLimited
from gandalf.provider.fake import FakeProvider
from gandalf.storage.sqlite import SqliteStore
from tests.resilience_fakes import FakeProvider as ResilienceFake
from tests.resilience_fakes import ListSink, chat_body
from tests.test_pipeline import LIMITS, SCOPED, FakeGovernor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "model": "gpt",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
    }
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not None})


def answer(size: int = 100, text: str = "x") -> CachedAnswer:
    return CachedAnswer((text * size)[:size].encode(), Usage(total_tokens=3), "p", "m")


# --------------------------------------------------------------------------- the key


def test_key_ignores_key_order_and_whitespace() -> None:
    one = b'{"model":"gpt","temperature":0,"messages":[{"role":"user","content":"hi"}]}'
    two = (
        b'{ "messages": [ {"content": "hi", "role": "user"} ],\n "temperature": 0, "model": "gpt" }'
    )
    assert cache_key("gpt", one) is not None
    assert cache_key("gpt", one) == cache_key("gpt", two)


def test_key_compares_numbers_as_parsed_doubles() -> None:
    assert cache_key("gpt", body(temperature=0.2)) == cache_key(
        "gpt", body(temperature=0.2).replace(b"0.2", b"0.20")
    )
    assert cache_key("gpt", body(temperature=0.2)) == cache_key(
        "gpt", body(temperature=0.2).replace(b"0.2", b"2e-1")
    )
    assert cache_key("gpt", body(temperature=0.2)) != cache_key("gpt", body(temperature=0.20001))
    # The sampling numbers are floats: 0 and 0.0 are one key.
    assert cache_key("gpt", body(temperature=0)) == cache_key("gpt", body(temperature=0.0))
    assert cache_key("gpt", body(top_p=1)) == cache_key("gpt", body(top_p=1.0))


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"user": "alice"},
        {"metadata": {"run": "42"}},
        {"store": True},
        {"safety_identifier": "u-1"},
        {"prompt_cache_key": "k"},
    ],
)
def test_key_ignores_fields_that_do_not_change_the_answer(extra: dict[str, Any]) -> None:
    assert cache_key("gpt", body(**extra)) == cache_key("gpt", body())


@pytest.mark.parametrize(
    "extra",
    [
        {"messages": [{"role": "user", "content": "hello"}]},
        {"temperature": 0.1},
        {"top_p": 0.5},
        {"max_tokens": 5},
        {"max_completion_tokens": 5},
        {"stop": ["x"]},
        {"seed": 1},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"logit_bias": {"1": 2}},
    ],
)
def test_key_changes_with_every_field_that_changes_the_answer(extra: dict[str, Any]) -> None:
    assert cache_key("gpt", body(**extra)) not in (None, cache_key("gpt", body()))


def test_embeddings_key() -> None:
    one = b'{"model":"e","input":"hi","dimensions":4,"user":"a"}'
    two = b'{"dimensions":4, "input":"hi", "model":"e"}'
    assert embeddings_key("e", one) is not None
    assert embeddings_key("e", one) == embeddings_key("e", two)
    assert embeddings_key("e", two) != embeddings_key("e", two.replace(b"4", b"8"))
    assert embeddings_key("e", two) != embeddings_key("other", two)
    assert embeddings_key("e", b"[1]") is None and embeddings_key("e", b"nope") is None
    # Never a chat key, even for the same bytes.
    chat = body(model="e")
    assert embeddings_key("e", chat) != cache_key("e", chat)


def test_key_includes_the_route_alias() -> None:
    assert cache_key("gpt", body()) != cache_key("other", body())


@pytest.mark.parametrize(
    ("fields", "cacheable"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.3}, True),  # the contract's bound
        ({"temperature": 0.31}, False),
        ({"temperature": 1}, False),
        ({"temperature": None}, False),  # absent: the provider's default, 1
        ({"temperature": 1.5, "seed": 7}, True),  # a seed makes it reproducible
        ({"temperature": 0, "n": 1}, True),
        ({"temperature": 0, "n": 2}, False),
    ],
)
def test_only_deterministic_requests_have_a_key(fields: dict[str, Any], cacheable: bool) -> None:
    assert (cache_key("gpt", body(**fields)) is not None) is cacheable


def test_cache_control_directives() -> None:
    assert cache_control(None) == 0
    assert cache_control(b"max-age=0") == 0
    assert cache_control(b"no-cache") == NO_CACHE
    assert cache_control(b"No-Store") == NO_STORE
    assert cache_control(b"no-cache, no-store") == NO_CACHE | NO_STORE


# --------------------------------------------------------------------------- the store


def test_ttl_with_an_injected_clock() -> None:
    clock = Clock()
    cache = InProcessCache(10, 1 << 20, clock=clock)
    assert cache.store(b"k", answer(), ttl=60)
    clock.now += 59.9
    assert cache.lookup(b"k") is not None
    clock.now += 0.1
    assert cache.lookup(b"k") is None
    assert len(cache) == 0 and cache.bytes == 0  # the expired entry left


def test_entry_bound_evicts() -> None:
    cache = InProcessCache(3, 1 << 20, clock=Clock())
    for i in range(5):
        cache.store(b"k%d" % i, answer(), ttl=60)
        assert len(cache) <= 3
    assert [b"k%d" % i in cache for i in range(5)] == [False, False, True, True, True]
    assert cache.evictions == 2


def test_byte_bound_evicts_and_is_never_exceeded() -> None:
    size = 1000 + ENTRY_OVERHEAD
    cache = InProcessCache(1000, 3 * size, clock=Clock())
    for i in range(10):
        assert cache.store(b"k%d" % i, answer(1000), ttl=60)
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.bytes == 3 * size
    # One big answer pushes out as many as it needs.
    assert cache.store(b"big", answer(2 * 1000 + ENTRY_OVERHEAD), ttl=60)
    assert cache.bytes <= cache.max_bytes and b"big" in cache
    assert len(cache) == 2 and cache.bytes == size + 2000 + 2 * ENTRY_OVERHEAD
    # An answer larger than the whole cache is refused, nothing evicted for it.
    assert not cache.store(b"huge", answer(3 * size), ttl=60)
    assert b"big" in cache


def test_replacing_a_key_keeps_the_byte_count_exact() -> None:
    cache = InProcessCache(10, 1 << 20, clock=Clock())
    cache.store(b"k", answer(100), ttl=60)
    cache.store(b"k", answer(500), ttl=60)
    assert len(cache) == 1 and cache.bytes == 500 + ENTRY_OVERHEAD


def test_sieve_keeps_entries_that_were_read() -> None:
    """Frequency: an entry read since it was stored survives the next sweep
    where a plain FIFO or LRU of the same order would drop it."""
    cache = InProcessCache(3, 1 << 20, clock=Clock())
    for key in (b"a", b"b", b"c"):
        cache.store(key, answer(), ttl=60)
    assert cache.lookup(b"a") is not None  # a is popular
    cache.store(b"d", answer(), ttl=60)  # evicts b (oldest unvisited), not a
    assert b"a" in cache and b"b" not in cache
    cache.store(b"e", answer(), ttl=60)  # the hand moves on: c goes
    assert b"a" in cache and b"c" not in cache
    # Newcomers that nobody reads leave before it (quick demotion).
    cache.store(b"f", answer(), ttl=60)
    cache.store(b"g", answer(), ttl=60)
    assert b"a" in cache and b"d" not in cache and b"e" not in cache
    # A plain LRU (order b, c, a after the read) would have dropped a when f came.


def test_an_expired_entry_is_evicted_first_even_if_it_was_read() -> None:
    clock = Clock()
    cache = InProcessCache(2, 1 << 20, clock=clock)
    cache.store(b"old", answer(), ttl=1)
    cache.store(b"young", answer(), ttl=100)
    cache.lookup(b"old")
    cache.lookup(b"young")
    clock.now += 2
    cache.store(b"new", answer(), ttl=100)
    assert b"young" in cache and b"old" not in cache


def test_purge_empties_and_counts() -> None:
    cache = InProcessCache(10, 1 << 20, clock=Clock())
    for i in range(4):
        cache.store(b"k%d" % i, answer(), ttl=60)
    assert asyncio.run(cache.purge()) == 4
    assert len(cache) == 0 and cache.bytes == 0 and cache.lookup(b"k0") is None
    cache.store(b"again", answer(), ttl=60)  # still usable after a purge
    assert asyncio.run(cache.get(b"again")) is not None


# --------------------------------------------------------------------------- replay and assembly

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}


def events_of(stream: bytes) -> list[Any]:
    assert stream.endswith(b"data: [DONE]\n\n")
    return [
        orjson.loads(e[len(b"data: ") :]) for e in stream.split(b"\n\n") if e.startswith(b"data: {")
    ]


def test_replay_then_assemble_gives_the_answer_back() -> None:
    stream = replay(orjson.dumps(COMPLETION), wants_usage=True)
    assert stream is not None
    events = events_of(stream)
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == "chatcmpl-1" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 12
    back = assemble([stream], None)
    assert back is not None
    again = orjson.loads(back)
    assert again["choices"][0]["message"]["content"] == "Let me check."
    assert (
        again["choices"][0]["message"]["tool_calls"]
        == COMPLETION["choices"][0]["message"][  # type: ignore[index]
            "tool_calls"
        ]
    )
    assert again["choices"][0]["finish_reason"] == "tool_calls"
    assert again["usage"] == COMPLETION["usage"]


def test_replay_without_usage_has_no_usage_chunk() -> None:
    stream = replay(orjson.dumps(COMPLETION), wants_usage=False)
    assert stream is not None
    assert all("usage" not in e for e in events_of(stream))


def test_assemble_merges_tool_call_fragments_and_takes_the_reported_usage() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + orjson.dumps({"id": "c", "model": "m", "choices": [choice]}) + b"\n\n"

    chunks = [
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [{"index": 0, "id": "t0", "function": {"name": "get_"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "time", "arguments": '{"tz"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ':"UTC"}'}}]}),
        chunk({}, "tool_calls"),
        b"data: [DONE]\n\n",
    ]
    back = assemble(chunks, Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    assert back is not None
    message = orjson.loads(back)["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "t0",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz":"UTC"}'},
        }
    ]
    assert orjson.loads(back)["usage"]["total_tokens"] == 3


@pytest.mark.parametrize(
    "chunks",
    [
        [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"half"}}]}\n\n'],  # no finish
        [
            b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n',
            b'data: {"error":{"message":"upstream broke","type":"upstream_error"}}\n\n',
        ],
        [b'data: {"choices":[{"index":1,"delta":{},"finish_reason":"stop"}]}\n\n'],  # n > 1
        [b"data: not json\n\n"],
        [b'data: {"choices":["odd"]}\n\n'],
    ],
    ids=["unfinished", "error-event", "second-choice", "not-json", "odd-shape"],
)
def test_assemble_refuses_what_is_not_a_completed_answer(chunks: list[bytes]) -> None:
    assert assemble(chunks, None) is None


def test_replay_refuses_a_body_that_is_not_a_completion() -> None:
    assert replay(b"not json", False) is None
    assert replay(b'{"choices":[]}', False) is None


# --------------------------------------------------------------------------- config and routes


def test_config_cache_section_and_route_settings() -> None:
    config = parse_config(
        """
providers: [{name: fake}]
cache: {max_entries: 50, max_bytes: 1GiB, ttl: 2m}
routes:
  - {model_alias: a, targets: [{provider: fake, model: x}], cache: {ttl: 1h}}
  - {model_alias: b, targets: [{provider: fake, model: x}], cache: false}
  - {model_alias: c, targets: [{provider: fake, model: x}]}
""",
        source="t.yaml",
    )
    assert config.cache is not None
    assert (config.cache.max_entries, config.cache.max_bytes, config.cache.ttl) == (
        50,
        1024**3,
        120.0,
    )
    assert [(r.cache, r.cache_ttl) for r in config.routes] == [
        (True, 3600.0),
        (False, None),
        (None, None),
    ]
    absent = parse_config("providers: [{name: fake}]", source="t.yaml")
    assert absent.cache is None
    defaults = parse_config("providers: [{name: fake}]\ncache: {}", source="t.yaml")
    assert defaults.cache is not None and defaults.cache.max_bytes == 256 * 1024**2


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("cache: {max_bytes: 12XB}", "t.yaml: cache.max_bytes: invalid size '12XB'"),
        ("cache: {ttl: soon}", "t.yaml: cache.ttl: invalid duration 'soon'"),
        ("cache: {max_entries: 0}", "t.yaml: cache.max_entries: expected integer >= 1"),
        ("cache: {size: 1}", "t.yaml: cache.size: unknown key"),
        (
            "routes: [{model_alias: a, targets: [{provider: fake, model: x}], cache: {ttl: 0}}]",
            "t.yaml: routes[0].cache.ttl: duration must be greater than 0",
        ),
        (
            "routes: [{model_alias: a, targets: [{provider: fake, model: x}], cache: 3}]",
            "t.yaml: routes[0].cache: expected boolean | mapping | null, got integer",
        ),
    ],
)
def test_config_refuses_bad_cache_settings(yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config("providers: [{name: fake}]\n" + yaml, source="t.yaml")
    assert str(refused.value).startswith(message)


def test_parse_size() -> None:
    assert parse_size("256MiB") == 256 * 1024**2
    assert parse_size("1GiB") == 1024**3
    assert parse_size("10MB") == 10_000_000
    assert parse_size(4096) == parse_size("4096") == 4096
    for bad in ("", "1.5GiB", "-1", True, 0):
        with pytest.raises(ValueError):
            parse_size(bad)


def _routes() -> list[Route]:
    target = (Target(provider="fake", model="fake-1"),)
    return [
        Route(model_alias="default", targets=target),
        Route(model_alias="off", targets=target, cache=False),
        Route(model_alias="on", targets=target, cache=True, cache_ttl=3600.0),
    ]


def test_route_entries_resolve_their_cache_once() -> None:
    providers = {"fake": FakeProvider(ProviderConfig(name="fake", type="fake"))}
    cache = InProcessCache()
    # No cache at all: nothing on any entry, and handlers need not read cache-control.
    table = RouteTable.build(_routes(), providers, {})
    assert [table.resolve(a).cache for a in ("default", "off", "on")] == [None, None, None]
    assert not table.caching
    # The top-level section present: every route but the one that opts out.
    table = RouteTable.build(_routes(), providers, {}, cache=cache, cache_ttl=300.0, cache_all=True)
    default, off, on = (table.resolve(a).cache for a in ("default", "off", "on"))
    assert off is None and default is not None and on is not None
    assert (default.ttl, on.ttl) == (300.0, 3600.0) and default.backend is cache
    assert table.caching and table.cache is cache  # for the admin API's purge
    # Absent section, a route that opts in: only that one (default bounds).
    table = RouteTable.build(_routes(), providers, {}, cache=cache, cache_all=False)
    assert [table.resolve(a).cache is not None for a in ("default", "off", "on")] == [
        False,
        False,
        True,
    ]


def test_route_cache_setting_survives_the_store(tmp_path: Path) -> None:
    async def scenario() -> list[Route]:
        store = SqliteStore(str(tmp_path / "g.db"))
        await store.open()
        try:
            await store.reconcile([ProviderConfig(name="fake", type="fake")], _routes())
            return await store.list_routes()
        finally:
            await store.close()

    stored = {r.model_alias: (r.cache, r.cache_ttl) for r in asyncio.run(scenario())}
    assert stored == {"default": (None, None), "off": (False, None), "on": (True, 3600.0)}


# --------------------------------------------------------------------------- the pipeline


def _service(governor: FakeGovernor) -> tuple[ProxyService, ListSink, ResilienceFake]:
    provider = ResilienceFake("a")
    table = RouteTable.build(
        [Route(model_alias="m", targets=(Target(provider="a", model="a-model"),))],
        {"a": provider},
        {},
        cache=InProcessCache(clock=Clock()),
        cache_all=True,
    )
    sink = ListSink()
    service = ProxyService(table, sink, governor=governor, cost=lambda p, m, u: 0.5)
    return service, sink, provider


def test_a_hit_settles_its_ticket_with_no_tokens_and_no_cost() -> None:
    """RPM is taken at admission and never refunded; a hit settles 0 tokens and
    0 USD, so TPM and budgets get their reservation back whole."""
    governor = FakeGovernor()
    service, sink, provider = _service(governor)
    request, raw = chat_body("m", temperature=0)

    async def scenario() -> list[Any]:
        return [await service.chat(SCOPED, request, raw, f"r{i}", 0.0) for i in range(2)]

    miss, hit = asyncio.run(scenario())
    assert len(provider.calls) == 1
    assert [c[0] for c in governor.calls] == ["admit", "settle", "admit", "settle"]
    assert governor.ends() == [("settle", 1, 7, 0.5), ("settle", 2, 0, 0.0)]
    assert (hit.attempts, hit.value.body) == (0, miss.value.body)
    assert list(miss.headers) == [*LIMITS, MISS] and list(hit.headers) == [*LIMITS, HIT]
    first, second = sink.records
    assert (first.cache_hit, first.cost_usd, first.saved_usd) == (False, 0.5, None)
    assert (second.cache_hit, second.cost_usd, second.saved_usd) == (True, 0.0, 0.5)
    assert (second.attempts, second.status, second.total_tokens) == (0, 200, 7)


def test_a_refusal_on_a_caching_route_says_what_the_cache_did() -> None:
    governor = FakeGovernor(refuse=RateLimited("Rate limit of key 'x' reached: 10 rpm."))
    service, sink, provider = _service(governor)

    async def refused(**fields: Any) -> GatewayError:
        request, raw = chat_body("m", **fields)
        with pytest.raises(RateLimited) as caught:
            await service.chat(SCOPED, request, raw, "r", 0.0)
        return caught.value

    assert MISS in asyncio.run(refused(temperature=0)).relayed
    assert BYPASS in asyncio.run(refused(temperature=1)).relayed
    assert provider.calls == [] and [r.status for r in sink.records] == [429, 429]
