"""The response cache end to end (issue 15, CONTRACT.md "Response cache"): the
official OpenAI SDK against Gandalf's app in process (``httpx.ASGITransport``,
so the cache's clock can be injected) and the mock upstreams on 127.0.0.1.

Hits, misses and bypass (temperature, ``n``, ``cache-control``), ``no-store``,
TTL expiry, eviction under the byte bound, stream replay (both ways, tool calls
included), failed streams and errors never cached, concurrent identical misses
sharing one upstream call, usage records of hits, RPM counted and TPM not,
``x-gandalf-cache`` on errors of caching routes and never on other routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the SDKs here are built on httpx2 (an httpx fork)
import openai
import pytest

from gandalf.app.cache import ENTRY_OVERHEAD, InProcessCache
from gandalf.config import CacheConfig, DatabaseConfig, GandalfConfig, KeyEntry
from gandalf.domain import ModelPrice, ProviderConfig, Resilience, Route, Target
from gandalf.server.asgi import GandalfApp
from gandalf.server.rsgi import RSGIApp
from gandalf.wiring import create_app
from tests.asgi_client import call
from tests.mock_anthropic import MockAnthropic
from tests.rsgi_client import rsgi_call
from tests.upstream import MockUpstream, running_upstream

KEY = "gnd_" + "c" * 40
LIMITED = "gnd_" + "l" * 40  # rpm 10, tpm 60,000
RPM, TPM = 10, 60_000
PER_TOKEN = 0.001  # USD: 1,000 per million tokens in and out
TTL = 300.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def upstream_mock() -> Iterator[MockUpstream]:
    with running_upstream() as mock:
        yield mock


def _route(alias: str, provider: str, model: str, **policy: Any) -> Route:
    return Route(model_alias=alias, targets=(Target(provider=provider, model=model),), **policy)


def _config(
    mock: MockUpstream, claude: MockAnthropic, db: Path, cache: CacheConfig | None
) -> GandalfConfig:
    return GandalfConfig(
        database=DatabaseConfig(dsn=str(db)),
        providers=(
            ProviderConfig(name="up", type="openai", base_url=mock.base_url, api_key="sk-up"),
            ProviderConfig(
                name="claude", type="anthropic", base_url=claude.base_url, api_key="sk-ant"
            ),
        ),
        routes=(
            _route("gpt", "up", "ok-model"),
            _route("gpt-long", "up", "ok-model", cache_ttl=3600.0),
            _route("gpt-off", "up", "ok-model", cache=False),
            _route("gpt-gate", "up", "gate"),
            _route("fails", "up", "status-500", max_attempts=1),
            _route("fails-off", "up", "status-500", max_attempts=1, cache=False),
            _route("stream-die", "up", "stream-then-die", max_attempts=1),
            _route("stream-slow", "up", "slow-stream"),
            _route("tools", "claude", "claude-tools"),
            _route("embed", "up", "embed-model"),
            _route("embed-off", "up", "embed-model", cache=False),
            _route("gpt-headers", "up", "with-headers"),  # OpenAI's x-ratelimit-* and more
        ),
        keys=(
            KeyEntry(name="app", key=KEY, role="member"),
            KeyEntry(name="limited", key=LIMITED, role="member", rpm=RPM, tpm=TPM),
        ),
        pricing=(
            ModelPrice(provider="up", model="ok-model", input=1000.0, output=1000.0),
            ModelPrice(provider="claude", model="claude-tools", input=1000.0, output=1000.0),
        ),
        resilience=Resilience(max_attempts=1, backoff_base=0.001, backoff_cap=0.01),
        cache=cache,
    )


class Gateway:
    """The app, an SDK client on it, the cache and its clock, the mock."""

    def __init__(
        self,
        app: GandalfApp,
        http: httpx.AsyncClient,
        cache: InProcessCache,
        clock: Clock,
        mock: MockUpstream,
    ) -> None:
        self.app = app
        self.http = http
        self.cache = cache
        self.clock = clock
        self.mock = mock

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://gandalf/v1", api_key=key, http_client=self.http, max_retries=0
        )

    def calls(self, text: str) -> int:
        """Upstream chat calls the mock received whose last message is ``text``."""
        count = 0
        for received in self.mock.received:
            if received.path.endswith("/chat/completions"):
                messages = received.json().get("messages") or [{}]
                count += messages[-1].get("content") == text
        return count


Scenario = Callable[[Gateway], Awaitable[None]]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gandalf.db"


@pytest.fixture
def run(
    upstream_mock: MockUpstream, anthropic_mock: MockAnthropic, db: Path
) -> Callable[..., None]:
    """``run(scenario, max_bytes=..., section=True)``: start the app with an
    InProcessCache on a fake clock, run the scenario, stop the app (usage
    flushed to ``db``)."""

    def runner(scenario: Scenario, *, max_bytes: int = 1 << 24, section: bool = True) -> None:
        clock = Clock()
        cache = InProcessCache(1000, max_bytes, clock=clock)
        settings = CacheConfig(max_entries=1000, max_bytes=max_bytes, ttl=TTL) if section else None
        config = _config(upstream_mock, anthropic_mock, db, settings)

        async def main() -> None:
            app = create_app(config, access_log=False, response_cache=cache)
            await app.startup()
            try:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://gandalf") as h:
                    await scenario(Gateway(app, h, cache, clock, upstream_mock))
            finally:
                await app.shutdown()

        asyncio.run(main())

    return runner


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def ask(
    client: openai.AsyncOpenAI, text: str, model: str = "gpt", **extra: Any
) -> tuple[str, Any]:
    """(x-gandalf-cache, the parsed completion)."""
    extra.setdefault("temperature", 0)
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=user(text), **extra
    )
    return raw.headers.get("x-gandalf-cache"), raw.parse()


async def ask_stream(
    client: openai.AsyncOpenAI, text: str, model: str = "gpt", **extra: Any
) -> tuple[str, list[Any]]:
    """(x-gandalf-cache, the chunks the SDK parsed)."""
    extra.setdefault("temperature", 0)
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=user(text), stream=True, **extra
    )
    chunks = [chunk async for chunk in raw.parse()]
    return raw.headers.get("x-gandalf-cache"), chunks


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def usage_rows(db: Path) -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM usage_records ORDER BY id").fetchall()


# --------------------------------------------------------------------------- hits and misses


def test_a_miss_then_a_hit_calls_the_upstream_once(run: Callable[..., None], db: Path) -> None:
    text = unique("hello")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        first_label, first = await ask(client, text)
        second_label, second = await ask(client, text, user="someone-else")  # not in the key
        assert (first_label, second_label) == ("miss", "hit")
        assert gw.calls(text) == 1
        assert second.choices[0].message.content == first.choices[0].message.content == text
        assert second.usage == first.usage
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt", messages=user(text), temperature=0.0
        )
        assert raw.headers["x-gandalf-cache"] == "hit"
        assert raw.headers["x-gandalf-attempts"] == "0"
        assert raw.headers["x-gandalf-provider"] == "up"

    run(scenario)
    rows = [r for r in usage_rows(db) if r["model_alias"] == "gpt"]
    assert [(r["cache_hit"], r["attempts"], r["status"]) for r in rows] == [
        (0, 1, 200),
        (1, 0, 200),
        (1, 0, 200),
    ]
    miss, hit = rows[0], rows[1]
    assert miss["cost_usd"] == pytest.approx(miss["total_tokens"] * PER_TOKEN)
    assert miss["saved_usd"] is None
    assert hit["cost_usd"] == 0.0
    assert hit["saved_usd"] == pytest.approx(miss["cost_usd"])
    assert hit["total_tokens"] == miss["total_tokens"]  # the answer's tokens, not charged


@pytest.mark.parametrize(
    ("extra", "headers"),
    [
        ({"temperature": 1}, {}),
        ({"temperature": 0.5}, {}),
        ({"temperature": 0, "n": 2}, {}),
        ({"temperature": 0}, {"cache-control": "no-cache"}),
    ],
    ids=["temperature-1", "temperature-0.5", "n-2", "no-cache"],
)
def test_bypass(run: Callable[..., None], extra: dict[str, Any], headers: dict[str, str]) -> None:
    text = unique("bypass")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        labels = [
            (await ask(client, text, extra_headers=headers, **extra))[0],
            (await ask(client, text, extra_headers=headers, **extra))[0],
        ]
        assert labels == ["bypass", "bypass"]
        assert gw.calls(text) == 2

    run(scenario)


def test_no_cache_still_stores_and_no_store_does_not(run: Callable[..., None]) -> None:
    fresh, private = unique("fresh"), unique("private")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        no_cache = {"cache-control": "no-cache"}
        no_store = {"cache-control": "no-store"}
        assert (await ask(client, fresh, extra_headers=no_cache))[0] == "bypass"
        assert (await ask(client, fresh))[0] == "hit"  # stored all the same
        assert gw.calls(fresh) == 1
        assert (await ask(client, private, extra_headers=no_store))[0] == "miss"
        assert (await ask(client, private))[0] == "miss"  # nothing was stored
        assert (await ask(client, private))[0] == "hit"  # the second one was
        assert gw.calls(private) == 2

    run(scenario)


def test_cache_control_is_read_through_rsgi_too(run: Callable[..., None]) -> None:
    """The handler reads ``cache-control`` through the one header accessor,
    whichever interface delivered the request (RSGI's headers are a mapping)."""
    text = unique("rsgi")
    body = {"model": "gpt", "messages": user(text), "temperature": 0}
    auth = ("authorization", f"Bearer {KEY}")

    async def scenario(gw: Gateway) -> None:
        rsgi = RSGIApp(gw.app)
        path = "/v1/chat/completions"

        async def label(*headers: tuple[str, str]) -> str | None:
            reply = await rsgi_call(rsgi, "POST", path, headers=[auth, *headers], json=body)
            assert reply.status == 200
            return reply.header("x-gandalf-cache")

        assert await label(("cache-control", "no-store")) == "miss"
        assert await label(("cache-control", "no-store")) == "miss"
        assert await label() == "miss"
        assert await label() == "hit"
        assert await label(("cache-control", "no-cache")) == "bypass"
        assert gw.calls(text) == 4

    run(scenario)


def test_ttl_expiry_and_a_routes_own_ttl(run: Callable[..., None]) -> None:
    text = unique("ttl")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        assert (await ask(client, text))[0] == "miss"
        assert (await ask(client, text, model="gpt-long"))[0] == "miss"  # alias in the key
        gw.clock.now += TTL - 1
        assert (await ask(client, text))[0] == "hit"
        gw.clock.now += 2  # past the default TTL: gone
        assert (await ask(client, text))[0] == "miss"
        assert (await ask(client, text, model="gpt-long"))[0] == "hit"  # ttl: 1h
        assert gw.calls(text) == 3

    run(scenario)


def test_eviction_under_the_byte_bound(run: Callable[..., None]) -> None:
    texts = [unique(f"evict-{i}") for i in range(4)]

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        for text in texts[:3]:
            assert (await ask(client, text))[0] == "miss"
        assert len(gw.cache) == 3 and gw.cache.bytes <= gw.cache.max_bytes
        assert (await ask(client, texts[1]))[0] == "hit"  # read: SIEVE keeps it
        assert (await ask(client, texts[3]))[0] == "miss"  # no room: one must go
        assert gw.cache.bytes <= gw.cache.max_bytes and len(gw.cache) == 3
        assert gw.cache.evictions == 1
        assert (await ask(client, texts[1]))[0] == "hit"
        assert (await ask(client, texts[0]))[0] == "miss"  # the unread oldest went
        assert all(gw.calls(t) == 1 for t in texts[1:]) and gw.calls(texts[0]) == 2

    # Room for three answers of this size (each ~450 bytes with its overhead), not four.
    run(scenario, max_bytes=3 * (ENTRY_OVERHEAD + 420))


# --------------------------------------------------------------------------- streams


def test_a_stream_is_answered_from_a_non_streamed_miss(run: Callable[..., None]) -> None:
    text = unique("replay")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        label, completion = await ask(client, text)
        assert label == "miss"
        label, chunks = await ask_stream(client, text, stream_options={"include_usage": True})
        assert label == "hit" and gw.calls(text) == 1
        assert text_of(chunks) == text
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage == completion.usage
        label, plain = await ask_stream(client, text)
        assert label == "hit" and text_of(plain) == text
        assert all(c.usage is None for c in plain)  # no usage chunk unless asked

    run(scenario)


def test_a_completed_stream_fills_the_cache_for_both_kinds(
    run: Callable[..., None], db: Path
) -> None:
    text = unique("fill")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        label, chunks = await ask_stream(client, text)
        assert label == "miss" and text_of(chunks) == text
        label, completion = await ask(client, text)
        assert label == "hit" and completion.choices[0].message.content == text
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.total_tokens > 0
        label, again = await ask_stream(client, text)
        assert label == "hit" and text_of(again) == text
        assert gw.calls(text) == 1

    run(scenario)
    rows = [r for r in usage_rows(db) if r["model_alias"] == "gpt"]
    assert [r["cache_hit"] for r in rows] == [0, 1, 1]
    assert rows[1]["saved_usd"] == pytest.approx(rows[0]["cost_usd"])


def test_tool_calls_survive_the_cache_both_ways(run: Callable[..., None]) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": name,
                "parameters": {"type": "object", "properties": {}},
            },
        }
        for name in ("get_weather", "get_time")
    ]

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        # A non-streamed miss, replayed as a stream.
        text = unique("tools")
        label, completion = await ask(client, text, model="tools", tools=tools, max_tokens=50)
        assert label == "miss"
        calls = completion.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["get_weather", "get_time"]
        label, chunks = await ask_stream(client, text, model="tools", tools=tools, max_tokens=50)
        assert label == "hit"
        streamed = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
        assert [(t.id, t.function.name, t.function.arguments) for t in streamed] == [
            (c.id, c.function.name, c.function.arguments) for c in calls
        ]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        # A streamed miss (fragments merged), answered non-streamed.
        text = unique("tools-stream")
        label, chunks = await ask_stream(client, text, model="tools", tools=tools, max_tokens=50)
        assert label == "miss"
        label, completion = await ask(client, text, model="tools", tools=tools, max_tokens=50)
        assert label == "hit"
        message = completion.choices[0].message
        assert message.content == "Let me check both."
        assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
        arguments = json.loads(message.tool_calls[0].function.arguments)
        assert arguments == {"city": "Paris", "unit": "celsius"}

    run(scenario)


