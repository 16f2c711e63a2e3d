"""The one place that builds upstream HTTP clients and maps their failures.

aiohttp, not httpx, carries upstream traffic: measured on one core, a thin
granian proxy did ~3,000 req/s at 64 concurrent requests with aiohttp and ~45
with httpx (its pool degrades under concurrency; see DESIGN.md). Keeping the
client behind this module lets the bench re-decide without touching adapters.

Failure mapping (the contract's error table):

- connect/read timeouts           -> UpstreamTimeout (504)
- refused, reset, DNS, bad payload -> UpstreamError (502)
- HTTP 401/403 from the upstream  -> UpstreamAuthError (502): the gateway's own
  credentials were rejected, never the caller's
- other HTTP 4xx                   -> UpstreamClientError (same status, OpenAI-shaped body)
- HTTP 503/529, "overloaded"       -> UpstreamOverloaded (503; only adapters that classify)
- HTTP 5xx                         -> UpstreamError (502)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Literal

import aiohttp
import msgspec

from gandalf.domain import ProviderConfig
from gandalf.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamClientError,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
)

# Far above anything one worker serves at once; the point is no artificial cap.
CONNECTION_LIMIT = 4096
KEEPALIVE_SECONDS = 75.0
CONNECT_TIMEOUT_CAP = 10.0


def new_session(config: ProviderConfig) -> aiohttp.ClientSession:
    """A pooled keep-alive session for one provider. Call inside a running loop."""
    total = config.timeout_ms / 1000.0
    connector = aiohttp.TCPConnector(
        limit=CONNECTION_LIMIT,
        limit_per_host=0,
        keepalive_timeout=KEEPALIVE_SECONDS,
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=total, sock_connect=min(total, CONNECT_TIMEOUT_CAP)),
        cookie_jar=aiohttp.DummyCookieJar(),
        # No Accept-Encoding: LLM answers are small, and gzip would cost CPU both ways.
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        raise_for_status=False,
    )


def stream_timeout(config: ProviderConfig) -> aiohttp.ClientTimeout:
    """For streams ``timeout_ms`` bounds the silence between two reads, not the
    whole answer: a long completion may stream for minutes."""
    read = config.timeout_ms / 1000.0
    return aiohttp.ClientTimeout(
        total=None, sock_read=read, sock_connect=min(read, CONNECT_TIMEOUT_CAP)
    )


class UpstreamErrors:
    """``with UpstreamErrors(name):`` turns client exceptions into gateway errors.

    One instance per provider, reused by every request (it holds no state).
    """

    __slots__ = ("provider", "timeout_s")

    def __init__(self, provider: str, timeout_ms: int) -> None:
        self.provider = provider
        self.timeout_s = timeout_ms / 1000.0

    def __enter__(self) -> UpstreamErrors:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if exc is None or isinstance(exc, (GatewayError, asyncio.CancelledError)):
            return False
        # TimeoutError first: in Python 3.11 it is also an OSError.
        if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                what = "connecting"
            else:
                what = f"waiting for a response (timeout {self.timeout_s:g}s)"
            raise UpstreamTimeout(
                f"Upstream provider '{self.provider}' timed out {what}."
            ) from None
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise UpstreamError(
                f"Upstream provider '{self.provider}' is unreachable: connection failed."
            ) from None
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            raise UpstreamError(
                f"Upstream provider '{self.provider}' failed: {type(exc).__name__}."
            ) from None
        return False


class _ErrorDetail(msgspec.Struct):
    message: str


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_error_body = msgspec.json.Decoder(_ErrorBody)


def http_status_error(
    provider: str, status: int, body: bytes, retry_after: str | None
) -> GatewayError:
    """The gateway error for a non-2xx upstream answer."""
    if status in (401, 403):
        return UpstreamAuthError(
            f"Upstream provider '{provider}' rejected the gateway's credentials "
            f"(HTTP {status}); check the provider's api_key."
        )
    if 400 <= status < 500:
        try:
            detail = _error_body.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            text = body[:500].decode("utf-8", "replace").strip() or f"HTTP {status}"
            return UpstreamClientError(
                f"Upstream provider '{provider}' returned HTTP {status}: {text}",
                status=status,
                retry_after=retry_after,
            )
        return UpstreamClientError(
            detail.error.message, status=status, raw_body=body, retry_after=retry_after
        )
    return UpstreamError(f"Upstream provider '{provider}' returned HTTP {status}.")


ErrorMapper = Callable[[int, bytes, "str | None"], GatewayError]
"""``(status, body, retry_after) -> error`` for a non-2xx upstream answer."""


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    errors: UpstreamErrors,
    on_error: ErrorMapper,
) -> bytes:
    """POST ``body``; the answer's bytes, or ``on_error``'s exception."""
    with errors:
        async with session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            status = resp.status
            retry_after = resp.headers.get("Retry-After") if status >= 400 else None
    if status >= 300:
        raise on_error(status, data, retry_after)
    return data


async def get_json(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    errors: UpstreamErrors,
    on_error: ErrorMapper,
) -> bytes:
    with errors:
        async with session.get(url, headers=headers) as resp:
            data = await resp.read()
            status = resp.status
    if status >= 300:
        raise on_error(status, data, None)
    return data


async def open_event_stream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    read_timeout: aiohttp.ClientTimeout,
    errors: UpstreamErrors,
    on_error: ErrorMapper,
) -> aiohttp.ClientResponse:
    """POST ``body`` and return the response once the upstream accepted it as
    an event stream; refusals raise ``on_error``'s exception (before any byte
    reached the client, so the caller can still answer with a JSON error)."""
    with errors:
        resp = await session.post(url, data=body, headers=headers, timeout=read_timeout)
        status = resp.status
        if status >= 300 or not resp.content_type.startswith("text/event-stream"):
            try:
                data = await resp.read()
                retry_after = resp.headers.get("Retry-After") if status >= 400 else None
            finally:
                resp.release()
            if status >= 300:
                raise on_error(status, data, retry_after)
            raise UpstreamError(
                f"Upstream provider '{errors.provider}' answered a streaming request with "
                f"'{resp.content_type}' instead of an event stream."
            )
    return resp


def status_error(
    provider: str,
    status: int,
    message: str,
    retry_after: str | None,
    *,
    overloaded: bool = False,
    error_type: str | None = None,
    error_code: str | None = None,
) -> GatewayError:
    """The gateway error for a non-2xx answer from an upstream whose error body
    is not OpenAI's (the adapter extracted ``message`` and classified it):
    401/403 -> UpstreamAuthError; 429 -> 429 rate_limit_exceeded; other 4xx ->
    the same status in OpenAI's shape; overloaded/503/529 -> UpstreamOverloaded;
    other 5xx -> UpstreamError."""
    if status in (401, 403):
        return UpstreamAuthError(
            f"Upstream provider '{provider}' rejected the gateway's credentials "
            f"(HTTP {status}); check the provider's api_key."
        )
    if overloaded or status in (503, 529):
        return UpstreamOverloaded(
            f"Upstream provider '{provider}' is overloaded: {message}", retry_after=retry_after
        )
    if status == 429:
        return UpstreamClientError(
            message,
            status=429,
            retry_after=retry_after,
            error_type=error_type or "rate_limit_exceeded",
            error_code=error_code or "rate_limit_exceeded",
        )
    if 400 <= status < 500:
        return UpstreamClientError(
            message,
            status=status,
            retry_after=retry_after,
            error_type=error_type,
            error_code=error_code,
        )
    return UpstreamError(f"Upstream provider '{provider}' returned HTTP {status}: {message}")
