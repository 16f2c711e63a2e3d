"""The RSGI adapter driven in process (tests/rsgi_client.py), like the ASGI app
in test_server.py: per-request headers, errors, auth before the body, streams."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from gandalf.domain import CANCEL_DISCONNECT
from gandalf.errors import RateLimited
from gandalf.server.asgi import GandalfApp, Runtime
from gandalf.server.handlers import Endpoint
from gandalf.server.rsgi import RSGIApp
from gandalf.server.types import Message
from gandalf.server.wire import JSON_CT, Request, Response
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.rsgi_client import FakeProtocol, FakeScope, rsgi_call
from tests.test_server import MEMBER, VIEWER, make_config


async def _echo(request: Request) -> Response:
    """Answers with a header built for this request only (like a native
    passthrough's upstream headers): nothing else refers to the tuple."""
    value = request.header(b"x-n") or b"none"
    return Response(200, b"{}", (JSON_CT, (b"x-echo", value)))


async def _limited(request: Request) -> Response:
    raise RateLimited("slow down", retry_after=int(request.header(b"x-n") or b"0"))


def _app() -> GandalfApp:
    async def build() -> Runtime:
        async def close() -> None: ...

        return Runtime(
            {
                "/echo": Endpoint({"GET": _echo}, reads_body=False),
                "/limited": Endpoint({"GET": _limited}, reads_body=False),
            },
            close,
        )

    return GandalfApp(build, access_log=False)


def _both(scenario: Callable[[Callable[..., Awaitable[Reply]]], Awaitable[None]]) -> None:
    """Run ``scenario`` once through ASGI and once through RSGI."""

    async def main() -> None:
        app = _app()
        await app.startup()
        rsgi = RSGIApp(app)

        async def via_rsgi(*args: Any, **kwargs: Any) -> Reply:
            return await rsgi_call(rsgi, *args, **kwargs)

        async def via_asgi(*args: Any, **kwargs: Any) -> Reply:
            return await call(app, *args, **kwargs)

        try:
            await scenario(via_asgi)
            await scenario(via_rsgi)
        finally:
            await app.shutdown()

    asyncio.run(main())


def test_per_request_headers_never_reach_another_request() -> None:
    """Header tuples built for one answer die with it and CPython reuses their
    ids: nothing may remember a conversion by id() (it served a tenant's
    headers to the next requests)."""

    async def scenario(send: Callable[..., Awaitable[Reply]]) -> None:
        for n in range(200):
            reply = await send("GET", "/echo", headers=[("x-n", f"v{n}")])
            assert reply.status == 200
            assert reply.header("x-echo") == f"v{n}", n
        for n in range(1, 201):
            reply = await send("GET", "/limited", headers=[("x-n", str(n))])
            assert reply.status == 429
            assert reply.header("retry-after") == str(n), n

    _both(scenario)


# ---------------------------------------------------------------------------- the whole app

Send = Callable[..., Awaitable[tuple[Reply, int]]]


async def _asgi_stalled(
    app: GandalfApp,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    cut: bool = False,
) -> tuple[Reply, int]:
    """A request whose body never comes (``cut``: the client stops sending at
    once); the reply and how many times the app asked for the body."""
    reads = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        if cut:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }
    await asyncio.wait_for(app(scope, receive, send), 5.0)  # a failure bound
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return Reply(sent[0]["status"], list(sent[0]["headers"]), body), reads


async def _rsgi_stalled(
    app: GandalfApp,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    cut: bool = False,
) -> tuple[Reply, int]:
    protocol = FakeProtocol([b""], body_stalls=not cut, body_cut=cut)
    reply = await asyncio.wait_for(
        rsgi_call(RSGIApp(app), method, path, headers=headers, protocol=protocol), 5.0
    )
    return reply, protocol.body_reads


def _with_app(scenario: Callable[[GandalfApp, Send], Awaitable[None]], **server: Any) -> None:
    """``scenario(app, stalled)`` once per interface, on a fresh app."""

    async def main(stalled: Send) -> None:
        app = create_app(make_config(":memory:", **server), access_log=False)
        await app.startup()
        try:
            await scenario(app, stalled)
        finally:
            await app.shutdown()

    asyncio.run(main(_asgi_stalled))
    asyncio.run(main(_rsgi_stalled))


