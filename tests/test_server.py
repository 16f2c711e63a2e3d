"""The ASGI app driven directly (no server): dispatch, errors, auth, lifespan."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gandalf.app.proxy import ProxyService
from gandalf.app.router import RouteTable
from gandalf.auth.apikey import KeyCache, generate_key, hash_key
from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import (
    ApiKey,
    ChatCall,
    ChatStream,
    EmbeddingsCall,
    ProviderConfig,
    ProviderReply,
    Route,
    Target,
    UsageRecord,
)
from gandalf.server.asgi import GandalfApp, Runtime
from gandalf.server.handlers import Api
from gandalf.storage.sqlite import SqliteStore
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call

ADMIN = generate_key()
MEMBER = generate_key()
VIEWER = generate_key()
LIMITED = generate_key()
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hello there"}]}


def make_config(db: str, **server: Any) -> GandalfConfig:
    return GandalfConfig(
        server=ServerConfig(**server),
        database=DatabaseConfig(dsn=db),
        providers=(
            ProviderConfig(name="fake", type="fake"),
            ProviderConfig(
                name="openai",
                type="openai",
                base_url="http://127.0.0.1:9/v1",
                enabled=False,
                disabled_reason="set OPENAI_API_KEY",
            ),
        ),
        routes=(
            Route(model_alias="fake-model", targets=(Target(provider="fake", model="fake-1"),)),
            Route(model_alias="other", targets=(Target(provider="fake", model="fake-2"),)),
            Route(model_alias="gpt-4o", targets=(Target(provider="openai", model="gpt-4o"),)),
        ),
        keys=(
            KeyEntry(name="admin", key=ADMIN, role="admin"),
            KeyEntry(name="member", key=MEMBER, role="member"),
            KeyEntry(name="viewer", key=VIEWER, role="viewer"),
            KeyEntry(name="limited", key=LIMITED, role="member", allowed_models=("other",)),
        ),
    )


def with_app(
    scenario: Callable[[GandalfApp], Awaitable[None]], db: str = ":memory:", **server: Any
) -> None:
    async def main() -> None:
        app = create_app(make_config(db, **server), access_log=False)
        await app.startup()
        try:
            await scenario(app)
        finally:
            await app.shutdown()

    asyncio.run(main())


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}"), ("content-type", "application/json")]


def assert_error(reply: Reply, status: int, type_: str, code: str | None = None) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.header("content-type") == "application/json"
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in error["message"]
    return error


def test_healthz_and_request_ids() -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await call(app, "GET", "/healthz")
        assert reply.status == 200 and reply.json() == {"status": "ok"}
        assert uuid.UUID(reply.header("x-request-id") or "").version == 7
        reply = await call(app, "GET", "/healthz", headers=[("x-request-id", "abc-123.x")])
        assert reply.header("x-request-id") == "abc-123.x"
        reply = await call(app, "GET", "/healthz", headers=[("x-request-id", "bad id\x01<>")])
        assert uuid.UUID(reply.header("x-request-id") or "").version == 7
        reply = await call(app, "GET", "/healthz", headers=[("x-request-id", "x" * 500)])
        assert reply.header("x-request-id") != "x" * 500
        assert (await call(app, "GET", "/readyz")).status == 200

    with_app(scenario)


def test_unknown_path_and_wrong_method() -> None:
    async def scenario(app: GandalfApp) -> None:
        assert_error(await call(app, "GET", "/nope"), 404, "invalid_request_error")
        reply = await call(app, "GET", "/v1/chat/completions")
        assert_error(reply, 405, "invalid_request_error")
        assert reply.header("allow") == "POST"
        assert reply.header("x-request-id")

    with_app(scenario)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("authorization", "Bearer nope")],
        [("authorization", f"Bearer {generate_key()}")],
        [("x-api-key", "sk-123")],
        [("authorization", f"Basic {ADMIN}")],
    ],
)
def test_bad_credentials_get_401(headers: list[tuple[str, str]]) -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await call(app, "POST", "/v1/chat/completions", headers=headers, json=CHAT)
        assert_error(reply, 401, "invalid_request_error", "invalid_api_key")

    with_app(scenario)


def test_chat_with_the_fake_provider_bearer_and_x_api_key() -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await call(app, "POST", "/v1/chat/completions", headers=bearer(MEMBER), json=CHAT)
        assert reply.status == 200, reply.body
        data = reply.json()
        assert data["object"] == "chat.completion"
        assert data["model"] == "fake-1"
        assert data["choices"][0]["message"] == {
            "role": "assistant",
            "content": "Hello there",
            "refusal": None,
        }
        assert data["usage"]["total_tokens"] == (
            data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
        )
        reply = await call(
            app, "POST", "/v1/chat/completions", headers=[("x-api-key", ADMIN)], json=CHAT
        )
        assert reply.status == 200

    with_app(scenario)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1,2]", None),
        (orjson.dumps({"messages": []}), "model"),
        (orjson.dumps({"model": "fake-model"}), "messages"),
        (orjson.dumps({"model": 42, "messages": []}), "model"),
        (orjson.dumps({"model": "fake-model", "messages": "hi"}), "messages"),
        (orjson.dumps({"model": "fake-model", "messages": [{"content": "x"}]}), "messages[0].role"),
        (orjson.dumps({"model": "fake-model", "messages": []}), "messages"),
        (
            orjson.dumps({"model": "fake-model", "messages": [{"role": "user"}], "stream": "yes"}),
            "stream",
        ),
    ],
)
def test_invalid_bodies_get_400_naming_the_field(body: bytes, param: str | None) -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await call(app, "POST", "/v1/chat/completions", headers=bearer(MEMBER), body=body)
        error = assert_error(reply, 400, "invalid_request_error")
        assert error["param"] == param, error
        if param:
            assert param in error["message"]

    with_app(scenario)


def test_stream_with_the_fake_provider() -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=bearer(MEMBER),
            json={**CHAT, "stream": True},
        )
        assert reply.status == 200
        assert reply.header("content-type") == "text/event-stream"
        assert reply.header("cache-control") == "no-cache"
        assert reply.header("x-accel-buffering") == "no"
        assert reply.header("x-request-id")
        assert reply.header("content-length") is None
        events = [e for e in reply.body.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        chunks = [orjson.loads(e[6:]) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == "Hello there"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert all("usage" not in c for c in chunks)  # not asked for: not sent
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=bearer(MEMBER),
            json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        )
        events = [e for e in reply.body.split(b"\n\n") if e]
        usage_event = orjson.loads(events[-2][6:])
        assert usage_event["choices"] == [] and usage_event["usage"]["total_tokens"] > 0

    with_app(scenario)


def test_body_limit_413_by_header_and_by_chunks() -> None:
    async def scenario(app: GandalfApp) -> None:
        big = b"x" * 2048
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=[*bearer(MEMBER), ("content-length", str(len(big)))],
            body=big,
        )
        assert_error(reply, 413, "invalid_request_error")
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=bearer(MEMBER),
            chunks=[b"x" * 600, b"x" * 600],
        )
        assert_error(reply, 413, "invalid_request_error")
        # chunked but under the limit is reassembled
        raw = orjson.dumps(CHAT)
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=bearer(MEMBER),
            chunks=[raw[:10], raw[10:20], raw[20:]],
        )
        assert reply.status == 200

    with_app(scenario, max_body_bytes=1024)


def test_model_errors_and_permissions() -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=bearer(MEMBER),
            json={**CHAT, "model": "no-such-model"},
        )
        error = assert_error(reply, 404, "invalid_request_error", "model_not_found")
        assert error["param"] == "model"
        reply = await call(app, "POST", "/v1/chat/completions", headers=bearer(VIEWER), json=CHAT)
        assert_error(reply, 403, "permission_denied", "permission_denied")
        reply = await call(app, "POST", "/v1/chat/completions", headers=bearer(LIMITED), json=CHAT)
        assert_error(reply, 403, "permission_denied")
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=bearer(LIMITED),
            json={**CHAT, "model": "other"},
        )
        assert reply.status == 200
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=bearer(MEMBER),
            json={**CHAT, "model": "gpt-4o"},
        )
        error = assert_error(reply, 503, "provider_unavailable", "provider_unavailable")
        assert "OPENAI_API_KEY" in error["message"]

    with_app(scenario)


def test_usage_records_reach_the_database(tmp_path: Path) -> None:
    db = str(tmp_path / "g.db")

    async def scenario(app: GandalfApp) -> None:
        for _ in range(5):
            reply = await call(
                app,
                "POST",
                "/v1/chat/completions",
                headers=bearer(MEMBER),
                json=CHAT,
            )
            assert reply.status == 200
        await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=bearer(MEMBER),
            json={**CHAT, "model": "nope"},
        )

    with_app(scenario, db=db)

    async def read() -> list[UsageRecord]:
        store = SqliteStore(db)
        await store.open()
        try:
            return await store.list_usage()
        finally:
            await store.close()

    records = asyncio.run(read())
    assert len(records) == 6
    ok = [r for r in records if r.status == 200]
    assert len(ok) == 5
    assert all(
        r.model_alias == "fake-model" and r.provider == "fake" and r.target_model == "fake-1"
        for r in ok
    )
    assert all(r.total_tokens > 0 and r.latency_ms >= 0 and r.request_id for r in ok)
    assert [r.status for r in records if r.status != 200] == [404]


# ---------------------------------------------------------------------------- seams


class _Exploding:
    name = "boom"
    config = ProviderConfig(name="boom", type="fake")

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def chat(self, call: ChatCall) -> ProviderReply:
        raise RuntimeError("secret internals: sk-live-123")

    async def stream(self, call: ChatCall) -> ChatStream:
        raise RuntimeError("secret internals: sk-live-123")

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply:
        raise RuntimeError("secret internals: sk-live-123")


class _Sink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record_usage(self, record: UsageRecord) -> None:
        self.records.append(record)


class _Keys:
    def __init__(self, key: str) -> None:
        self.key = ApiKey(id="k", name="k", key_hash=hash_key(key), prefix=key[:8])

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        return self.key if key_hash == self.key.key_hash else None


class _Ready:
    def __init__(self, ok: bool) -> None:
        self.ok = ok

    async def ping(self) -> bool:
        return self.ok


def seam_app(ready: bool = True) -> tuple[GandalfApp, _Sink]:
    sink = _Sink()
    table = RouteTable.build(
        [Route(model_alias="boom", targets=(Target(provider="boom", model="b"),))],
        {"boom": _Exploding()},
        {},
    )
    api = Api(ProxyService(table, sink), KeyCache(_Keys(MEMBER)), _Ready(ready))

    async def build() -> Runtime:
        async def close() -> None: ...

        return Runtime(api.endpoints(), close)

    return GandalfApp(build, access_log=False), sink


def test_a_bug_becomes_a_500_without_internals_on_the_wire() -> None:
    app, sink = seam_app()

    async def scenario() -> None:
        await app.startup()
        reply = await call(
            app,
            "POST",
            "/v1/chat/completions",
            headers=bearer(MEMBER),
            json={**CHAT, "model": "boom"},
        )
        assert_error(reply, 500, "internal_error", "internal_error")
        assert "sk-live" not in reply.body.decode() and "RuntimeError" not in reply.body.decode()

    asyncio.run(scenario())
    assert [r.status for r in sink.records] == [500]


def test_readyz_503_when_storage_does_not_answer() -> None:
    app, _ = seam_app(ready=False)

    async def scenario() -> None:
        await app.startup()
        assert_error(await call(app, "GET", "/readyz"), 503, "service_unavailable")
        assert (await call(app, "GET", "/healthz")).status == 200

    asyncio.run(scenario())


def test_requests_before_startup_get_503() -> None:
    app, _ = seam_app()
    reply = asyncio.run(call(app, "GET", "/healthz"))
    assert reply.status == 503


def test_lifespan_reports_startup_failure(tmp_path: Path) -> None:
    config = make_config(str(tmp_path / "missing-dir" / "x.db"))
    app = create_app(config)
    sent: list[dict[str, Any]] = []

    async def scenario() -> None:
        messages = [{"type": "lifespan.startup"}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: Any) -> None:
            sent.append(message)

        with pytest.raises(Exception):  # noqa: B017 - any start-up error must propagate
            await app({"type": "lifespan"}, receive, send)

    asyncio.run(scenario())
    assert sent and sent[0]["type"] == "lifespan.startup.failed"
    assert sent[0]["message"]


def test_lifespan_startup_and_shutdown_messages() -> None:
    app = create_app(make_config(":memory:"), access_log=False)
    sent: list[str] = []

    async def scenario() -> None:
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: Any) -> None:
            sent.append(message["type"])

        await app({"type": "lifespan"}, receive, send)

    asyncio.run(scenario())
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_a_finished_stream_leaves_nothing_reachable_from_the_receive_future() -> None:
    """granian's receive future may keep its done-callbacks after a cancel, in
    native memory the cycle collector cannot see: after a stream, nothing the
    future still references may lead back to the request (a leak per stream)."""
    import gc
    import weakref

    held: list[asyncio.Future[Any]] = []  # stands for granian's native side

    class Sticky(asyncio.Future[Any]):
        """A future whose cancel() neither resolves it nor drops its callbacks."""

        def cancel(self, msg: Any = None) -> bool:
            return False

    class Protocol:
        """One request's receive side, like granian's ASGIHTTPProtocol."""

        def __init__(self, body: bytes) -> None:
            self.body: bytes | None = body

        def receive(self) -> asyncio.Future[dict[str, Any]]:
            future: asyncio.Future[dict[str, Any]] = Sticky()
            if self.body is not None:
                body, self.body = self.body, None
                future.set_result({"type": "http.request", "body": body, "more_body": False})
            else:
                held.append(future)  # never resolved: its callbacks stay attached
            return future

    async def scenario(app: GandalfApp) -> weakref.ref[Protocol]:
        protocol = Protocol(orjson.dumps({**CHAT, "stream": True}))
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)
            await asyncio.sleep(0)  # a real server's send may suspend

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [(b"authorization", f"Bearer {MEMBER}".encode())],
            "query_string": b"",
        }
        await app(scope, protocol.receive, send)
        assert sent[0]["status"] == 200 and sent[-1].get("more_body") is False
        ref = weakref.ref(protocol)
        del protocol, send
        return ref

    refs: list[weakref.ref[Any]] = []

    async def run(app: GandalfApp) -> None:
        app.core.watcher.listen_after = 0  # watch from the first byte, as a long stream would
        refs.append(await scenario(app))
        for _ in range(3):
            await asyncio.sleep(0)  # let the cancelled receive task finish
        gc.collect()
        assert refs[0]() is None, gc.get_referrers(refs[0]())
        assert held  # the stand-in for granian still holds its futures

    with_app(run)


class _Chunks:
    """A ByteStream of fixed chunks; records how it was closed."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks
        self.closed: list[int] = []
        self.finished = False

    async def __aiter__(self) -> Any:
        for chunk in self.chunks:
            yield chunk
        self.finished = True  # iterated to its end: its upstream released

    async def aclose(self, status: int) -> None:
        self.closed.append(status)


