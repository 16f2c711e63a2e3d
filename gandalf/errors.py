"""The gateway's error tree. Each class carries its wire identity.

::

    GatewayError                         500 internal_error
    ├── InvalidRequest                   400 invalid_request_error
    │   ├── BodyTooLarge                 413
    │   ├── NotFound                     404
    │   ├── MethodNotAllowed             405
    │   ├── RequestTimeout               408 request_timeout (+ connection: close)
    │   ├── IncompleteBody               400 incomplete_body (+ connection: close)
    │   ├── Conflict                     409 conflict (the admin API: read-only or in use)
    │   └── ModelNotFound                404 model_not_found
    ├── AuthenticationError              401 invalid_api_key
    ├── PermissionDenied                 403 permission_denied
    ├── RateLimited                      429 rate_limit_exceeded (+ retry-after)
    ├── QuotaExceeded                    429 insufficient_quota (+ x-should-retry: false)
    ├── ProviderUnavailable              503 provider_unavailable
    │   └── CircuitOpen                  503 circuit_open (+ retry-after)
    ├── NotReady                         503 not_ready (/readyz)
    ├── StoreUnavailable                 503 store_unavailable (a key lookup failed)
    └── UpstreamError                    502 upstream_error
        ├── UpstreamAuthError            502 upstream_auth_error
        ├── UpstreamTimeout              504 upstream_timeout
        │   └── UpstreamBodyTimeout      504 upstream_timeout (after the headers came)
        ├── UpstreamTooLarge             502 upstream_response_too_large
        ├── UpstreamOverloaded           503 upstream_overloaded (retry later)
        └── UpstreamClientError          upstream's own 4xx status, body relayed
                                         or translated to OpenAI's shape

Raise these anywhere; the single error boundary in ``server/core.py`` turns
them into ``{"error": {...}}`` responses, with ``headers()``. An error that
came from an upstream attempt carries ``upstream`` and ``attempts`` (set by the
routing layer), which ``headers()`` turns into ``x-gandalf-provider`` and
``x-gandalf-attempts``, and ``final`` (``x-should-retry: false``). Anything else becomes a 500 whose
message never includes the exception text.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
import orjson

_T = TypeVar("_T")

_CONTROL = bytes(range(32)) + b"\x7f"
_SAFE = bytes.maketrans(_CONTROL, b"?" * len(_CONTROL))


def header_value(text: str) -> bytes:
    """``text`` as a header value that cannot break the header block (a
    provider name from the config, for example): latin-1, controls as '?'."""
    return text.encode("latin-1", "replace").translate(_SAFE)


_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160))}
_ESCAPES[ord("\\")] = "\\\\"


def printable(text: str, limit: int = 200) -> str:
    """``text`` (a client's path, say) cut to ``limit`` characters, with control
    characters and backslashes escaped (``\\x0a``, ``\\\\``), so it cannot
    forge log lines or terminal escapes wherever it is written."""
    return text[:limit].translate(_ESCAPES)


_NO_RETRY = (b"x-should-retry", b"false")


class GatewayError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = "internal_error"
    # Set by the routing layer on errors an upstream attempt produced.
    upstream: str | None = None  # the provider that answered (or failed) last
    upstream_model: str | None = None  # the model it was asked for
    attempts: int = 0  # upstream attempts made for the request
    # The gateway already spent what a retry could do (it made more than one
    # attempt, a retry budget refused one, or no retry can cure the failure):
    # the client is told ``x-should-retry: false``, which the OpenAI and
    # Anthropic SDKs obey, so their own retries do not multiply the gateway's.
    final: bool = False
    # Upstream headers the client may read (rate limits, the upstream's request
    # id), set by an adapter on the error an upstream's answer produced.
    relayed: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Extra response headers (e.g. retry-after), then the routing headers."""
        return self.routing_headers()

    def routing_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """``x-gandalf-provider`` / ``x-gandalf-attempts`` when an upstream was
        tried, the upstream's :attr:`relayed` headers, and ``x-should-retry:
        false`` when the error is :attr:`final`."""
        upstream = self.upstream
        if upstream is None:
            return self.relayed
        served = (
            (b"x-gandalf-provider", header_value(upstream)),
            (b"x-gandalf-attempts", b"%d" % self.attempts),
            *self.relayed,
        )
        return (*served, _NO_RETRY) if self.final else served

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None


_AT = re.compile(r" - at `\$(.*)`$")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")


def invalid_body(exc: msgspec.ValidationError | msgspec.DecodeError) -> InvalidRequest:
    """A 400 naming the offending field, from msgspec's error text."""
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return InvalidRequest(
            "We could not parse the JSON body of your request: it is not valid JSON."
        )
    text = str(exc)
    param: str | None = None
    match = _AT.search(text)
    if match is not None:
        param = match.group(1).lstrip(".") or None
        text = text[: match.start()]
    missing = _MISSING.match(text)
    if missing is not None:
        field = missing.group(1)
        param = f"{param}.{field}" if param else field
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    unknown = _UNKNOWN.match(text)
    if unknown is not None:  # bodies that forbid unknown fields (the admin API's)
        field = unknown.group(1)
        param = f"{param}.{field}" if param else field
        return InvalidRequest(f"Unknown parameter: '{param}'.", param=param)
    where = f" at '{param}'" if param else ""
    return InvalidRequest(f"Invalid request body{where}: {text}.", param=param)


def decode_body(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    """``body`` decoded by ``decoder``: the one way a client's body is decoded.

    Every failure is a 400 (:class:`InvalidRequest`), never a 500: a wrong
    shape names the field, JSON nested deeper than the interpreter's recursion
    limit (msgspec raises RecursionError at ~1,000 levels, for a 2 KB body) is
    refused whole (:func:`decode_error`), and the body must be UTF-8
    throughout (:func:`check_utf8`). The chat hot path inlines these three
    steps (app/requests.py) to save a call.
    """
    try:
        value = decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise decode_error(exc) from None
    if not body.isascii():
        check_utf8(body)
    return value


def decode_error(
    exc: msgspec.ValidationError | msgspec.DecodeError | RecursionError,
) -> InvalidRequest:
    """The 400 for a client body msgspec could not decode."""
    if isinstance(exc, RecursionError):
        return InvalidRequest(
            "We could not parse the JSON body of your request: it is nested too deeply."
        )
    return invalid_body(exc)


def check_utf8(body: bytes) -> None:
    """InvalidRequest unless ``body`` is UTF-8. msgspec skips unknown fields
    and ``msgspec.Raw`` values without checking the UTF-8 inside their strings,
    and those bytes are relayed upstream as they are. ``bytes.decode`` costs
    about 0.5 ns a byte of non-ASCII text (46 us for 100 KB, against 65 us for
    the typed decode itself); callers test ``body.isascii()`` first (about
    0.035 ns a byte, and it stops at the first non-ASCII byte), so ASCII
    bodies, the common case, pay almost nothing (0.14 us for 2 KB)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request: it is not valid UTF-8."
        ) from None


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "body_too_large"


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"allow", self.allow.encode()), *self.routing_headers())


_CLOSE = ((b"connection", b"close"),)


class RequestTimeout(InvalidRequest):
    """The request (its body) did not arrive within ``server.read_timeout``:
    the connection is closed after the answer, the rest of the body unread."""

    status = 408
    code = "request_timeout"

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return _CLOSE


class IncompleteBody(InvalidRequest):
    """The client stopped sending before the body it announced was complete
    (``content-length`` larger than what came): answered, then closed."""

    code = "incomplete_body"

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return _CLOSE


class Conflict(InvalidRequest):
    """The admin API cannot do this to the object as it is: it is declared in the
    config file (read-only over HTTP), still in use, or already exists."""

    status = 409
    code = "conflict"


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_denied"
    code = "permission_denied"


class RateLimited(GatewayError):
    """Too many requests or tokens for a rate limit.

    ``limit``: which dimension refused, ``"requests"`` or ``"tokens"`` (the
    body's ``type``, as OpenAI writes it); None keeps ``rate_limit_exceeded``.
    ``retry_after``: whole seconds until the request would fit (the
    ``retry-after`` header). None: waiting cannot help (a request larger than
    the limit itself): no ``retry-after``, ``x-should-retry: false`` instead.
    """

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, retry_after: int | None = 1, limit: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        if limit is not None:
            self.type = limit
        if retry_after is None:
            self.final = True

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        if self.retry_after is None:
            return _final_headers(self)
        return ((b"retry-after", str(self.retry_after).encode()), *self.routing_headers())


class QuotaExceeded(GatewayError):
    """A budget (USD over a period) is spent: no retry helps before the period
    ends or the budget is raised, so the answer carries ``x-should-retry:
    false`` (OpenAI's own answer for an exhausted quota is this 429)."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    final = True

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return _final_headers(self)


def _final_headers(exc: GatewayError) -> tuple[tuple[bytes, bytes], ...]:
    """The routing headers plus ``x-should-retry: false`` exactly once (the
    routing headers carry it already when an upstream was tried)."""
    served = exc.routing_headers()
    return served if _NO_RETRY in served else (*served, _NO_RETRY)


class ProviderUnavailable(GatewayError):
    status = 503
    type = "provider_unavailable"
    code = "provider_unavailable"


class CircuitOpen(ProviderUnavailable):
    """Every target of the route is skipped because its provider's circuit
    breaker is open (it failed too often lately): nothing was sent upstream."""

    code = "circuit_open"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"retry-after", str(self.retry_after).encode()), *self.routing_headers())


class NotReady(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "not_ready"


class LimitsUnavailable(GatewayError):
    """The shared rate limits and budgets (Redis) did not answer and the
    configured policy is ``redis.on_error: closed``: a limited request is
    refused rather than served unchecked; it may succeed when retried."""

    status = 503
    type = "service_unavailable"
    code = "limits_unavailable"

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"retry-after", b"1"), *self.routing_headers())


class StoreUnavailable(GatewayError):
    """The database did not answer a lookup the request needs (its API key was
    not in the key cache): the request may succeed when retried."""

    status = 503
    type = "service_unavailable"
    code = "store_unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code: str | None = "upstream_error"


class UpstreamAuthError(UpstreamError):
    code = "upstream_auth_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamBodyTimeout(UpstreamTimeout):
    """The upstream sent its response headers, then not the rest of its answer
    in time (``timeout_ms`` in all, or that long a silence in a stream). It is
    answering: the request is long (a big generation) or stalled mid-answer.
    Not evidence that the provider is unhealthy (app/health.py)."""


class UpstreamTotalTimeout(UpstreamTimeout):
    """A non-streamed request used up ``timeout_ms`` in all while the upstream,
    connected, had not answered yet. Most providers send nothing of a
    non-streamed answer until it is complete, so this says the request was long
    as much as that the provider is stuck: it is failed over (a stuck provider's
    callers still reach the next target) but not retried and not counted
    against the provider's health (app/health.py). A first-byte or connect
    timeout is the provider's."""


class UpstreamTooLarge(UpstreamError):
    """The upstream's answer (or one event of its stream) is larger than the
    gateway's cap for it: ``max_response_bytes`` of the provider, or the
    event cap of provider/sse.py. The request asked for too much, so another
    provider would answer as big: no failover, no blame on the provider."""

    code = "upstream_response_too_large"


class UpstreamOverloaded(UpstreamError):
    """The upstream is overloaded or unavailable for now (Anthropic's
    overloaded_error, HTTP 503/529): worth retrying later, elsewhere."""

    status = 503
    code = "upstream_overloaded"

    def __init__(self, message: str, *, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        if self.retry_after:
            return ((b"retry-after", self.retry_after.encode("latin-1")), *self.routing_headers())
        return self.routing_headers()


class UpstreamClientError(UpstreamError):
    """An upstream 4xx relayed with its own status: the upstream's body when it
    is already OpenAI-shaped (``raw_body``), else one built from the message,
    with the error type and code the adapter translated."""

    type = "invalid_request_error"
    code = None

    def __init__(
        self,
        message: str,
        *,
        status: int,
        raw_body: bytes | None = None,
        retry_after: str | None = None,
        error_type: str | None = None,
        error_code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.raw_body = raw_body
        self.retry_after = retry_after
        self.param = param
        if error_type is not None:
            self.type = error_type
        if error_code is not None:
            self.code = error_code

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        if self.retry_after:
            return ((b"retry-after", self.retry_after.encode("latin-1")), *self.routing_headers())
        return self.routing_headers()

    def body(self) -> bytes:
        if self.raw_body is not None:
            return self.raw_body
        return super().body()


class InUse(Exception):
    """An object cannot be deleted while others depend on it (storage raises a
    subclass: ``TenantInUse``); the admin API answers it with a 409."""


class Clash(Exception):
    """A create broke a constraint of the store (the id exists: a concurrent
    create; or what it refers to is gone); the admin API answers a 409."""


class ConfigError(Exception):
    """A configuration problem, already phrased as ``file: key.path: problem``."""
