"""Wire-level building blocks: prebuilt headers, request/response values, ids.

Handlers never speak ASGI: they get a :class:`Request` and return a
:class:`Response`. ``server/asgi.py`` translates both ways.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import AsyncIterator
from typing import Protocol

Headers = tuple[tuple[bytes, bytes], ...]

JSON_CT = (b"content-type", b"application/json")
JSON_HEADERS: Headers = (JSON_CT,)
SSE_HEADERS: Headers = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)

KEEPALIVE = b": keep-alive\n\n"

HEALTH_OK = b'{"status":"ok"}'
READY_OK = b'{"status":"ready"}'

_SANE_ID = re.compile(rb"[A-Za-z0-9._:+=/-]{1,128}")


class Request:
    """What a handler sees: method, path, the raw header pairs and the body bytes.

    ``authorization`` and ``api_key`` are picked out of the headers by the ASGI
    layer in the same single pass that finds ``x-request-id``.
    """

    __slots__ = (
        "api_key",
        "authorization",
        "body",
        "headers",
        "method",
        "path",
        "query",
        "request_id",
        "started",
    )

    def __init__(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        request_id: str,
        authorization: bytes | None = None,
        api_key: bytes | None = None,
        query: bytes = b"",
        started: float = 0.0,
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.request_id = request_id
        self.authorization = authorization
        self.api_key = api_key
        self.query = query
        self.started = started  # time.perf_counter() at arrival


class ByteStream(Protocol):
    """A streamed response body.

    Iterating yields the bytes to send. ``aclose(status)`` ends it early (or
    confirms its end) and says how it ended for accounting: 499 client gone,
    503 server shutting down. Closing twice is harmless.
    """

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self, status: int) -> None: ...


class Response:
    """A handler's answer: status, header pairs and a body (bytes or a stream).

    ``content-length`` (for bytes bodies) and ``x-request-id`` are added by the
    ASGI layer; ``headers`` carries the rest (content-type included).
    """

    __slots__ = ("body", "headers", "status", "stream")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Headers = JSON_HEADERS,
        stream: ByteStream | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.stream = stream


def sane_request_id(value: bytes) -> str | None:
    """The caller's x-request-id if it is short and harmless, else None."""
    if _SANE_ID.fullmatch(value) is None:
        return None
    return value.decode("ascii")


_random = random.Random(os.urandom(32))  # seeded once; ids need uniqueness, not secrecy
_getrandbits = _random.getrandbits
# Forked workers must not share one sequence.
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))
_VERSION_VARIANT = 0x7 << 76 | 0b10 << 62


def uuid7() -> str:
    """A UUIDv7 string: 48-bit unix milliseconds, version 7, variant 10, 74 random bits.

    The random bits come from a PRNG seeded from os.urandom at import: a
    getrandom() syscall per request measured ~5 us on this VM, more than the
    rest of the id.
    """
    rand = _getrandbits(74)
    value = (
        (time.time_ns() // 1_000_000) << 80
        | _VERSION_VARIANT
        | (rand >> 62) << 64
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )
    h = "%032x" % value  # noqa: UP031 - measurably faster than format() here
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