def test_a_stream_the_upstream_broke_is_never_cached(run: Callable[..., None]) -> None:
    text = unique("die")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        for _ in range(2):
            with pytest.raises(openai.APIError):  # the in-band error event
                await ask_stream(client, text, model="stream-die")
        assert len(gw.cache) == 0
        assert gw.calls(text) == 2

    run(scenario)


def test_an_aborted_stream_is_never_cached(run: Callable[..., None], db: Path) -> None:
    """The client goes away mid-stream (the raw client reports a disconnect
    once its body was sent): 499, nothing stored; the next one streams anew."""
    text = unique("abort")
    body = {"model": "stream-slow", "messages": user(text), "stream": True, "temperature": 0}
    auth = [("authorization", f"Bearer {KEY}")]

    async def scenario(gw: Gateway) -> None:
        reply = await call(gw.app, "POST", "/v1/chat/completions", headers=auth, json=body)
        assert reply.status == 200 and reply.header("x-gandalf-cache") == "miss"
        assert b"[DONE]" not in reply.body
        assert len(gw.cache) == 0
        gw.mock.release(text, 1000)  # let the next one run to its end
        reply = await call(
            gw.app, "POST", "/v1/chat/completions", headers=auth, json=body, stay=True
        )
        assert reply.header("x-gandalf-cache") == "miss" and b"[DONE]" in reply.body
        assert len(gw.cache) == 1  # the completed one was stored
        reply = await call(
            gw.app, "POST", "/v1/chat/completions", headers=auth, json=body, stay=True
        )
        assert reply.header("x-gandalf-cache") == "hit" and b"[DONE]" in reply.body

    run(scenario)
    statuses = [r["status"] for r in usage_rows(db) if r["model_alias"] == "stream-slow"]
    assert statuses == [499, 200, 200]


