"""The one place that builds upstream HTTP clients and maps their failures.

aiohttp, not httpx, carries upstream traffic: measured on one core, a thin
granian proxy did ~3,000 req/s at 64 concurrent requests with aiohttp and ~45
with httpx (its pool degrades under concurrency; see DESIGN.md). Keeping the
client behind this module lets the bench re-decide without touching adapters.

Timeouts, per provider (:func:`request_timeout`, :func:`stream_timeout`):

- ``connect_timeout_ms`` (default 5000, at most ``timeout_ms``): to open the
  TCP (and TLS) connection;
- ``first_byte_timeout_ms`` (default ``timeout_ms``): until the response
  headers arrive;
- ``timeout_ms``: the whole non-streamed answer; for a stream, the longest
  silence between two reads once it started (a long completion may stream for
  minutes).

Each has its own message (:class:`UpstreamErrors`), so an operator can tell a
dark host (connect) from a stuck model (first byte) from a slow answer (total).

Which phase timed out also says who is to blame (app/health.py weighs it for
the provider's circuit breaker). A connect or first-byte timeout says the
provider is not answering: UpstreamTimeout. The total running out before the
headers of a non-streamed answer is UpstreamTotalTimeout: most providers send
nothing until such an answer is complete, so it may only mean a long answer.
Once they arrived, the provider is answering and the request is long (a big
generation) or stalled mid-answer: UpstreamBodyTimeout. Neither counts against
the provider (any caller could otherwise open its breaker for every tenant
with requests that are merely long). Reading a body goes through
:attr:`UpstreamErrors.body` (non-streamed) or :attr:`UpstreamErrors.stream_body`.

Size: a non-streamed answer (success or error) is read with :func:`read_body`,
at most ``max_response_bytes`` (per provider, default 32 MiB): a larger one
is a 502 UpstreamTooLarge naming the cap, found without reading it all.

Failure mapping (the contract's error table):

- connect/first-byte/total timeouts -> UpstreamTimeout (504)
- total before the headers (non-streamed) -> UpstreamTotalTimeout (504)
- total/silence after the headers   -> UpstreamBodyTimeout (504)
- an answer over max_response_bytes -> UpstreamTooLarge (502)
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
from typing import Any, Literal, NoReturn

import aiohttp
import msgspec

from gandalf.domain import CANCEL_UPSTREAM_DEADLINE, UPSTREAM_IDS, ProviderConfig
from gandalf.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamBodyTimeout,
    UpstreamClientError,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamTotalTimeout,
)

# Far above anything one worker serves at once; the point is no artificial cap.
CONNECTION_LIMIT = 4096
KEEPALIVE_SECONDS = 75.0
DEFAULT_CONNECT_TIMEOUT_MS = 5000
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024


def _connect_ms(config: ProviderConfig) -> int:
    return min(config.connect_timeout_ms, config.timeout_ms)


def _first_byte_ms(config: ProviderConfig) -> int:
    first = config.first_byte_timeout_ms
    return config.timeout_ms if first is None else first


def request_timeout(config: ProviderConfig) -> aiohttp.ClientTimeout:
    """A non-streamed request: ``timeout_ms`` in all, ``connect_timeout_ms`` to
    connect, and ``first_byte_timeout_ms`` for the headers when it is the
    shorter (aiohttp's ``sock_read``; :func:`headers_arrived` lifts it once
    they came, leaving the body to the total)."""
    total = config.timeout_ms
    first = _first_byte_ms(config)
    return aiohttp.ClientTimeout(
        total=total / 1000.0,
        sock_connect=_connect_ms(config) / 1000.0,
        sock_read=first / 1000.0 if first < total else None,
    )


def stream_timeout(config: ProviderConfig) -> aiohttp.ClientTimeout:
    """For streams ``timeout_ms`` bounds the silence between two reads, not the
    whole answer: a long completion may stream for minutes. The headers get
    ``first_byte_timeout_ms``: when it differs, :func:`headers_arrived` (called
    by :func:`open_event_stream`) switches to ``timeout_ms`` once they came."""
    return aiohttp.ClientTimeout(
        total=None,
        sock_read=_first_byte_ms(config) / 1000.0,
        sock_connect=_connect_ms(config) / 1000.0,
    )


def headers_arrived(resp: aiohttp.ClientResponse, read_timeout: float | None) -> None:
    """From now on, bound the silence between two reads of ``resp`` by
    ``read_timeout`` seconds (None: no bound) instead of the first-byte timeout,
    and restart that clock."""
    connection = resp.connection
    if connection is not None:
        protocol = connection.protocol
        if protocol is not None:
            protocol.read_timeout = read_timeout
            protocol.start_timeout()


class _UpstreamRequest(aiohttp.ClientRequest):
    """Every upstream request, whichever adapter sends it, with the gateway's
    request id (``x-request-id``) and the W3C ``traceparent`` of the request
    being served (domain.UPSTREAM_IDS); an adapter's own value wins."""

    def update_headers(self, headers: Any) -> None:
        super().update_headers(headers)
        ids = UPSTREAM_IDS.get()
        if ids is not None:
            sent = self.headers
            if "x-request-id" not in sent:
                sent["x-request-id"] = ids[0]
            traceparent = ids[1]
            if traceparent is not None and "traceparent" not in sent:
                sent["traceparent"] = traceparent


