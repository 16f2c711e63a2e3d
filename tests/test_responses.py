"""The Responses API in process (app/responses.py, server/responses.py): the
pipeline it shares with chat (limits, failover, usage, the cache's bypass),
the in-band stream error, the store (per key, retention) and its config."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the SDKs here are built on httpx2 (an httpx fork)
import openai
import pytest

from gandalf.app.proxy import ProxyService
from gandalf.app.responses import ResponsesService
from gandalf.app.responses_wire import decode_request
from gandalf.app.router import RouteTable
from gandalf.config import CacheConfig, DatabaseConfig, GandalfConfig, KeyEntry, parse_config
from gandalf.domain import (
    ApiKey,
    Budget,
    Identity,
    ModelPrice,
    ProviderConfig,
    Resilience,
    Route,
    StoredResponse,
    Target,
)
from gandalf.errors import ConfigError, StoreUnavailable
from gandalf.server.rsgi import RSGIApp
from gandalf.storage.sqlite import SqliteStore
from gandalf.wiring import create_app
from tests.mock_anthropic import MockAnthropic
from tests.rsgi_client import rsgi_call
from tests.upstream import MockUpstream

KEY = "gnd_" + "r" * 40
LIMITED = "gnd_" + "s" * 40  # rpm 1
BUDGETED = "gnd_" + "t" * 40  # a budget of $0.001 at $1000 per million tokens


def _route(alias: str, *targets: tuple[str, str], **policy: Any) -> Route:
    return Route(
        model_alias=alias,
        targets=tuple(
            Target(provider=p, model=m, priority=i + 1) for i, (p, m) in enumerate(targets)
        ),
        **policy,
    )


def _config(mock: MockUpstream, claude: MockAnthropic, db: Path | str) -> GandalfConfig:
    return GandalfConfig(
        database=DatabaseConfig(dsn=str(db)),
        providers=(
            ProviderConfig(name="up", type="openai", base_url=mock.base_url, api_key="sk-up"),
            ProviderConfig(
                name="claude",
                type="anthropic",
                base_url=claude.base_url,
                api_key="sk-ant",
                max_tokens=1000,
            ),
            ProviderConfig(name="fake", type="fake"),
        ),
        routes=(
            _route("up", ("up", "echo-model")),
            _route("cached", ("up", "echo-model"), cache=True),
            _route("falls-over", ("up", "status-500"), ("fake", "fake-model")),
            _route("claude-breaks", ("claude", "claude-stream-error"), max_attempts=1),
            _route("fake-model", ("fake", "fake-model")),
        ),
        keys=(
            KeyEntry(name="app", key=KEY, role="member"),
            KeyEntry(name="limited", key=LIMITED, role="member", rpm=1),
            KeyEntry(name="budgeted", key=BUDGETED, role="member", budget=Budget(usd=0.001)),
        ),
        pricing=(ModelPrice(provider="up", model="echo-model", input=1000.0, output=1000.0),),
        resilience=Resilience(max_attempts=2, backoff_base=0.001, backoff_cap=0.01),
        cache=CacheConfig(max_entries=100, max_bytes=1 << 20, ttl=60.0),
    )


Scenario = Callable[[httpx.AsyncClient], Awaitable[None]]


def _runner(
    upstream: MockUpstream, anthropic_mock: MockAnthropic, db: Path | str
) -> Callable[[Scenario], None]:
    def runner(scenario: Scenario) -> None:
        async def main() -> None:
            app = create_app(_config(upstream, anthropic_mock, db), access_log=False)
            await app.startup()
            try:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://gandalf") as h:
                    await scenario(h)
            finally:
                await app.shutdown()

        asyncio.run(main())

    return runner


@pytest.fixture
def run(
    upstream: MockUpstream, anthropic_mock: MockAnthropic, tmp_path: Path
) -> Callable[[Scenario], Path]:
    """``run(scenario)``: the app in process, the scenario against it through
    an httpx client; returns the database (usage flushed)."""
    db = tmp_path / "gandalf.db"
    runner = _runner(upstream, anthropic_mock, db)

    def run_and_return(scenario: Scenario) -> Path:
        runner(scenario)
        return db

    return run_and_return


@pytest.fixture
def run_each(
    upstream: MockUpstream, anthropic_mock: MockAnthropic, store_dsn: str
) -> Callable[[Scenario], None]:
    """``run`` on each store in turn (store_dsn: SQLite, then PostgreSQL)."""
    return _runner(upstream, anthropic_mock, store_dsn)


def sdk(http: httpx.AsyncClient, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://gandalf/v1", api_key=key, http_client=http, max_retries=0
    )


def rows(db: Path, alias: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT endpoint, provider, attempts, status, cost_usd FROM usage_records "
            "WHERE model_alias = ? ORDER BY id",
            (alias,),
        ).fetchall()


# --------------------------------------------------------------------------- the pipeline


def test_rate_limits_apply_as_for_chat(run: Callable[[Scenario], Path]) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        client = sdk(http, LIMITED)
        raw = await client.responses.with_raw_response.create(model="up", input="one")
        assert raw.headers["x-ratelimit-limit-requests"] == "1"
        with pytest.raises(openai.RateLimitError) as caught:
            await client.responses.create(model="up", input="two")
        assert caught.value.code == "rate_limit_exceeded"

    db = run(scenario)
    assert [r[3] for r in rows(db, "up")] == [200, 429]


def test_budgets_reserve_from_max_output_tokens(run: Callable[[Scenario], Path]) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        client = sdk(http, BUDGETED)
        # 1,000,000 output tokens at $1000 per million: over the $0.001 budget.
        with pytest.raises(openai.RateLimitError) as caught:
            await client.responses.create(model="up", input="hi", max_output_tokens=1_000_000)
        assert caught.value.code == "insufficient_quota"

    run(scenario)


def test_cost_is_recorded(run: Callable[[Scenario], Path]) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        await sdk(http).responses.create(model="up", input="price me", store=False)

    db = run(scenario)
    (endpoint, provider, attempts, status, cost), *_ = rows(db, "up")
    assert (endpoint, provider, attempts, status) == ("responses", "up", 1, 200)
    assert cost is not None and cost > 0


def test_failover_moves_to_the_next_target_even_across_relay_and_translation(
    run: Callable[[Scenario], Path],
) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        raw = await sdk(http).responses.with_raw_response.create(
            model="falls-over", input="rescue me", store=False
        )
        assert raw.headers["x-gandalf-provider"] == "fake"
        assert raw.headers["x-gandalf-attempts"] == "2"
        assert "rescue me" in raw.parse().output_text

    db = run(scenario)
    assert rows(db, "falls-over") == [("responses", "fake", 2, 200, None)]


def test_a_caching_route_bypasses_the_cache(run: Callable[[Scenario], Path]) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        client = sdk(http)
        for _ in range(2):
            raw = await client.responses.with_raw_response.create(
                model="cached", input="same", temperature=0, store=False
            )
            assert raw.headers["x-gandalf-cache"] == "bypass"

    db = run(scenario)
    assert [r[2] for r in rows(db, "cached")] == [1, 1]  # both went upstream


def test_a_stream_that_fails_midway_ends_with_an_error_event(
    run: Callable[[Scenario], Path],
) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        kinds: list[str] = []
        async with sdk(http).responses.stream(model="claude-breaks", input="break") as stream:
            async for event in stream:
                kinds.append(event.type)
            with pytest.raises(RuntimeError):
                await stream.get_final_response()  # no response.completed came
        assert kinds[0] == "response.created" and kinds[-1] == "error"
        assert "response.completed" not in kinds

    db = run(scenario)
    assert rows(db, "claude-breaks")[0][3] >= 500


def test_a_failed_stream_is_not_stored(run: Callable[[Scenario], Path]) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        ids: list[str] = []
        async with sdk(http).responses.stream(model="claude-breaks", input="break") as stream:
            async for event in stream:
                if event.type == "response.created":
                    ids.append(event.response.id)
        with pytest.raises(openai.NotFoundError):
            await sdk(http).responses.retrieve(ids[0])

    run(scenario)


def test_a_completed_stream_is_stored(run_each: Callable[[Scenario], None]) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        client = sdk(http)
        async with client.responses.stream(model="up", input="keep this") as stream:
            final = await stream.get_final_response()
        got = await client.responses.retrieve(final.id)
        assert got.output_text == final.output_text and "keep this" in got.output_text

    run_each(scenario)


def test_a_stored_response_continues_then_is_deleted_on_each_store(
    run_each: Callable[[Scenario], None], upstream: MockUpstream
) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        client = sdk(http)
        first = await client.responses.create(model="up", input="My name is Gandalf.")
        second = await client.responses.create(
            model="up", input="What is my name?", previous_response_id=first.id
        )
        sent = upstream.received[-1].json()
        assert "previous_response_id" not in sent and "My name is Gandalf." in json.dumps(sent)
        assert (await client.responses.retrieve(second.id)).output_text == second.output_text
        with pytest.raises(openai.NotFoundError):  # another key's: as if missing
            await sdk(http, LIMITED).responses.retrieve(second.id)
        await client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(first.id)

    run_each(scenario)


def test_the_model_must_be_allowed(run: Callable[[Scenario], Path]) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk(http).responses.create(model="no-such-model", input="hi")
        assert caught.value.code == "model_not_found"

    run(scenario)


# --------------------------------------------------------------------------- the store


def _stored(response_id: str, key_id: str, expires_at: float | None) -> StoredResponse:
    return StoredResponse(
        id=response_id,
        key_id=key_id,
        created_at=0.0,
        expires_at=expires_at,
        input=b"[]",
        response=b'{"id":"' + response_id.encode() + b'","output":[]}',
    )


def test_the_store_keeps_responses_per_key_until_they_expire() -> None:
    now = [1000.0]

    async def main() -> None:
        store = SqliteStore(":memory:", clock=lambda: now[0])
        await store.open()
        try:
            await store.save_response(_stored("resp_a", "key1", 1100.0))
            await store.save_response(_stored("resp_b", "key1", None))
            await store.save_response(_stored("resp_b", "key2", None))  # same id, another key
            await store.delete_response("resp_b", "key2")
            assert (await store.get_response("resp_a", "key1")) is not None
            assert await store.get_response("resp_a", "key2") is None
            assert not await store.delete_response("resp_a", "key2")
            now[0] = 1100.0  # resp_a expired
            assert await store.get_response("resp_a", "key1") is None
            assert await store.get_response("resp_b", "key1") is not None
            await store.save_response(_stored("resp_c", "key1", 2000.0))  # prunes resp_a
            left = await store._fetchall("SELECT id FROM responses ORDER BY id", ())
            assert [r[0] for r in left] == ["resp_b", "resp_c"]
            assert await store.delete_response("resp_b", "key1")
            assert await store.get_response("resp_b", "key1") is None
        finally:
            await store.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- config


def _parse(text: str) -> GandalfConfig:
    return parse_config(text, source="gandalf.yaml", env={})


def test_responses_retention_takes_durations() -> None:
    assert _parse("{}").responses.retention == 30 * 86400.0
    assert _parse("responses: { retention: 7d }").responses.retention == 7 * 86400.0
    assert _parse("responses: { retention: forever }").responses.retention == 0.0
    with pytest.raises(ConfigError, match=r"responses\.retention"):
        _parse("responses: { retention: soon }")
    with pytest.raises(ConfigError, match="responses"):
        _parse("responses: { keep: 1d }")


def test_only_openai_providers_relay_the_responses_api() -> None:
    config = _parse(
        "providers:\n"
        "  - { name: a, type: openai, api_key: k }\n"
        "  - { name: b, type: openai, api_key: k, responses: false }\n"
    )
    assert [p.responses for p in config.providers] == [None, False]
    with pytest.raises(ConfigError, match=r"providers\[0\]\.responses"):
        _parse("providers:\n  - { name: c, type: anthropic, api_key: k, responses: true }\n")


class _BrokenStore:
    """A store whose database does not answer."""

    async def save_response(self, stored: StoredResponse) -> None:
        raise OSError("disk gone")

    async def get_response(self, response_id: str, key_id: str) -> StoredResponse | None:
        raise OSError("disk gone")

    async def delete_response(self, response_id: str, key_id: str) -> bool:
        raise OSError("disk gone")


def test_a_store_that_does_not_answer_is_a_503_and_never_loses_an_answer() -> None:

    identity = _identity()
    service = ResponsesService(ProxyService(RouteTable({}), _Sink()), _BrokenStore())
    job_body = b'{"model":"m","input":"hi","previous_response_id":"resp_1"}'

    async def main() -> None:
        with pytest.raises(StoreUnavailable):
            await service.retrieve(identity, "resp_1")
        with pytest.raises(StoreUnavailable):
            await service.delete(identity, "resp_1")
        with pytest.raises(StoreUnavailable):
            await service._job(identity, decode_request(job_body), job_body, "req")

    asyncio.run(main())


class _Sink:
    def record_usage(self, record: Any) -> None:
        return None


def _identity() -> Identity:
    return Identity.from_key(ApiKey(id="k1", name="k", key_hash="h", prefix="gnd_xxxx"))


def test_the_rsgi_interface_serves_it_too(
    upstream: MockUpstream, anthropic_mock: MockAnthropic, tmp_path: Path
) -> None:
    auth = ("authorization", f"Bearer {KEY}")

    async def main() -> None:
        app = create_app(_config(upstream, anthropic_mock, tmp_path / "g.db"), access_log=False)
        await app.startup()
        try:
            rsgi = RSGIApp(app)
            body = {"model": "falls-over", "input": "over rsgi", "stream": True}
            streamed = await rsgi_call(rsgi, "POST", "/v1/responses", headers=[auth], json=body)
            assert streamed.status == 200
            assert (streamed.header("content-type") or "").startswith("text/event-stream")
            last = streamed.body.rstrip().split(b"\n")[-1]
            assert last.startswith(b"data: ")
            done = json.loads(last[6:])
            assert done["type"] == "response.completed"
            path = "/v1/responses/" + done["response"]["id"]
            got = await rsgi_call(rsgi, "GET", path, headers=[auth])
            assert got.status == 200 and got.json()["id"] == done["response"]["id"]
            gone = await rsgi_call(rsgi, "DELETE", path, headers=[auth])
            assert gone.json() == {
                "id": done["response"]["id"],
                "object": "response",
                "deleted": True,
            }
            assert (await rsgi_call(rsgi, "GET", path, headers=[auth])).status == 404
        finally:
            await app.shutdown()

    asyncio.run(main())


class _OneStore:
    """A store holding one response, whatever its JSON."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    async def save_response(self, stored: StoredResponse) -> None:
        return None

    async def get_response(self, response_id: str, key_id: str) -> StoredResponse | None:
        return StoredResponse(
            id=response_id,
            key_id=key_id,
            created_at=0.0,
            expires_at=None,
            input=b'[{"role":"user","content":"first"}]',
            response=self.response,
        )

    async def delete_response(self, response_id: str, key_id: str) -> bool:
        return True