# --------------------------------------------------------------------------- errors


def test_errors_are_never_cached_and_say_miss(run: Callable[..., None]) -> None:
    text = unique("error")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        for _ in range(2):
            with pytest.raises(openai.APIStatusError) as failed:
                await ask(client, text, model="fails")
            assert failed.value.status_code == 502
            assert failed.value.response.headers["x-gandalf-cache"] == "miss"
            assert failed.value.response.json()["error"]["type"] == "upstream_error"
        with pytest.raises(openai.APIStatusError) as bypassed:
            await ask(client, text, model="fails", temperature=1)
        assert bypassed.value.response.headers["x-gandalf-cache"] == "bypass"
        with pytest.raises(openai.APIStatusError) as streamed:
            await ask_stream(client, text, model="fails")
        assert streamed.value.response.headers["x-gandalf-cache"] == "miss"
        assert len(gw.cache) == 0
        assert gw.calls(text) == 4

    run(scenario)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("temperature", [0, 1], ids=["miss", "bypass"])
def test_the_upstreams_rate_limits_reach_an_unlimited_caller_on_a_caching_route(
    run: Callable[..., None], stream: bool, temperature: int
) -> None:
    # The cache's label travels with the pipeline's headers; on its own it must
    # not drop the upstream's x-ratelimit-*, which only the gateway's replace.
    async def scenario(gw: Gateway) -> None:
        for key, limited in ((KEY, False), (LIMITED, True)):
            raw = await gw.client(key).chat.completions.with_raw_response.create(
                model="gpt-headers",
                messages=user(unique("relayed")),
                temperature=temperature,
                stream=stream,
            )
            if stream:
                parsed: Any = raw.parse()
                assert [chunk async for chunk in parsed]
            pairs = raw.headers.multi_items()
            limits = {n: v for n, v in pairs if n.startswith("x-ratelimit-")}
            assert len(limits) == len([n for n, _ in pairs if n.startswith("x-ratelimit-")])
            assert raw.headers["x-gandalf-cache"] == ("miss" if temperature == 0 else "bypass")
            assert raw.headers["x-upstream-request-id"] == "req_upstream_123"
            if limited:  # the gateway's own, in place of the upstream's
                assert limits["x-ratelimit-limit-requests"] == str(RPM)
                assert limits["x-ratelimit-limit-tokens"] == str(TPM)
            else:
                assert limits == {
                    "x-ratelimit-limit-requests": "10000",
                    "x-ratelimit-remaining-requests": "9999",
                    "x-ratelimit-reset-tokens": "6ms",
                }

    run(scenario)


