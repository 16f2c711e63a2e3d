"""The gateway's error tree. Each class carries its wire identity.

::

    GatewayError                         500 internal_error
    ├── InvalidRequest                   400 invalid_request_error
    │   ├── BodyTooLarge                 413
    │   ├── NotFound                     404
    │   ├── MethodNotAllowed             405
    │   └── ModelNotFound                404 model_not_found
    ├── AuthenticationError              401 invalid_api_key
    ├── PermissionDenied                 403 permission_denied
    ├── RateLimited                      429 rate_limit_exceeded
    ├── ProviderUnavailable              503 provider_unavailable
    ├── NotReady                         503 not_ready (/readyz)
    └── UpstreamError                    502 upstream_error
        ├── UpstreamAuthError            502 upstream_auth_error
        ├── UpstreamTimeout              504 upstream_timeout
        ├── UpstreamOverloaded           503 upstream_overloaded (retry later)
        └── UpstreamClientError          upstream's own 4xx status, body relayed
                                         or translated to OpenAI's shape

Raise these anywhere; the single error boundary in ``server/asgi.py`` turns
them into ``{"error": {...}}`` responses. Anything else becomes a 500 whose
message never includes the exception text.
"""

from __future__ import annotations

import re

import msgspec
import orjson


class GatewayError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Extra response headers (e.g. retry-after)."""
        return ()

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
    where = f" at '{param}'" if param else ""
    return InvalidRequest(f"Invalid request body{where}: {text}.", param=param)


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
        return ((b"allow", self.allow.encode()),)


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
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"retry-after", str(self.retry_after).encode()),)


class ProviderUnavailable(GatewayError):
    status = 503
    type = "provider_unavailable"
    code = "provider_unavailable"


class NotReady(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "not_ready"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code: str | None = "upstream_error"


class UpstreamAuthError(UpstreamError):
    code = "upstream_auth_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


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
            return ((b"retry-after", self.retry_after.encode("latin-1")),)
        return ()


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
            return ((b"retry-after", self.retry_after.encode("latin-1")),)
        return ()

    def body(self) -> bytes:
        if self.raw_body is not None:
            return self.raw_body
        return super().body()


class ConfigError(Exception):
    """A configuration problem, already phrased as ``file: key.path: problem``."""
