"""Drive an RSGI app directly: no server, no sockets (the sibling of asgi_client).

A small stand-in for granian's RSGI objects: a scope whose ``headers`` is a
str mapping (``get`` answers the first value of a name, ``items`` every pair,
like granian's RSGIHeaders) and a protocol that hands out the body (whole or
by chunks), resolves ``client_disconnect()`` when the test says the client
left, and records the response written with ``response_bytes`` or
``response_stream``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from granian import rsgi as granian_rsgi

from tests.asgi_client import Reply

# What granian raises from a body read when the client stopped sending early.
ProtocolClosed: type[Exception] = granian_rsgi.ProtocolClosed  # type: ignore[attr-defined]


class FakeHeaders:
    """granian's RSGIHeaders: lower-case str names, first value wins on ``get``;
    ``keys`` lists each name once, ``values`` and ``items`` every header."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._pairs = [(k.lower(), v) for k, v in pairs]

    def get(self, key: str, default: Any = None) -> Any:
        for name, value in self._pairs:
            if name == key:
                return value
        return default

    def __contains__(self, key: str) -> bool:
        return any(name == key for name, _ in self._pairs)

    def keys(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self._pairs))

    def values(self) -> list[str]:
        return [value for _, value in self._pairs]

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)


class FakeScope:
    __slots__ = ("headers", "method", "path", "proto", "query_string")

    def __init__(
        self, method: str, path: str, query: str, headers: Sequence[tuple[str, str]]
    ) -> None:
        self.proto = "http"
        self.method = method
        self.path = path
        self.query_string = query
        self.headers = FakeHeaders(headers)


class FakeTransport:
    def __init__(self, protocol: FakeProtocol) -> None:
        self.protocol = protocol

    async def send_bytes(self, data: bytes) -> None:
        if self.protocol.gone.is_set():
            raise OSError("client gone")
        self.protocol.chunks.append(data)


class FakeProtocol:
    """One request's RSGI protocol. ``body_stalls``: the body never arrives
    (a client that sends headers and then nothing); ``body_cut``: the client
    stops sending before the body is complete (granian raises ProtocolClosed)."""

    def __init__(
        self, chunks: Sequence[bytes], *, body_stalls: bool = False, body_cut: bool = False
    ) -> None:
        self._parts = list(chunks)
        self.body_stalls = body_stalls
        self.body_cut = body_cut
        self.gone = asyncio.Event()
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.body_reads = 0

    async def __call__(self) -> bytes:
        self.body_reads += 1
        if self.body_stalls:
            await asyncio.Event().wait()
        if self.body_cut:
            raise ProtocolClosed("RSGI transport is closed")
        return b"".join(self._parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self.body_reads += 1
        if self.body_stalls:
            await asyncio.Event().wait()
        if self.body_cut:
            raise ProtocolClosed("RSGI transport is closed")
        for part in self._parts:
            yield part

    async def client_disconnect(self) -> None:
        await self.gone.wait()

    def _start(self, status: int, headers: list[tuple[str, str]]) -> None:
        assert self.status is None, "response started twice"
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in headers), headers
        self.status = status
        self.headers = list(headers)

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self._start(status, headers)
        self.chunks.append(body)

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> FakeTransport:
        self._start(status, headers)
        return FakeTransport(self)

    def reply(self) -> Reply:
        assert self.status is not None, "no response was written"
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        return Reply(self.status, headers, b"".join(self.chunks))


async def rsgi_call(
    app: Any,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    chunks: Sequence[bytes] | None = None,
    json: Any = None,
    query: str = "",
    protocol: FakeProtocol | None = None,
) -> Reply:
    """One request through ``app.__rsgi__``; ``protocol`` to control the client."""
    if json is not None:
        body = orjson.dumps(json)
    if protocol is None:
        protocol = FakeProtocol(list(chunks) if chunks is not None else [body])
    await app.__rsgi__(FakeScope(method, path, query, headers), protocol)
    return protocol.reply()