def new_session(config: ProviderConfig) -> aiohttp.ClientSession:
    """A pooled keep-alive session for one provider. Call inside a running loop."""
    connector = aiohttp.TCPConnector(
        limit=CONNECTION_LIMIT,
        limit_per_host=0,
        keepalive_timeout=KEEPALIVE_SECONDS,
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=request_timeout(config),
        cookie_jar=aiohttp.DummyCookieJar(),
        # No Accept-Encoding: LLM answers are small, and gzip would cost CPU both ways.
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        raise_for_status=False,
        request_class=_UpstreamRequest,
    )


class UpstreamClient:
    """What every adapter that speaks HTTP to its provider holds: the config,
    the error mapping (:class:`UpstreamErrors`), the stream timeout and one
    pooled session, opened by ``start`` in the worker's loop."""

    __slots__ = ("_errors", "_session", "_stream_timeout", "config", "name")

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        self._errors = UpstreamErrors.for_config(config)
        self._stream_timeout = stream_timeout(config)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = new_session(self.config)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _live_session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            raise UpstreamError(f"Provider '{self.name}' is not started.")
        return session


class UpstreamErrors:
    """``with errors:`` turns client exceptions into gateway errors.

    One instance per provider (and one for reading stream bodies,
    :attr:`stream_body`), reused by every request (it holds no state). Build
    it with :meth:`for_config` so timeout messages quote the provider's
    settings; ``UpstreamErrors(name, timeout_ms)`` assumes the defaults for
    the connect and first-byte timeouts.
    """

    __slots__ = (
        "after_headers",
        "body",
        "call_timeout",
        "connect_ms",
        "first_byte_ms",
        "lift_first_byte",
        "max_bytes",
        "provider",
        "stream_body",
        "timeout_ms",
        "timeout_s",
    )

    def __init__(
        self,
        provider: str,
        timeout_ms: int,
        *,
        connect_timeout_ms: int | None = None,
        first_byte_timeout_ms: int | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        streaming: bool = False,
        reading: bool = False,
    ) -> None:
        self.provider = provider
        self.max_bytes = max_response_bytes
        # The response headers came before anything this instance maps: a
        # timeout is the answer's (UpstreamBodyTimeout), not the provider's.
        self.after_headers = streaming or reading
        self.timeout_ms = timeout_ms
        self.timeout_s = timeout_ms / 1000.0
        self.connect_ms = min(
            timeout_ms,
            DEFAULT_CONNECT_TIMEOUT_MS if connect_timeout_ms is None else connect_timeout_ms,
        )
        self.first_byte_ms = timeout_ms if first_byte_timeout_ms is None else first_byte_timeout_ms
        # A non-streamed request bounds its headers by a first-byte timeout
        # shorter than the total (request_timeout): lift it once they came.
        self.lift_first_byte = self.first_byte_ms < timeout_ms
        # What a non-streamed call passes to aiohttp: request_timeout without
        # the total, which the call's own :func:`deadline` enforces.
        self.call_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.connect_ms / 1000.0,
            sock_read=self.first_byte_ms / 1000.0 if self.lift_first_byte else None,
        )
        # Use while reading a stream's body: a read timeout there is silence
        # (timeout_ms), not a missing first byte.
        self.stream_body: UpstreamErrors = self if streaming else self._phase(streaming=True)
        # Use while reading a non-streamed answer's body (read_body does).
        self.body: UpstreamErrors = self if streaming or reading else self._phase(reading=True)

    def _phase(self, *, streaming: bool = False, reading: bool = False) -> UpstreamErrors:
        """The same provider and settings, for a later phase of a request."""
        return UpstreamErrors(
            self.provider,
            self.timeout_ms,
            connect_timeout_ms=self.connect_ms,
            first_byte_timeout_ms=self.first_byte_ms,
            max_response_bytes=self.max_bytes,
            streaming=streaming,
            reading=reading,
        )

    @classmethod
    def for_config(cls, config: ProviderConfig) -> UpstreamErrors:
        return cls(
            config.name,
            config.timeout_ms,
            connect_timeout_ms=config.connect_timeout_ms,
            first_byte_timeout_ms=config.first_byte_timeout_ms,
            max_response_bytes=config.max_response_bytes,
        )

    def timeout_message(self, exc: BaseException) -> str:
        """What timed out, naming the setting that bounded it."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            what = f"connecting (connect_timeout_ms={self.connect_ms})"
        elif isinstance(exc, aiohttp.SocketTimeoutError):
            if self.stream_body is self:
                what = (
                    f"waiting for the stream to continue (timeout_ms={self.timeout_ms} of silence)"
                )
            else:
                what = f"waiting for the first byte (first_byte_timeout_ms={self.first_byte_ms})"
        elif self.after_headers:
            what = f"after timeout_ms={self.timeout_ms} (total), while sending its answer"
        else:
            what = f"after timeout_ms={self.timeout_ms} (total)"
        return f"Upstream provider '{self.provider}' timed out {what}."

    def total_timeout(self) -> UpstreamTimeout:
        """The error for ``timeout_ms`` running out in this phase: before the
        headers UpstreamTotalTimeout, after them UpstreamBodyTimeout."""
        message = self.timeout_message(TimeoutError())
        if self.after_headers:
            return UpstreamBodyTimeout(message)
        return UpstreamTotalTimeout(message)

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
            if self.after_headers:
                raise UpstreamBodyTimeout(self.timeout_message(exc)) from None
            if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.SocketTimeoutError):
                # connect_timeout_ms or first_byte_timeout_ms: the provider did not
                # connect or answer at all within a bound that is not about length.
                raise UpstreamTimeout(self.timeout_message(exc)) from None
            # The total ran out while the answer was being generated.
            raise UpstreamTotalTimeout(self.timeout_message(exc)) from None
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


def deadline(timeout_s: float) -> asyncio.TimerHandle:
    """Arm the total timeout of one non-streamed call made by the current task:
    in ``timeout_s`` seconds the task is cancelled with
    CANCEL_UPSTREAM_DEADLINE. The caller makes the call with
    ``errors.call_timeout`` (no aiohttp total), cancels the handle when the call
    ends (``finally``, before any other await) and turns that cancellation into
    the timeout error with :func:`timed_out`.

    Why not aiohttp's own total: its per-request TimeoutHandle and TimerContext
    (entered around connect, send, headers and each read) cost ~24k
    instructions per call, ~4 % of a proxied chat request (bench/README.md);
    one loop timer costs a fraction of that. The timer can only fire while the
    task waits inside the call, so the cancellation lands there."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    return loop.call_at(loop.time() + timeout_s, task.cancel, CANCEL_UPSTREAM_DEADLINE)