@pytest.mark.parametrize(
    ("stored", "history"),
    [
        (
            b'{"id":"r","output":[1,{"type":"message","id":"m","role":"assistant","content":"a"}]}',
            [1, {"type": "message", "role": "assistant", "content": "a"}],
        ),
        (b'{"id":"r","output":null}', []),
        (b'{"id":"r","output":"odd"}', []),
        (
            b'{"id":"r","output":[{"type":"reasoning","id":"rs_1"}]}',
            [{"type": "reasoning", "id": "rs_1"}],
        ),
    ],
)
def test_a_stored_upstream_answer_of_any_shape_continues(stored: bytes, history: list[Any]) -> None:
    service = ResponsesService(ProxyService(RouteTable({}), _Sink()), _OneStore(stored))
    body = b'{"model":"m","input":"next","previous_response_id":"r"}'

    async def main() -> None:
        job = await service._job(_identity(), decode_request(body), body, "req")
        sent = json.loads(job.relay_body)
        assert "previous_response_id" not in sent
        assert sent["input"] == [
            {"role": "user", "content": "first"},
            *history,
            {"role": "user", "content": "next"},
        ]

    asyncio.run(main())


# --------------------------------------------------------------------------- hostile input


def _post(http: httpx.AsyncClient, body: dict[str, Any]) -> Awaitable[httpx.Response]:
    return http.post("/v1/responses", json=body, headers={"authorization": f"Bearer {KEY}"})


