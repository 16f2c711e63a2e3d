"""A controllable mock OpenAI upstream for tests, on 127.0.0.1.

It runs an aiohttp server on its own event loop in a background thread, so both
in-process tests and a ``gandalf serve`` subprocess can call it. Its behaviour
is chosen by the ``model`` it receives (Gandalf puts the route target's model
there), which lets one mock serve every scenario at once:

- ``ok-*`` (anything not listed below): a chat.completion echoing the last user message
- ``status-NNN``: HTTP NNN with an OpenAI-shaped error (429 adds ``retry-after: 7``)
- ``text-NNN``: HTTP NNN with a plain-text body
- ``hang``: never answers until released (timeouts)
- ``gate``: waits until the test opens the gate (graceful drain)
- ``badjson``: 200 with a body that is not JSON

Every request is recorded (path, headers, body) in ``received``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web


class Received:
    __slots__ = ("body", "headers", "path")

    def __init__(self, path: str, headers: dict[str, str], body: bytes) -> None:
        self.path = path
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class MockUpstream:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._gate: asyncio.Event | None = None
        self._release: asyncio.Event | None = None
        self.waiting = 0  # requests parked at the gate

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> MockUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("mock upstream did not start")
        return self

    def stop(self) -> None:
        async def _stop() -> None:
            assert self._release is not None and self._gate is not None
            self._release.set()
            self._gate.set()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _start(self) -> None:
        self._gate = asyncio.Event()
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    # ------------------------------------------------------------ controls

    def open_gate(self) -> None:
        def _open() -> None:
            assert self._gate is not None
            self._gate.set()

        self.loop.call_soon_threadsafe(_open)

    def clear(self) -> None:
        self.received.clear()

    # ------------------------------------------------------------ handlers

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body))
        try:
            payload = json.loads(body)
        except ValueError:
            return web.json_response({"error": {"message": "bad json"}}, status=400)
        model = str(payload.get("model", ""))
        if model.startswith("status-"):
            status = int(model.split("-", 1)[1])
            headers = {"retry-after": "7"} if status == 429 else {}
            return web.json_response(
                {
                    "error": {
                        "message": f"mock says {status}",
                        "type": "mock_error",
                        "param": None,
                        "code": f"mock_{status}",
                    }
                },
                status=status,
                headers=headers,
            )
        if model.startswith("text-"):
            return web.Response(status=int(model.split("-", 1)[1]), text="plain failure")
        if model == "hang":
            assert self._release is not None
            await self._release.wait()
        if model == "gate":
            assert self._gate is not None
            self.waiting += 1
            await self._gate.wait()
        if model == "badjson":
            return web.Response(status=200, text="not json", content_type="application/json")
        messages = payload.get("messages") or [{}]
        text = messages[-1].get("content", "")
        if not isinstance(text, str):
            text = json.dumps(text)
        prompt = sum(len(json.dumps(m)) for m in messages) // 4
        completion = max(1, len(text) // 4)
        return web.json_response(
            {
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )


@contextmanager
def running_upstream() -> Iterator[MockUpstream]:
    mock = MockUpstream().start()
    try:
        yield mock
    finally:
        mock.stop()
