"""An aiohttp app served on 127.0.0.1 from its own event loop in a thread.

The mock upstreams subclass :class:`BackgroundServer`: in-process tests and a
``gandalf serve`` subprocess can both call them, and a test thread can reach
into the server's loop (:meth:`BackgroundServer.on_loop`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

_T = TypeVar("_T")


@web.middleware
async def _unreadable_is_400(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A request the mock cannot read (bad JSON, wrong types) gets a 400, as a real
    API answers it: a mock's own crash must not look like the gateway's 500."""
    try:
        return await handler(request)
    except (web.HTTPException, asyncio.CancelledError):
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        message = f"the mock could not read the request: {type(exc).__name__}"
        return web.json_response(_error_shape(request.path, message), status=400)


def _error_shape(path: str, message: str) -> dict[str, Any]:
    """A 400 in the shape of the API the path belongs to."""
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    if path.startswith(("/v1beta/", "/v1/models/")):
        return {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
    if path.startswith("/api/"):
        return {"error": message}
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }


async def close_framed(request: web.Request, body: bytes) -> web.StreamResponse:
    """Answer 200 with an SSE ``body`` framed by closing the connection (no
    length, not chunked) and close it: the client sees the body end cleanly,
    however incomplete it is (an upstream that died mid-stream)."""
    transport = request.transport
    assert transport is not None
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    transport.write(head + body)
    transport.close()
    raise asyncio.CancelledError  # the answer is out: aiohttp only drops the handler


class BackgroundServer:
    """Subclasses add their routes in :meth:`routes` and may prepare loop-bound
    state in :meth:`prepare` and release parked handlers in :meth:`before_stop`."""

    name = "mock"

    def __init__(self) -> None:
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Runs on the server's loop before it listens."""

    async def before_stop(self) -> None:
        """Runs on the server's loop before it shuts down."""

    def start(self) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{self.name} did not start")
        return self

    def stop(self) -> None:
        async def _stop() -> None:
            await self.before_stop()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def on_loop(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the server's loop and return its result."""

        async def call() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._listen())
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _listen(self) -> None:
        await self.prepare()
        app = web.Application(middlewares=[_unreadable_is_400])
        self.routes(app)
        # Cancel a handler when its client goes away: a parked stream learns at once.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
