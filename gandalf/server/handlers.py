"""HTTP handlers: decode -> call a service -> encode. Thin on purpose.

A handler takes a :class:`~gandalf.server.wire.Request` and returns a
:class:`~gandalf.server.wire.Response`; it raises GatewayError subclasses for
every failure and leaves turning them into responses to the error boundary.
"""

from __future__ import annotations

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


def _permitted(identity: Identity, needs: Permission, bits: int) -> Identity:
    """``identity`` if its role has every bit of ``needs``, else PermissionDenied."""
    if identity.permissions & bits != bits:
        what = "call models" if needs is Permission.CALL_MODELS else "list models"
        raise PermissionDenied(f"Keys with role '{identity.role}' cannot {what}.")
    return identity


# Where a request's key may be besides ``Authorization`` / ``x-api-key``: an
# API's own header (Gemini's x-goog-api-key, Azure's api-key) or, for Gemini,
# the ``key`` query parameter. Returns the credential bytes or None.
CredentialFinder = Callable[["Request"], "bytes | None"]


class KeyAuth:
    """How an endpoint authenticates: an API key with permission ``needs``,
    from ``Authorization: Bearer`` or ``x-api-key`` (picked out by the adapter),
    else from ``also`` (an API's own credential header or query parameter).

    The server core calls :meth:`cached` (no await: a dict get) and, on a
    miss, :meth:`load`, before it reads the body: a caller without a valid key
    never gets a byte of its body read.
    """

    __slots__ = ("also", "bits", "keys", "needs")

    def __init__(
        self, keys: KeyCache, needs: Permission, also: CredentialFinder | None = None
    ) -> None:
        self.keys = keys
        self.needs = needs
        self.bits = int(needs)  # IntFlag arithmetic is slow Python
        self.also = also

    def _credentials(self, request: Request) -> tuple[bytes | None, bytes | None]:
        authorization = request.authorization
        api_key = request.api_key
        if authorization is None and api_key is None and self.also is not None:
            api_key = self.also(request)
        return authorization, api_key

    def cached(self, request: Request) -> Identity | None:
        """The identity if the key cache knows the credential, else None.
        Raises AuthenticationError / PermissionDenied for a known bad key."""
        if self.also is None:
            identity = self.keys.from_headers(request.authorization, request.api_key)
        else:
            identity = self.keys.from_headers(*self._credentials(request))
        return None if identity is None else _permitted(identity, self.needs, self.bits)

    async def load(self, request: Request) -> Identity:
        """The identity from the store (a cache miss), or the 401 / 403."""
        identity = await self.keys.load(credential(*self._credentials(request)))
        return _permitted(identity, self.needs, self.bits)


class Endpoint:
    """One path: its handlers by method, whether they read a body, how the
    caller authenticates (``auth``: None for open endpoints like /healthz) and
    how its errors are written (``render``: None for OpenAI's shape; native
    APIs have their own).

    ``pick``: for a path two APIs share (Gemini's ``/v1/models...`` and
    OpenAI's), the other API's endpoint when the request is that API's (from
    its method, path and headers alone: no body is read yet), else None."""

    __slots__ = ("allow", "auth", "methods", "pick", "reads_body", "render")

    def __init__(
        self,
        methods: dict[str, Handler],
        *,
        reads_body: bool,
        render: Callable[[GatewayError], bytes] | None = None,
        auth: KeyAuth | None = None,
    ) -> None:
        self.methods = methods
        self.reads_body = reads_body
        self.render = render
        self.auth = auth
        self.allow = ", ".join(sorted(methods))
        self.pick: Callable[[Request], Endpoint | None] | None = None


class _Model(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: str = "model"


class _ModelList(msgspec.Struct):
    data: list[_Model]
    object: str = "list"


_encoder = msgspec.json.Encoder()
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
        call = KeyAuth(self._keys, Permission.CALL_MODELS)
        read = KeyAuth(self._keys, Permission.READ_MODELS)
        return {
            "/v1/chat/completions": Endpoint(
                {"POST": self.chat_completions}, reads_body=True, auth=call
            ),
            "/v1/embeddings": Endpoint({"POST": self.embeddings}, reads_body=True, auth=call),
            "/v1/models": Endpoint({"GET": self.models}, reads_body=False, auth=read),
            "/healthz": Endpoint({"GET": self.healthz}, reads_body=False),
            "/readyz": Endpoint({"GET": self.readyz}, reads_body=False),
        }

    async def chat_completions(self, request: Request) -> Response:
        identity = request.identity  # authenticated by the core before the body was read
        assert identity is not None
        chat = decode_chat(request.body)
        # Watch for a disconnect from now on: a client that gives up before the
        # answer (or its first byte) must cancel the upstream call too. Neither
        # costs a task or a timer unless the call outlives ``listen_after``.
        if chat.stream:
            watch = request.watch()
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
        request.track()
        try:
            reply = await self._proxy.chat(
                identity, chat, request.body, request.request_id, request.started
            )
        finally:
            request.untrack()
        served = self._json_served
        headers = served.first.get(reply.provider) if reply.attempts == 1 else None
        if headers is None:
            headers = served.build(reply.provider, reply.attempts)
        return Response(200, reply.body, headers)

    async def embeddings(self, request: Request) -> Response:
        identity = request.identity
        assert identity is not None
        embed = decode_embeddings(request.body)
        request.track()
        try:
            reply = await self._proxy.embeddings(
                identity, embed, request.body, request.request_id, request.started
            )
        finally:
            request.untrack()
        served = self._json_served
        headers = served.first.get(reply.provider) if reply.attempts == 1 else None
        if headers is None:
            headers = served.build(reply.provider, reply.attempts)
        return Response(200, reply.body, headers)

    async def models(self, request: Request) -> Response:
        identity = request.identity
        assert identity is not None
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