@pytest.mark.parametrize("last", [False, True])
def test_a_last_chunk_ends_the_body_with_it(last: bool) -> None:
    from gandalf.domain import LastChunk
    from gandalf.server.stream import ASGIWriter, relay
    from gandalf.server.wire import Response, StreamWatcher

    tail = LastChunk(b"data: [DONE]\n\n") if last else b"data: [DONE]\n\n"
    stream = _Chunks(b"data: {}\n\n", tail)
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return await asyncio.get_running_loop().create_future()

    async def scenario() -> int:
        response = Response(200, stream=stream)
        return await relay(ASGIWriter(send), receive, response, b"rid", 15.0, StreamWatcher())

    assert asyncio.run(scenario()) == 200
    assert sent[0]["type"] == "http.response.start"
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    if last:  # one message fewer: the end goes with the last chunk
        assert bodies == [(b"data: {}\n\n", True), (b"data: [DONE]\n\n", False)]
    else:
        assert bodies == [(b"data: {}\n\n", True), (b"data: [DONE]\n\n", True), (b"", False)]
    assert stream.finished and stream.closed == [200]


def test_uuid7_fields_and_uniqueness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Request ids are RFC 9562 version-7 UUIDs: the millisecond in the first
    48 bits (formatted once per millisecond, so ids of one millisecond share
    it and the next millisecond gets its own), version 7, variant 10, and 74
    random bits that differ from id to id; the variant digit covers 8-b."""
    from gandalf.server import wire

    now = [1_767_225_600_123_456_789]  # ns
    monkeypatch.setattr(wire, "_time_ns", lambda: now[0])
    monkeypatch.setattr(wire, "_millis", wire._Millis())
    seen: set[str] = set()
    variants: set[str] = set()
    for step in range(2000):
        if step == 1000:
            now[0] += 1_000_000  # the next millisecond
        text = wire.uuid7()
        value = uuid.UUID(text)
        assert str(value) == text  # lower-case, canonical dashes
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert value.int >> 80 == now[0] // 1_000_000
        variants.add(text[19])
        seen.add(text)
    assert len(seen) == 2000
    assert variants == {"8", "9", "a", "b"}
