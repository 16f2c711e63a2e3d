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
        └── UpstreamClientError          upstream's own 4xx status, body relayed

Raise these anywhere; the single error boundary in ``server/asgi.py`` turns
them into ``{"error": {...}}`` responses. Anything else becomes a 500 whose
message never includes the exception text.
"""

from __future__ import annotations

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


class UpstreamClientError(UpstreamError):
    """An upstream 4xx relayed with its own status and (OpenAI-shaped) body."""

    type = "invalid_request_error"
    code = None

    def __init__(
        self,
        message: str,
        *,
        status: int,
        raw_body: bytes | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.raw_body = raw_body
        self.retry_after = retry_after

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