def test_a_function_call_output_without_its_call_is_a_400_on_a_translated_target(
    run: Callable[[Scenario], Path],
) -> None:
    """Found by hand: an orphan function_call_output went to a chat target as a
    tool message with no tool call before it (the fake answered 200 with an empty
    output; Anthropic and most servers answer 400 without saying which item)."""

    async def scenario(http: httpx.AsyncClient) -> None:
        orphan = {"type": "function_call_output", "call_id": "call_9", "output": "42"}
        reply = await _post(http, {"model": "fake-model", "input": [orphan]})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == "input[0].call_id"
        assert "call_9" in error["message"]
        call = {"type": "function_call", "call_id": "call_9", "name": "f", "arguments": "{}"}
        reply = await _post(http, {"model": "fake-model", "input": [call, orphan]})
        assert reply.status_code == 200, reply.text

    run(scenario)


def test_metadata_follows_openais_limits(run: Callable[[Scenario], Path]) -> None:
    """Found by hand: 1,000 metadata pairs were accepted and stored with the
    response. OpenAI's limits: 16 pairs, keys up to 64 characters, values up
    to 512."""

    async def scenario(http: httpx.AsyncClient) -> None:
        for metadata in (
            {str(i): "v" for i in range(17)},
            {"k" * 65: "v"},
            {"k": "v" * 513},
        ):
            reply = await _post(http, {"model": "fake-model", "input": "hi", "metadata": metadata})
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"]["param"] == "metadata"
        fine = {str(i): "v" * 512 for i in range(16)}
        reply = await _post(http, {"model": "fake-model", "input": "hi", "metadata": fine})
        assert reply.status_code == 200, reply.text
        assert reply.json()["metadata"] == fine

    run(scenario)


def test_a_long_unknown_id_is_not_echoed_whole(run: Callable[[Scenario], Path]) -> None:
    """Found by hand: a 100,000-character previous_response_id came back whole
    in the 404's message (and a path's id likewise)."""

    async def scenario(http: httpx.AsyncClient) -> None:
        long_id = "resp_" + "x" * 100_000
        reply = await _post(
            http, {"model": "fake-model", "input": "hi", "previous_response_id": long_id}
        )
        assert reply.status_code == 404
        assert len(reply.json()["error"]["message"]) < 300
        headers = {"authorization": f"Bearer {KEY}"}
        reply = await http.get("/v1/responses/" + "y" * 5000, headers=headers)
        assert reply.status_code == 404
        assert len(reply.json()["error"]["message"]) < 300

    run(scenario)