def test_no_header_on_routes_that_do_not_cache(run: Callable[..., None]) -> None:
    text = unique("off")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        for _ in range(2):
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-off", messages=user(text), temperature=0
            )
            assert "x-gandalf-cache" not in raw.headers
        with pytest.raises(openai.APIStatusError) as failed:
            await ask(client, text, model="fails-off")
        assert "x-gandalf-cache" not in failed.value.response.headers
        with pytest.raises(openai.NotFoundError) as unknown:
            await ask(client, text, model="no-such-route")
        assert "x-gandalf-cache" not in unknown.value.response.headers
        assert gw.calls(text) == 3 and len(gw.cache) == 0

    run(scenario)


def test_without_the_cache_section_nothing_caches(run: Callable[..., None]) -> None:
    text = unique("absent")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        for _ in range(2):
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt", messages=user(text), temperature=0
            )
            assert "x-gandalf-cache" not in raw.headers
        assert gw.calls(text) == 2 and len(gw.cache) == 0

    run(scenario, section=False)


# --------------------------------------------------------------------------- coalescing, limits


def test_embeddings_are_cached_too(run: Callable[..., None], db: Path) -> None:
    text = unique("embed")

    def upstream_calls(gw: Gateway) -> int:
        return sum(
            1
            for r in gw.mock.received
            if r.path.endswith("/embeddings") and r.json().get("input") == text
        )

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        create = client.embeddings.with_raw_response.create
        labels, vectors = [], []
        for user_id in ("a", "b"):  # ``user`` is not in the key
            raw = await create(model="embed", input=text, dimensions=4, user=user_id)
            labels.append(raw.headers.get("x-gandalf-cache"))
            vectors.append(raw.parse().data[0].embedding)
        assert labels == ["miss", "hit"] and vectors[0] == vectors[1]
        other = await create(model="embed", input=text, dimensions=8)  # another request
        assert other.headers["x-gandalf-cache"] == "miss"
        assert upstream_calls(gw) == 2
        no_store = {"cache-control": "no-store"}
        raw = await create(model="embed", input=text + "!", extra_headers=no_store)
        assert raw.headers["x-gandalf-cache"] == "miss" and len(gw.cache) == 2
        off = await create(model="embed-off", input=text, dimensions=4)
        assert "x-gandalf-cache" not in off.headers
        assert upstream_calls(gw) == 3

    run(scenario)
    rows = [r for r in usage_rows(db) if r["model_alias"] == "embed"]
    assert [(r["endpoint"], r["cache_hit"], r["attempts"]) for r in rows[:2]] == [
        ("embeddings", 0, 1),
        ("embeddings", 1, 0),
    ]


