"""HTTP handlers: decode -> call a service -> encode. Thin on purpose.

A handler takes a :class:`~gandalf.server.wire.Request` and returns a
:class:`~gandalf.server.wire.Response`; it raises GatewayError subclasses for
every failure and leaves turning them into responses to the error boundary.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec
import orjson

from gandalf.app.cache import CACHE_HEADER, cache_control
from gandalf.app.failover import Outcome
from gandalf.app.proxy import ProxyService
from gandalf.app.requests import decode_chat, decode_embeddings
from gandalf.auth.apikey import KeyCache
from gandalf.domain import Identity, Permission, ProviderReply
from gandalf.errors import GatewayError, ModelNotFound, NotReady, PermissionDenied, header_value
from gandalf.observability.metrics import Metrics
from gandalf.server.wire import (
    HEALTH_OK,
    JSON_CT,
    JSON_HEADERS,
    READY_OK,
    SSE_HEADERS,
    Headers,
    Request,
    Response,
    relay_with_limits,
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
        if identity is None:
            return None
        bits = self.bits
        if identity.permissions & bits == bits:  # _permitted's test, without its call
            return identity
        return _permitted(identity, self.needs, bits)  # raises PermissionDenied

    async def load(self, request: Request) -> Identity:
        """The identity from the store (a cache miss), or the 401 / 403."""
        identity = await self.keys.authenticate(*self._credentials(request))
        return _permitted(identity, self.needs, self.bits)


class Endpoint:
    """One path: its handlers by method, whether they read a body, how the
    caller authenticates (``auth``: None for open endpoints like /healthz) and
    how its errors are written (``render``: None for OpenAI's shape; native
    APIs have their own; ``id_header``: a header that repeats the request id
    on the errors Gandalf writes, as Anthropic's ``request-id``).

    ``pick``: for a path two APIs share (Gemini's ``/v1/models...`` and
    OpenAI's), the other API's endpoint when the request is that API's (from
    its method, path and headers alone: no body is read yet), else None."""

    __slots__ = ("allow", "auth", "id_header", "methods", "pick", "reads_body", "render")

    def __init__(
        self,
        methods: dict[str, Handler],
        *,
        reads_body: bool,
        render: Callable[[GatewayError], bytes] | None = None,
        auth: KeyAuth | None = None,
        id_header: bytes | None = None,
    ) -> None:
        self.methods = methods
        self.reads_body = reads_body
        self.render = render
        self.auth = auth
        self.id_header = id_header
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


class _AnthropicModel(msgspec.Struct):
    """A model in Anthropic's shape (``GET /v1/models`` of the Anthropic API)."""

    id: str
    display_name: str
    created_at: str  # RFC 3339
    type: str = "model"


class _AnthropicModelList(msgspec.Struct):
    data: list[_AnthropicModel]
    has_more: bool
    first_id: str | None
    last_id: str | None


def _anthropic_list(models: list[_AnthropicModel]) -> bytes:
    return _encoder.encode(
        _AnthropicModelList(
            data=models,
            has_more=False,  # every model in one page: the SDKs stop paginating
            first_id=models[0].id if models else None,
            last_id=models[-1].id if models else None,
        )
    )


def anthropic_client(request: Request) -> bool:
    """Does ``request`` come from an Anthropic client? Anthropic's API refuses
    calls without ``anthropic-version``, so every Anthropic client sends it
    (Claude Code with a bearer token too). ``x-api-key`` alone is no sign:
    Gandalf takes it on OpenAI's paths as well, from OpenAI-shaped clients."""
    return request.header(b"anthropic-version") is not None


def _anthropic_headers(request: Request) -> Headers:
    """JSON headers plus ``request-id`` (the SDK's ``request_id``), as on
    Anthropic's own answers."""
    return (JSON_CT, (b"request-id", request.request_id.encode("latin-1")))


_ANTHROPIC_NOT_FOUND = b'{"type":"error","error":{"type":"not_found_error","message":'


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

    def of(self, provider: str, attempts: int) -> Headers:
        """:meth:`build`, prebuilt when it took one attempt (a dict get)."""
        headers = self.first.get(provider) if attempts == 1 else None
        return headers if headers is not None else self.build(provider, attempts)


def _served(served: ServedHeaders, outcome: Outcome[ProviderReply]) -> Response:
    """A non-streamed answer: its body, who served it, the upstream's relayed
    headers and the pipeline's (the governor's x-ratelimit-*)."""
    reply = outcome.value
    attempts = outcome.attempts
    headers = served.first.get(outcome.slot.name) if attempts == 1 else None
    if headers is None:
        headers = served.build(outcome.slot.name, attempts)
    if outcome.headers:  # the governor's x-ratelimit-* (app/pipeline.py)
        limits = outcome.headers
        relayed = reply.headers
        if not relayed:
            headers = (*headers, *limits)
        elif limits[0][0] == CACHE_HEADER:  # the cache's label alone: the upstream's stay
            headers = (*headers, *relayed, *limits)
        elif reply.limits_at >= 0:  # relay_with_limits, written out for its commonest case
            headers = (*headers, *relayed[: reply.limits_at], *limits)
        else:
            headers = (*headers, *relay_with_limits(relayed, limits))
    elif reply.headers:  # the upstream's rate limits and request id (openai.py)
        headers = (*headers, *reply.headers)
    return Response(200, reply.body, headers)


class Api:
    """The endpoints of the public HTTP surface."""

    __slots__ = (
        "_all_anthropic",
        "_all_models",
        "_anthropic",
        "_by_id",
        "_created",
        "_json_served",
        "_keys",
        "_models",
        "_proxy",
        "_ready",
        "_sse_served",
        "_table",
    )

    def __init__(
        self, proxy: ProxyService, keys: KeyCache, ready: Readiness, *, created: int = 0
    ) -> None:
        self._proxy = proxy
        self._keys = keys
        self._ready = ready
        self._created = created
        self._table = proxy.routes
        self._list_models()
        self._json_served = ServedHeaders(JSON_HEADERS)
        self._sse_served = ServedHeaders(SSE_HEADERS)

    def _list_models(self) -> None:
        """The model lists, built once per route table (``self._table``)."""
        created = self._created
        self._models = [
            _Model(id=alias, created=created, owned_by=owner)
            for alias, owner in self._table.models()
        ]
        self._all_models = _encoder.encode(_ModelList(data=self._models))
        self._by_id = {m.id: m for m in self._models}
        created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
        self._anthropic = {
            m.id: _AnthropicModel(id=m.id, display_name=m.id, created_at=created_at)
            for m in self._models
        }
        self._all_anthropic = _anthropic_list(list(self._anthropic.values()))

    def _fresh(self) -> None:
        """Rebuild the lists when the proxy serves a new route table (an
        admin change, app/live.py swaps it whole)."""
        routes = self._proxy.routes
        if routes is not self._table:
            self._table = routes
            self._list_models()

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

    def prefixes(self) -> list[tuple[str, Endpoint]]:
        """Paths that carry a value: ``/v1/models/{id}`` (the SDKs' ``models.retrieve``)."""
        read = KeyAuth(self._keys, Permission.READ_MODELS)
        return [("/v1/models/", Endpoint({"GET": self.model}, reads_body=False, auth=read))]

    async def chat_completions(self, request: Request) -> Response:
        identity = request.identity  # authenticated by the core before the body was read
        assert identity is not None
        chat = decode_chat(request.body)
        control = (
            cache_control(request.header(b"cache-control")) if self._proxy.routes.caching else 0
        )
        # Watch for a disconnect from now on: a client that gives up before the
        # answer (or its first byte) must cancel the upstream call too. Neither
        # costs a task or a timer unless the call outlives ``listen_after``.
        if chat.stream:
            watch = request.watch()
            try:
                opened = await self._proxy.chat_stream(
                    identity, chat, request.body, request.request_id, request.started, control
                )
            except BaseException:
                if watch is not None:
                    watch.stop()
                raise
            stream = opened.value
            headers = self._sse_served.of(opened.slot.name, opened.attempts)
            if opened.headers:  # the governor's x-ratelimit-* (app/pipeline.py)
                limits = relay_with_limits(stream.headers, opened.headers, stream.limits_at)
                headers = (*headers, *limits)
            elif stream.headers:  # the upstream's rate limits and request id (openai.py)
                headers = (*headers, *stream.headers)
            return Response(200, headers=headers, stream=stream, watch=watch)
        request.track()
        try:
            outcome = await self._proxy.chat(
                identity, chat, request.body, request.request_id, request.started, control
            )
        finally:
            request.untrack()
        return _served(self._json_served, outcome)

    async def embeddings(self, request: Request) -> Response:
        identity = request.identity
        assert identity is not None
        embed = decode_embeddings(request.body)
        control = (
            cache_control(request.header(b"cache-control")) if self._proxy.routes.caching else 0
        )
        request.track()
        try:
            outcome = await self._proxy.embeddings(
                identity, embed, request.body, request.request_id, request.started, control
            )
        finally:
            request.untrack()
        return _served(self._json_served, outcome)

    async def models(self, request: Request) -> Response:
        """The models the key may call: in Anthropic's list shape for an
        Anthropic client (:func:`anthropic_client`), else in OpenAI's."""
        identity = request.identity
        assert identity is not None
        self._fresh()
        unrestricted = identity.allowed_models is None
        may_use = identity.may_use  # allowed_models may hold globs: ask, never test membership
        if anthropic_client(request):
            headers = _anthropic_headers(request)
            if unrestricted:
                return Response(200, self._all_anthropic, headers)
            return Response(
                200,
                _anthropic_list([m for a, m in self._anthropic.items() if may_use(a)]),
                headers,
            )
        if unrestricted:
            return Response(200, self._all_models)
        return Response(
            200, _encoder.encode(_ModelList(data=[m for m in self._models if may_use(m.id)]))
        )

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{id}``: one model, in OpenAI's or (for an Anthropic
        client) Anthropic's shape; 404 ``model_not_found`` when there is no such
        model or the key may not use it (the two are not told apart)."""
        identity = request.identity
        assert identity is not None
        alias = request.path[len("/v1/models/") :]
        anthropic = anthropic_client(request)
        self._fresh()
        found = self._anthropic.get(alias) if identity.may_use(alias) else None
        if found is None:
            error = ModelNotFound(
                f"The model '{alias}' does not exist or you do not have access to it.",
                param="model",
            )
            if anthropic:
                return Response(
                    404,
                    _ANTHROPIC_NOT_FOUND + orjson.dumps(error.message) + b"}}",
                    _anthropic_headers(request),
                )
            raise error
        if anthropic:
            return Response(200, _encoder.encode(found), _anthropic_headers(request))
        return Response(200, _encoder.encode(self._by_id[alias]))

    async def healthz(self, request: Request) -> Response:
        return Response(200, HEALTH_OK)

    async def readyz(self, request: Request) -> Response:
        if await self._ready.ping():
            return Response(200, READY_OK)
        raise NotReady("Not ready: the database does not answer.")


METRICS_HEADERS: Headers = ((b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),)


def metrics_endpoint(metrics: Metrics) -> Endpoint:
    """``GET /metrics``: every worker's metrics merged, in Prometheus text format.
    Open, like /healthz (the contract: bind it privately)."""

    async def scrape(request: Request) -> Response:
        return Response(200, metrics.exposition(), METRICS_HEADERS)

    return Endpoint({"GET": scrape}, reads_body=False)
