"""Wire-level building blocks: prebuilt headers, request/response values, ids.

Handlers never speak ASGI: they get a :class:`Request` and return a
:class:`Response`. ``server/asgi.py`` translates both ways.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator

Headers = tuple[tuple[bytes, bytes], ...]

JSON_CT = (b"content-type", b"application/json")
JSON_HEADERS: Headers = (JSON_CT,)
SSE_HEADERS: Headers = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)

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


class Response:
    """A handler's answer: status, extra header pairs and a body (bytes or a stream).

    ``content-type``, ``content-length`` and ``x-request-id`` are added by the ASGI
    layer; ``headers`` carries only what is specific to this response.
    """

    __slots__ = ("body", "headers", "status", "stream")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Headers = JSON_HEADERS,
        stream: AsyncIterator[bytes] | None = None,
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


def uuid7() -> str:
    """A UUIDv7 string: 48-bit unix milliseconds, version 7, variant 10, random rest."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    # 12 bits rand_a, then 62 bits rand_b
    rand_a = rand >> 68 & 0xFFF
    rand_b = rand & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