def test_concurrent_identical_misses_share_one_upstream_call(run: Callable[..., None]) -> None:
    text = unique("together")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        first = asyncio.create_task(ask(client, text, model="gpt-gate"))
        second = asyncio.create_task(ask(client, text, model="gpt-gate"))
        for _ in range(1000):  # bounded: until the one call is parked at the gate
            if gw.mock.waiting:
                break
            await asyncio.sleep(0.005)
        assert gw.mock.waiting == 1
        gw.mock.open_gate()
        (label_1, one), (label_2, two) = await asyncio.gather(first, second)
        assert (label_1, label_2) == ("miss", "miss")
        assert one.choices[0].message.content == two.choices[0].message.content
        assert gw.calls(text) == 1
        assert (await ask(client, text, model="gpt-gate"))[0] == "hit"
        assert gw.calls(text) == 1

    run(scenario)


def test_a_hit_counts_for_rpm_but_not_tpm(run: Callable[..., None], db: Path) -> None:
    text = unique("limits") + " " + "x" * 4000  # ~1,000 completion tokens an answer

    async def scenario(gw: Gateway) -> None:
        client = gw.client(LIMITED)
        headers = []
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt", messages=user(text), temperature=0
            )
            headers.append(raw.headers)
        assert [h["x-gandalf-cache"] for h in headers] == ["miss", "hit", "hit"]
        requests = [int(h["x-ratelimit-remaining-requests"]) for h in headers]
        tokens = [int(h["x-ratelimit-remaining-tokens"]) for h in headers]
        assert requests == [RPM - 1, RPM - 2, RPM - 3]  # every hit takes a request
        # The miss's answer (~2,000 tokens) was charged; the first hit's was
        # not: its reservation came back whole (refill only adds).
        assert tokens[1] < tokens[0] - 1000
        assert tokens[2] >= tokens[1]

    run(scenario)
    rows = [r for r in usage_rows(db) if r["model_alias"] == "gpt"]
    assert [r["cache_hit"] for r in rows] == [0, 1, 1]
    assert [r["cost_usd"] for r in rows[1:]] == [0.0, 0.0]