def _member() -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {MEMBER}"), ("content-type", "application/json")]


def test_a_caller_without_a_valid_key_never_has_its_body_read() -> None:
    async def scenario(app: GandalfApp, stalled: Send) -> None:
        stranger = [("authorization", "Bearer gnd_" + "s" * 40)]
        viewer = [("authorization", f"Bearer {VIEWER}")]
        for path in ("/v1/chat/completions", "/v1/embeddings"):
            for headers, status in (([], 401), (stranger, 401), (viewer, 403)):
                reply, reads = await stalled(app, "POST", path, headers=headers)
                assert reply.status == status, reply.body
                assert reads == 0

    _with_app(scenario)


def test_a_body_that_does_not_arrive_within_read_timeout_is_a_408() -> None:
    async def scenario(app: GandalfApp, stalled: Send) -> None:
        reply, reads = await stalled(app, "POST", "/v1/chat/completions", headers=_member())
        assert reads == 1
        assert reply.status == 408, reply.body
        assert reply.json()["error"]["code"] == "request_timeout"
        assert reply.header("connection") == "close"
        assert app.inflight == 0

    _with_app(scenario, read_timeout=0.05)


def test_a_body_cut_short_is_a_400_not_a_silent_hang_up() -> None:
    async def scenario(app: GandalfApp, stalled: Send) -> None:
        reply, _ = await stalled(app, "POST", "/v1/chat/completions", headers=_member(), cut=True)
        assert reply.status == 400, reply.body
        assert reply.json()["error"]["code"] == "incomplete_body"
        assert reply.header("connection") == "close"

    _with_app(scenario)


def test_two_credential_headers_are_refused() -> None:
    """ASGI servers keep the last of two headers, granian's RSGI mapping the
    first: refuse rather than let the interface pick the key."""
    other = "Bearer gnd_" + "o" * 40
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}

    async def scenario(send: Callable[..., Awaitable[Reply]]) -> None:
        for headers in (
            [("authorization", f"Bearer {MEMBER}"), ("authorization", other)],
            [("authorization", other), ("authorization", f"Bearer {MEMBER}")],
            [("x-api-key", MEMBER), ("x-api-key", "gnd_" + "o" * 40)],
        ):
            reply = await send("POST", "/v1/chat/completions", headers=headers, json=chat)
            assert reply.status == 400, reply.body
            assert "more than one" in reply.json()["error"]["message"]
        reply = await send(
            "POST",
            "/v1/chat/completions",
            headers=[("authorization", f"Bearer {MEMBER}")],
            json=chat,
        )
        assert reply.status == 200

    _both_full(scenario)


def _both_full(scenario: Callable[[Callable[..., Awaitable[Reply]]], Awaitable[None]]) -> None:
    async def main() -> None:
        app = create_app(make_config(":memory:"), access_log=False)
        await app.startup()
        rsgi = RSGIApp(app)

        async def via_rsgi(*args: Any, **kwargs: Any) -> Reply:
            return await rsgi_call(rsgi, *args, **kwargs)

        async def via_asgi(*args: Any, **kwargs: Any) -> Reply:
            return await call(app, *args, **kwargs)

        try:
            await scenario(via_asgi)
            await scenario(via_rsgi)
        finally:
            await app.shutdown()

    asyncio.run(main())


def test_chat_embeddings_and_streams_through_rsgi() -> None:
    async def scenario(send: Callable[..., Awaitable[Reply]]) -> None:
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        reply = await send("POST", "/v1/chat/completions", headers=_member(), json=chat)
        assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"]
        assert reply.header("x-gandalf-provider") == "fake" and reply.header("x-request-id")
        reply = await send(
            "POST", "/v1/chat/completions", headers=_member(), json={**chat, "stream": True}
        )
        assert reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n")
        assert reply.header("content-type") == "text/event-stream"
        reply = await send(
            "POST", "/v1/embeddings", headers=_member(), json={"model": "fake-model", "input": "x"}
        )
        assert reply.status == 200 and reply.json()["data"]
        reply = await send("GET", "/v1/models", headers=[("x-api-key", VIEWER)])
        assert reply.status == 200
        reply = await send("POST", "/v1/chat/completions", json=chat)
        assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_api_key"

    _both_full(scenario)


