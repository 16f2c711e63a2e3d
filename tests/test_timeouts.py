"""Per-provider timeouts: connect, first byte and total, each with its own message.

Against the controllable mock upstream on 127.0.0.1 (``hang`` never answers,
``stream-late`` sends no headers until released, ``stream-silent`` goes quiet
after one chunk) and, for connecting, a listening socket whose accept queue is
full, so the kernel leaves new connections unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgspec
import pytest

from gandalf.domain import ChatCall, ChatRequest, NativeRequest, ProviderConfig, Target
from gandalf.errors import GatewayError, UpstreamError, UpstreamTimeout
from gandalf.provider import transport
from gandalf.provider.native import NativeClient
from gandalf.provider.openai import OpenAIProvider
from tests.upstream import MockUpstream


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port that accepts no connection: listening, with its backlog already full."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port: int = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def call(model: str, *, stream: bool = False, text: str | None = None) -> ChatCall:
    """A call for ``model``; its user message (the mock's stream key) is ``text`` or the model."""
    body = msgspec.json.encode(
        {"model": model, "messages": [{"role": "user", "content": text or model}], "stream": stream}
    )
    request = msgspec.json.decode(body, type=ChatRequest)
    return ChatCall(
        body=body,
        request=request,
        alias=model,
        target=Target(provider="p", model=model),
        request_id="r",
    )


def provider(base_url: str, **settings: Any) -> OpenAIProvider:
    return OpenAIProvider(
        ProviderConfig(name="p", type="openai", base_url=base_url, api_key="k", **settings)
    )


async def failure(adapter: OpenAIProvider, model: str, *, stream: bool = False) -> str:
    await adapter.start()
    try:
        if stream:
            opened = await adapter.stream(call(model, stream=True))
            try:
                async for _ in opened:
                    pass
            finally:
                await opened.aclose()
        else:
            await adapter.chat(call(model))
    except UpstreamTimeout as exc:
        return exc.message
    finally:
        await adapter.close()
    raise AssertionError("no timeout")


def on_error(status: int, body: bytes, retry_after: str | None) -> GatewayError:
    return UpstreamError(f"unexpected HTTP {status}")


def test_timeout_settings_build_aiohttp_timeouts() -> None:
    defaults = ProviderConfig(name="p", type="openai")
    assert transport.request_timeout(defaults) == aiohttp.ClientTimeout(
        total=30.0, sock_connect=5.0, sock_read=None
    )
    assert transport.stream_timeout(defaults) == aiohttp.ClientTimeout(
        total=None, sock_connect=5.0, sock_read=30.0
    )
    tuned = ProviderConfig(
        name="p", type="openai", timeout_ms=2000, connect_timeout_ms=9000, first_byte_timeout_ms=500
    )
    assert transport.request_timeout(tuned) == aiohttp.ClientTimeout(
        total=2.0, sock_connect=2.0, sock_read=0.5
    )
    assert transport.stream_timeout(tuned) == aiohttp.ClientTimeout(
        total=None, sock_connect=2.0, sock_read=0.5
    )


def test_total_timeout(mock: MockUpstream) -> None:
    message = asyncio.run(failure(provider(mock.base_url, timeout_ms=300), "hang"))
    assert message == "Upstream provider 'p' timed out after timeout_ms=300 (total)."


def test_first_byte_timeout(mock: MockUpstream) -> None:
    adapter = provider(mock.base_url, timeout_ms=30_000, first_byte_timeout_ms=200)
    message = asyncio.run(failure(adapter, "hang"))
    assert message == (
        "Upstream provider 'p' timed out waiting for the first byte (first_byte_timeout_ms=200)."
    )


def test_first_byte_timeout_of_a_stream(mock: MockUpstream) -> None:
    adapter = provider(mock.base_url, timeout_ms=30_000, first_byte_timeout_ms=200)
    message = asyncio.run(failure(adapter, "stream-late", stream=True))
    assert message == (
        "Upstream provider 'p' timed out waiting for the first byte (first_byte_timeout_ms=200)."
    )


def test_a_started_stream_is_bounded_by_its_silence_not_the_first_byte(mock: MockUpstream) -> None:
    adapter = provider(mock.base_url, timeout_ms=250, first_byte_timeout_ms=20_000)
    message = asyncio.run(failure(adapter, "stream-silent", stream=True))
    assert message == (
        "Upstream provider 'p' timed out waiting for the stream to continue "
        "(timeout_ms=250 of silence)."
    )


@pytest.mark.parametrize(("first_byte_ms", "timeout_ms"), [(200, 30_000), (20_000, 250)])
def test_once_the_headers_came_the_silence_bound_replaces_the_first_byte_one(
    mock: MockUpstream, first_byte_ms: int, timeout_ms: int
) -> None:
    config = ProviderConfig(
        name="p",
        type="openai",
        timeout_ms=timeout_ms,
        first_byte_timeout_ms=first_byte_ms,
        api_key="k",
    )
    errors = transport.UpstreamErrors.for_config(config)
    key = f"switch-{first_byte_ms}"

    async def scenario() -> tuple[float | None, float | None]:
        session = transport.new_session(config)
        try:
            timeout = transport.stream_timeout(config)
            resp = await transport.open_event_stream(
                session,
                mock.base_url + "/chat/completions",
                call("stream-silent", stream=True, text=key).body,
                {},
                timeout,
                errors,
                on_error,
            )
            try:
                # The stream is open (the mock holds its second chunk back).
                assert resp.connection is not None and resp.connection.protocol is not None
                now = resp.connection.protocol.read_timeout
            finally:
                resp.close()
            return timeout.sock_read, now
        finally:
            await session.close()

    before, after = asyncio.run(scenario())
    assert (before, after) == (first_byte_ms / 1000, timeout_ms / 1000)


def test_connect_timeout(unanswered_port: int) -> None:
    adapter = provider(
        f"http://127.0.0.1:{unanswered_port}/v1", timeout_ms=5_000, connect_timeout_ms=150
    )
    message = asyncio.run(failure(adapter, "anything"))
    assert message == "Upstream provider 'p' timed out connecting (connect_timeout_ms=150)."


def test_connect_timeout_is_capped_at_the_total() -> None:
    errors = transport.UpstreamErrors("p", 300, connect_timeout_ms=5_000)
    assert errors.connect_ms == 300
    legacy = transport.UpstreamErrors("p", 30_000)  # the adapters' older constructor
    assert (legacy.connect_ms, legacy.first_byte_ms) == (5_000, 30_000)
    assert legacy.stream_body.stream_body is legacy.stream_body


def test_transport_helpers_apply_the_same_timeouts(mock: MockUpstream) -> None:
    """post_json and open_event_stream (the translating adapters' path)."""
    config = ProviderConfig(
        name="p", type="openai", timeout_ms=250, first_byte_timeout_ms=20_000, api_key="k"
    )
    errors = transport.UpstreamErrors.for_config(config)

    async def scenario() -> list[str]:
        messages = []
        session = transport.new_session(config)
        try:
            try:
                await transport.post_json(
                    session,
                    mock.base_url + "/chat/completions",
                    call("hang").body,
                    {},
                    errors,
                    on_error,
                )
            except UpstreamTimeout as exc:
                messages.append(exc.message)
            resp = await transport.open_event_stream(
                session,
                mock.base_url + "/chat/completions",
                call("stream-silent", stream=True).body,
                {},
                transport.stream_timeout(config),
                errors,
                on_error,
            )
            try:
                with errors.stream_body:
                    async for _ in resp.content.iter_any():
                        pass
            except UpstreamTimeout as exc:
                messages.append(exc.message)
            finally:
                resp.close()
        finally:
            await session.close()
        return messages

    assert asyncio.run(scenario()) == [
        "Upstream provider 'p' timed out after timeout_ms=250 (total).",
        "Upstream provider 'p' timed out waiting for the stream to continue "
        "(timeout_ms=250 of silence).",
    ]


def test_total_timeout_after_the_headers(mock: MockUpstream) -> None:
    """The total runs out while the answer's body is coming: the answer's fault, named so."""
    message = asyncio.run(failure(provider(mock.base_url, timeout_ms=300), "headers-then-hang"))
    assert message == (
        "Upstream provider 'p' timed out after timeout_ms=300 (total), while sending its answer."
    )


def test_post_json_total_timeout_after_the_headers(mock: MockUpstream) -> None:
    config = ProviderConfig(name="p", type="openai", timeout_ms=250, api_key="k")
    errors = transport.UpstreamErrors.for_config(config)

    async def scenario() -> str:
        session = transport.new_session(config)
        try:
            await transport.post_json(
                session,
                mock.base_url + "/chat/completions",
                call("headers-then-hang").body,
                {},
                errors,
                on_error,
            )
        except UpstreamTimeout as exc:
            return exc.message
        finally:
            await session.close()
        raise AssertionError("no timeout")

    assert asyncio.run(scenario()) == (
        "Upstream provider 'p' timed out after timeout_ms=250 (total), while sending its answer."
    )


def _armed_cancels(task: asyncio.Task[Any]) -> list[asyncio.TimerHandle]:
    """Timers still scheduled on the running (default asyncio) loop that would cancel ``task``."""
    loop: Any = asyncio.get_running_loop()
    return [
        handle
        for handle in loop._scheduled
        if not handle.cancelled() and getattr(handle._callback, "__self__", None) is task
    ]


def test_a_finished_call_leaves_no_deadline_armed(mock: MockUpstream) -> None:
    """The total timeout is a timer per call; once the call ended (answered or
    failed) nothing may cancel the request's task later."""

    async def scenario() -> None:
        adapter = provider(mock.base_url, timeout_ms=60_000)
        await adapter.start()
        task = asyncio.current_task()
        assert task is not None
        try:
            await adapter.chat(call("gpt-x"))
            assert _armed_cancels(task) == []
            with pytest.raises(UpstreamError):
                await adapter.chat(call("status-500"))
            assert _armed_cancels(task) == []
            assert task.cancelling() == 0
        finally:
            await adapter.close()

    asyncio.run(scenario())


def test_another_cancellation_passes_through_with_its_reason(mock: MockUpstream) -> None:
    """A client leaving (the server cancels the task with its reason) is not
    turned into a timeout, and the call's deadline is disarmed."""

    async def scenario() -> None:
        adapter = provider(mock.base_url, timeout_ms=60_000)
        await adapter.start()
        try:
            # A first call leaves a pooled connection: the next is cancelled
            # waiting for its answer, not halfway through opening a socket.
            await adapter.chat(call("gpt-x"))
            task = asyncio.create_task(adapter.chat(call("hang")))
            for _ in range(5):
                await asyncio.sleep(0)  # let it start and reach an await inside the call
            task.cancel("client disconnected")
            with pytest.raises(asyncio.CancelledError) as caught:
                await task
            assert caught.value.args == ("client disconnected",)
            assert _armed_cancels(task) == []
        finally:
            await adapter.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("hang", "Upstream provider 'p' timed out after timeout_ms=300 (total)."),
        (
            "headers-then-hang",
            "Upstream provider 'p' timed out after timeout_ms=300 (total), "
            "while sending its answer.",
        ),
    ],
)
def test_native_passthrough_total_timeout(mock: MockUpstream, model: str, expected: str) -> None:
    """A non-streamed native call (Azure's path here) has the same total, in both phases."""
    config = ProviderConfig(
        name="p", type="azure", base_url=mock.base_url, timeout_ms=300, api_key="k"
    )

    async def scenario() -> str:
        native = NativeClient(config)
        await native.start()
        task = asyncio.current_task()
        assert task is not None
        try:
            await native.send(
                NativeRequest(
                    api="azure",
                    method="POST",
                    path="/v1/chat/completions",
                    headers={"content-type": "application/json"},
                    body=call(model).body,
                )
            )
        except UpstreamTimeout as exc:
            assert _armed_cancels(task) == [] and task.cancelling() == 0
            return exc.message
        finally:
            await native.close()
        raise AssertionError("no timeout")

    assert asyncio.run(scenario()) == expected
