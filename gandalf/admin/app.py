"""The admin API as a Starlette app, built once per worker.

The server core mounts it under ``/admin/v1`` (``server/mount.py``) after it
authenticated the caller with the worker's key cache (any key that may read
the admin API: admin or viewer); each operation then checks its own
permission (writes: admin). Every error, Starlette's own 404 and 405
included, is written in the OpenAI shape the rest of the gateway uses. Every
write is audited, refused ones too.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gandalf.admin import openapi
from gandalf.admin.resources import OPS, Call, Op, Services, permission_name
from gandalf.domain import AuditEntry, Identity
from gandalf.errors import (
    AuthenticationError,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    decode_body,
    invalid_body,
    printable,
)

logger = logging.getLogger("gandalf.admin")

PREFIX = "/admin/v1"
OPENAPI_PATH = PREFIX + "/openapi.json"
_JSON = "application/json"
_ENCODER = msgspec.json.Encoder()


def _error(exc: GatewayError) -> Response:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in exc.headers()}
    return Response(exc.body(), exc.status, headers, media_type=_JSON)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _error(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path, wrong method) in the OpenAI shape."""
    assert isinstance(exc, HTTPException)
    path = printable(request.url.path)
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return _error(
            MethodNotAllowed(
                f"Method {printable(request.method, 20)} is not allowed on {path}; use {allow}.",
                allow=allow,
            )
        )
    if exc.status_code == 404:
        return _error(NotFound(f"Unknown path: {path}"))
    error = GatewayError(exc.detail if isinstance(exc.detail, str) else "Request refused.")
    error.status = exc.status_code
    error.type = "invalid_request_error"
    error.code = None
    return _error(error)


class _Endpoint:
    """One operation as a Starlette endpoint: permission, decode, call, audit, encode."""

    __slots__ = ("decoder", "op", "services")

    def __init__(self, op: Op, services: Services) -> None:
        self.op = op
        self.services = services
        self.decoder: msgspec.json.Decoder[Any] | None = (
            msgspec.json.Decoder(op.body) if op.body is not None else None
        )

    async def handle(self, request: Request) -> Response:
        op = self.op
        state = request.scope.get("state") or {}
        identity: Identity | None = state.get("identity")
        body: Any = None
        try:
            if identity is None:
                raise AuthenticationError("Missing API key: send 'Authorization: Bearer gnd_...'.")
            if not identity.can(op.needs):
                raise PermissionDenied(
                    f"Keys with role '{identity.role}' cannot {op.method} {op.path}: "
                    f"it needs {permission_name(op.needs)}."
                )
            query: Any = None
            if op.query is not None:
                try:
                    query = msgspec.convert(dict(request.query_params), op.query, strict=False)
                except msgspec.ValidationError as exc:
                    raise invalid_body(exc) from None
            if self.decoder is not None:
                body = decode_body(self.decoder, await request.body())
            result = await op.handler(
                Call(self.services, identity, request.path_params, body, query)
            )
        except GatewayError as exc:
            if op.audit is not None:
                await self._audit(identity, request, body, exc.status, exc.message)
            raise
        if op.audit is not None:
            await self._audit(identity, request, body, op.ok, None, result)
        return Response(_ENCODER.encode(result), op.ok, media_type=_JSON)

    async def _audit(
        self,
        identity: Identity | None,
        request: Request,
        body: Any,
        status: int,
        error: str | None,
        result: Any = None,
    ) -> None:
        """One audit row: who (key id), what (action, resource, id), when, the
        answer's status, the request body (no secrets: a body never carries one;
        a created key's plaintext is in ``result``, never written here)."""
        op = self.op
        params = request.path_params
        resource_id = next(iter(params.values()), None) if params else None
        if resource_id is None and result is not None:
            resource_id = getattr(result, "id", None) or getattr(result, "model_alias", None)
        detail: dict[str, Any] = {}
        if body is not None:
            detail["request"] = msgspec.to_builtins(body)
        if error is not None:
            detail["error"] = error
        services = self.services
        await services.store.record_audit(
            AuditEntry(
                ts=services.clock(),
                actor=None if identity is None else identity.key_id,
                action=op.audit or "",
                resource=op.resource,
                resource_id=resource_id,
                status=status,
                detail=_ENCODER.encode(detail).decode(),
            )
        )


class _Methods:
    """A path's operations by method (HEAD is answered as GET)."""

    __slots__ = ("methods",)

    def __init__(self, methods: dict[str, _Endpoint]) -> None:
        self.methods = methods

    async def handle(self, request: Request) -> Response:
        method = request.method
        return await self.methods["GET" if method == "HEAD" else method].handle(request)


def create_admin_app(services: Services) -> Starlette:
    """The admin API for one worker; ``OPENAPI_PATH`` serves its OpenAPI 3.1
    document (generated once, here, from the operations' types)."""
    document = _ENCODER.encode(openapi.document(OPS, PREFIX))

    async def schema(request: Request) -> Response:
        return Response(document, 200, media_type=_JSON)

    routes = [Route(OPENAPI_PATH, schema, methods=["GET"], include_in_schema=False)]
    # One Starlette route per path, whatever its methods: a 405 then lists
    # every method the path has in ``allow`` (one route per method would
    # list only the first route's).
    paths: dict[str, dict[str, _Endpoint]] = {}
    for op in OPS:
        paths.setdefault(op.path, {})[op.method] = _Endpoint(op, services)
    routes += [
        Route(PREFIX + path, _Methods(methods).handle, methods=list(methods))
        for path, methods in paths.items()
    ]
    return Starlette(
        routes=routes,
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error},
    )