def timed_out(exc: asyncio.CancelledError, errors: UpstreamErrors) -> NoReturn:
    """Re-raise ``exc`` as the timeout error of the phase ``errors`` names when
    it is :func:`deadline`'s cancellation (undone here); as it is when the task
    was cancelled for another reason, or for another reason as well (that
    cancellation goes on)."""
    if exc.args and exc.args[0] == CANCEL_UPSTREAM_DEADLINE:
        task = asyncio.current_task()
        if task is not None and task.uncancel() == 0:
            raise errors.total_timeout() from None
    raise exc


async def read_body(resp: aiohttp.ClientResponse, errors: UpstreamErrors) -> bytes:
    """The whole body of a non-streamed answer whose headers came, mapped with
    ``errors.body``: at most ``errors.max_bytes`` bytes, else UpstreamTooLarge
    (the connection is dropped; no more than the cap plus one read is held)."""
    cap = errors.max_bytes
    with errors.body:
        length = resp.content_length
        if length is not None and length <= cap:
            return await resp.read()  # the common case: the parser stops at the length
        if length is None:
            content = resp.content
            pieces: list[bytes] = []
            size = 0
            while True:
                piece = await content.readany()
                if not piece:
                    return b"".join(pieces)
                size += len(piece)
                if size > cap:
                    break
                pieces.append(piece)
    resp.close()
    raise UpstreamTooLarge(
        f"Upstream provider '{errors.provider}' sent an answer larger than "
        f"max_response_bytes={cap}; it was not relayed."
    )


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
    phase = errors
    timer = deadline(errors.timeout_s)
    try:
        with errors:
            async with session.post(
                url, data=body, headers=headers, timeout=errors.call_timeout
            ) as resp:
                phase = errors.body
                if errors.lift_first_byte:
                    headers_arrived(resp, None)
                data = await read_body(resp, errors)
                status = resp.status
                retry_after = resp.headers.get("Retry-After") if status >= 400 else None
    except asyncio.CancelledError as exc:
        timed_out(exc, phase)
    finally:
        timer.cancel()
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
    phase = errors
    timer = deadline(errors.timeout_s)
    try:
        with errors:
            async with session.get(url, headers=headers, timeout=errors.call_timeout) as resp:
                phase = errors.body
                data = await read_body(resp, errors)
                status = resp.status
    except asyncio.CancelledError as exc:
        timed_out(exc, phase)
    finally:
        timer.cancel()
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
                data = await read_body(resp, errors)
                retry_after = resp.headers.get("Retry-After") if status >= 400 else None
            finally:
                resp.release()
            if status >= 300:
                raise on_error(status, data, retry_after)
            raise UpstreamError(
                f"Upstream provider '{errors.provider}' answered a streaming request with "
                f"'{resp.content_type}' instead of an event stream."
            )
    if read_timeout.sock_read != errors.timeout_s:
        headers_arrived(resp, errors.timeout_s)  # from the first byte on: silence bound
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