def test_a_new_app_starts_with_an_empty_cache(
    upstream_mock: MockUpstream, anthropic_mock: MockAnthropic, db: Path
) -> None:
    """A config reload replaces the workers: each new worker app builds its own
    in-process cache from ``config.cache``, empty. The same holds here for two
    apps built from one config (no cache injected)."""
    text = unique("reload")
    config = _config(upstream_mock, anthropic_mock, db, CacheConfig())

    async def once() -> list[str | None]:
        app = create_app(config, access_log=False)
        await app.startup()
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gandalf"
            ) as http:
                client = openai.AsyncOpenAI(
                    base_url="http://gandalf/v1", api_key=KEY, http_client=http, max_retries=0
                )
                return [(await ask(client, text))[0] for _ in range(2)]
        finally:
            await app.shutdown()

    assert asyncio.run(once()) == ["miss", "hit"]
    assert asyncio.run(once()) == ["miss", "hit"]


def test_purge_empties_the_cache(run: Callable[..., None]) -> None:
    text = unique("purge")

    async def scenario(gw: Gateway) -> None:
        client = gw.client()
        assert (await ask(client, text))[0] == "miss"
        assert (await ask(client, text))[0] == "hit"
        assert await gw.cache.purge() == 1
        assert (await ask(client, text))[0] == "miss"
        assert gw.calls(text) == 2

    run(scenario)