# ---------------------------------------------------------------------------- access log


async def _abandoned(request: Request) -> Response:
    """A call the client gives up on before any answer (a stream before its first
    byte, a slow completion): the watch cancels it with CANCEL_DISCONNECT."""
    assert request.receive is not None and request.streams is not None
    task = asyncio.current_task()
    assert task is not None
    watch = request.streams.watch(request.receive, task)
    try:
        await asyncio.Event().wait()
    finally:
        watch.stop()
    raise AssertionError("unreachable")


def test_every_request_gets_exactly_one_access_log_line() -> None:
    written: list[bytes] = []

    async def build() -> Runtime:
        async def close() -> None: ...

        return Runtime(
            {
                "/echo": Endpoint({"GET": _echo}, reads_body=False),
                "/abandoned": Endpoint({"GET": _abandoned}, reads_body=False),
            },
            close,
        )

    async def main() -> None:
        app = GandalfApp(build, access_log=True)
        app.core.access.write = written.append
        rsgi = RSGIApp(app)
        gone = FakeProtocol([b""])
        gone.gone.set()  # the client has left already
        await call(app, "GET", "/echo")  # not started: 503
        await rsgi_call(rsgi, "GET", "/echo")
        await app.startup()
        app.core.watcher.listen_after = 0
        for path in ("/echo", '/nowhere\n{"status":200}\x1b[2J'):
            await call(app, "GET", path)
            await rsgi_call(rsgi, "GET", path)
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/abandoned", "headers": []}
        await asyncio.wait_for(app(scope, receive, send), 5.0)
        assert sent == []  # nobody to answer
        await asyncio.wait_for(rsgi.__rsgi__(FakeScope("GET", "/abandoned", "", []), gone), 5.0)
        assert gone.status is None
        await app.shutdown()

    asyncio.run(main())
    text = b"".join(written).decode()
    assert text.endswith("\n") and "\x1b" not in text
    lines = text.splitlines()
    seen = [(e["path"], e["status"]) for e in map(orjson.loads, lines)]
    nowhere = '/nowhere\n{"status":200}\x1b[2J'
    assert seen == [
        ("/echo", 503),
        ("/echo", 503),
        ("/echo", 200),
        ("/echo", 200),
        (nowhere, 404),
        (nowhere, 404),
        ("/abandoned", 499),
        ("/abandoned", 499),
    ]


def test_a_path_in_an_error_message_cannot_forge_lines() -> None:
    async def scenario(send: Callable[..., Awaitable[Reply]]) -> None:
        reply = await send("GET", "/x\r\nSet-Cookie: a=b\x1b[2J\x85")
        assert reply.status == 404
        message = reply.json()["error"]["message"]
        assert message == "Unknown path: /x\\x0d\\x0aSet-Cookie: a=b\\x1b[2J\\x85"

    _both_full(scenario)


def test_a_tracked_call_is_cancelled_once_its_client_leaves() -> None:
    """A non-streamed call pays a dict entry; once it outlives listen_after it is
    watched, and a client that left cancels it (the handler sees the cancel)."""
    cancelled: list[str] = []

    async def slow(request: Request) -> Response:
        request.track()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            cancelled.append(str(exc.args[0]) if exc.args else "")
            raise
        finally:
            request.untrack()
        raise AssertionError("unreachable")

    async def build() -> Runtime:
        async def close() -> None: ...

        return Runtime({"/slow": Endpoint({"GET": slow}, reads_body=False)}, close)

    async def main() -> None:
        app = GandalfApp(build, access_log=False)
        await app.startup()
        watcher = app.core.watcher
        watcher.listen_after, watcher.tick = 0.02, 0.01
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/slow", "headers": []}
        await asyncio.wait_for(app(scope, receive, send), 5.0)  # a failure bound
        gone = FakeProtocol([b""])
        gone.gone.set()
        await asyncio.wait_for(RSGIApp(app).__rsgi__(FakeScope("GET", "/slow", "", []), gone), 5.0)
        assert sent == [] and gone.status is None  # nobody left to answer
        assert app.inflight == 0
        await app.shutdown()

    asyncio.run(main())
    assert cancelled == [CANCEL_DISCONNECT, CANCEL_DISCONNECT]
