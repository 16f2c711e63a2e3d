"""HTTP handlers: decode -> call a service -> encode. Thin on purpose.

A handler takes a :class:`~gandalf.server.wire.Request` and returns a
:class:`~gandalf.server.wire.Response`; it raises GatewayError subclasses for
every failure and leaves turning them into responses to the error boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from gandalf.app.proxy import ProxyService
from gandalf.app.requests import decode_chat, decode_embeddings
from gandalf.auth.apikey import KeyCache, credential
from gandalf.domain import Identity, Permission
from gandalf.errors import GatewayError, NotReady, PermissionDenied, header_value
from gandalf.server.wire import (
    HEALTH_OK,
    JSON_HEADERS,
    READY_OK,
    SSE_HEADERS,
    Headers,
    Request,
    Response,
)

Handler = Callable[[Request], Awaitable[Response]]


class Readiness(Protocol):
    """Whatever /readyz asks: storage answers True when it can serve."""

    async def ping(self) -> bool: ...


async def authenticate(
    keys: KeyCache, authorization: bytes | None, api_key: bytes | None, needs: Permission
) -> Identity:
    """The caller's identity (the key cache first, the store on a miss), or
    AuthenticationError; PermissionDenied when its role lacks ``needs``."""
    identity = keys.from_headers(authorization, api_key)
    if identity is None:
        identity = await keys.load(credential(authorization, api_key))
    if not identity.can(needs):
        what = "call models" if needs is Permission.CALL_MODELS else "list models"
        raise PermissionDenied(f"Keys with role '{identity.role}' cannot {what}.")
    return identity


class Endpoint:
    """One path: its handlers by method, whether they read a body, and how its
    errors are written (``render``: None for OpenAI's shape; native APIs have
    their own)."""

    __slots__ = ("allow", "methods", "reads_body", "render")

    def __init__(
        self,
        methods: dict[str, Handler],
        *,
        reads_body: bool,
        render: Callable[[GatewayError], bytes] | None = None,
    ) -> None:
        self.methods = methods
        self.reads_body = reads_body
        self.render = render
        self.allow = ", ".join(sorted(methods))


class _Model(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: str = "model"


class _ModelList(msgspec.Struct):
    data: list[_Model]
    object: str = "list"


_encoder = msgspec.json.Encoder()
_CALL_MODELS = int(Permission.CALL_MODELS)
_MAX_SERVED = 1024  # distinct providers whose prebuilt headers are kept


class ServedHeaders:
    """``base`` headers plus ``x-gandalf-provider`` (who served) and
    ``x-gandalf-attempts`` (how many upstream attempts it took). Answers that
    took one attempt, nearly all of them, get a prebuilt tuple per provider."""

    __slots__ = ("_base", "first")

    def __init__(self, base: Headers) -> None:
        self._base = base
        self.first: dict[str | None, Headers] = {}  # provider -> headers for one attempt

    def build(self, provider: str | None, attempts: int) -> Headers:
        if provider is None:
            return self._base
        headers = (
            *self._base,
            (b"x-gandalf-provider", header_value(provider)),
            (b"x-gandalf-attempts", b"%d" % attempts),
        )
        if attempts == 1 and len(self.first) < _MAX_SERVED:
            self.first[provider] = headers
        return headers


class Api:
    """The endpoints of the public HTTP surface."""

    __slots__ = (
        "_all_models",
        "_json_served",
        "_keys",
        "_models",
        "_proxy",
        "_ready",
        "_sse_served",
    )

    def __init__(
        self, proxy: ProxyService, keys: KeyCache, ready: Readiness, *, created: int = 0
    ) -> None:
        self._proxy = proxy
        self._keys = keys
        self._ready = ready
        # Built once: the route table does not change while it serves.
        self._models = [
            _Model(id=alias, created=created, owned_by=owner)
            for alias, owner in proxy.routes.models()
        ]
        self._all_models = _encoder.encode(_ModelList(data=self._models))
        self._json_served = ServedHeaders(JSON_HEADERS)
        self._sse_served = ServedHeaders(SSE_HEADERS)

    def endpoints(self) -> dict[str, Endpoint]:
        return {
            "/v1/chat/completions": Endpoint({"POST": self.chat_completions}, reads_body=True),
            "/v1/embeddings": Endpoint({"POST": self.embeddings}, reads_body=True),
            "/v1/models": Endpoint({"GET": self.models}, reads_body=False),
            "/healthz": Endpoint({"GET": self.healthz}, reads_body=False),
            "/readyz": Endpoint({"GET": self.readyz}, reads_body=False),
        }

    async def _identity(self, request: Request, needs: Permission) -> Identity:
        return await authenticate(self._keys, request.authorization, request.api_key, needs)

    async def chat_completions(self, request: Request) -> Response:
        identity = self._keys.from_headers(request.authorization, request.api_key)
        if identity is None:
            identity = await self._keys.load(credential(request.authorization, request.api_key))
        if not identity.permissions & _CALL_MODELS:
            raise PermissionDenied(f"Keys with role '{identity.role}' cannot call models.")
        chat = decode_chat(request.body)
        if chat.stream:
            watch = None
            if request.receive is not None and request.streams is not None:
                # Watch for a disconnect from now on: a client that gives up before
                # the first byte must cancel the upstream call too.
                task = asyncio.current_task()
                assert task is not None
                watch = request.streams.watch(request.receive, task)
            try:
                stream = await self._proxy.chat_stream(
                    identity, chat, request.body, request.request_id, request.started
                )
            except BaseException:
                if watch is not None:
                    watch.stop()
                raise
            served = self._sse_served
            headers = served.first.get(stream.provider) if stream.attempts == 1 else None
            if headers is None:
                headers = served.build(stream.provider, stream.attempts)
            return Response(200, headers=headers, stream=stream, watch=watch)
        reply = await self._proxy.chat(
            identity, chat, request.body, request.request_id, request.started
        )
        served = self._json_served
        headers = served.first.get(reply.provider) if reply.attempts == 1 else None
        if headers is None:
            headers = served.build(reply.provider, reply.attempts)
        return Response(200, reply.body, headers)

    async def embeddings(self, request: Request) -> Response:
        identity = await self._identity(request, Permission.CALL_MODELS)
        embed = decode_embeddings(request.body)
        reply = await self._proxy.embeddings(
            identity, embed, request.body, request.request_id, request.started
        )
        served = self._json_served
        headers = served.first.get(reply.provider) if reply.attempts == 1 else None
        if headers is None:
            headers = served.build(reply.provider, reply.attempts)
        return Response(200, reply.body, headers)

    async def models(self, request: Request) -> Response:
        identity = await self._identity(request, Permission.READ_MODELS)
        allowed = identity.allowed_models
        if allowed is None:
            return Response(200, self._all_models)
        return Response(
            200, _encoder.encode(_ModelList(data=[m for m in self._models if m.id in allowed]))
        )

    async def healthz(self, request: Request) -> Response:
        return Response(200, HEALTH_OK)

    async def readyz(self, request: Request) -> Response:
        if await self._ready.ping():
            return Response(200, READY_OK)
        raise NotReady("Not ready: the database does not answer.")
