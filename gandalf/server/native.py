"""Native API endpoints: Anthropic, Gemini, Azure OpenAI and Ollama clients
pointed at Gandalf, answered in their own wire format.

Each API is mounted only when a provider of its type is configured. Gemini is
served under ``/v1beta`` and ``/v1`` (google-genai's default version), the
latter sharing ``/v1/models`` with OpenAI's API (see :meth:`NativeApi.endpoints`). A handler
authenticates the caller (with the credential header that API's clients
send), reads the model from the body or the path, and hands the request to
the PassthroughService, which relays it untouched. Errors raised here are
rendered in the calling API's own error shape, as JSON before the answer
started and in-band (an SSE error event or an NDJSON error line) after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl, quote, urlencode

import msgspec
import orjson

from gandalf.app.passthrough import PassthroughService
from gandalf.auth.apikey import KeyCache
from gandalf.domain import NativeRequest, Permission, Target
from gandalf.errors import GatewayError, NotFound, decode_body, printable
from gandalf.server.handlers import Endpoint, Handler, KeyAuth
from gandalf.server.wire import Request, Response, relay_with_limits

# Request headers relayed upstream, per API; everything else (the caller's
# credentials, cookies, hop-by-hop headers) stays here.
_FORWARDED: dict[str, tuple[bytes, ...]] = {
    "anthropic": (b"content-type", b"accept", b"anthropic-version", b"anthropic-beta"),
    "gemini": (b"content-type", b"accept", b"x-goog-api-client"),
    "azure": (b"content-type", b"accept"),
    "ollama": (b"content-type", b"accept"),
}
_ANTHROPIC_VERSION = "2023-06-01"
# What a native SSE stream silent for ``server.stream_keepalive`` gets, in a
# form that API's clients accept: Anthropic's own ``ping`` event (every
# Anthropic client handles it: Anthropic sends it); Azure an SSE comment (the
# openai SDK parses SSE by the spec). Gemini nothing: google-genai reads a line
# that is neither ``data:`` nor blank as JSON (UnknownApiResponseError),
# litellm's Gemini stream stops at it, and Google sends no keep-alive either.
# Not SSE (Ollama's NDJSON, Gemini's JSON arrays): nothing.
_SSE_KEEPALIVE: dict[str, bool | bytes] = {
    "anthropic": b'event: ping\ndata: {"type": "ping"}\n\n',
    "azure": True,
}


class _ModelBody(msgspec.Struct):
    model: str
    stream: bool | None = None
    # The output-token limit, for the governor's estimate only (any JSON value
    # is accepted: the upstream judges it): Anthropic's ``max_tokens``
    # (required there), Ollama's ``options.num_predict``.
    max_tokens: object = None
    options: object = None


def _limit(value: object) -> int | None:
    """An output-token limit a client gave, if it is a positive integer."""
    return value if type(value) is int and value > 0 else None


def _option(options: object, name: str) -> int | None:
    return _limit(options.get(name)) if type(options) is dict else None


_model_body = msgspec.json.Decoder(_ModelBody)


# --------------------------------------------------------------------------- error shapes

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    408: "DEADLINE_EXCEEDED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def anthropic_error(exc: GatewayError) -> bytes:
    kind = _ANTHROPIC_TYPES.get(exc.status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": exc.message}})


def google_error(exc: GatewayError) -> bytes:
    status = _GOOGLE_STATUS.get(exc.status, "INTERNAL")
    return orjson.dumps({"error": {"code": exc.status, "message": exc.message, "status": status}})


def ollama_error(exc: GatewayError) -> bytes:
    return orjson.dumps({"error": exc.message})


def openai_error(exc: GatewayError) -> bytes:
    return exc.body()


ERROR_BODIES: dict[str, Callable[[GatewayError], bytes]] = {
    "anthropic": anthropic_error,
    "gemini": google_error,
    "azure": openai_error,
    "ollama": ollama_error,
}


def in_band_error(api: str, streamed_as: bytes) -> Callable[[GatewayError], bytes]:
    """How a failure after the first byte is told, by the stream's format."""
    body = ERROR_BODIES[api]
    if streamed_as.startswith(b"text/event-stream"):
        if api == "anthropic":
            return lambda exc: b"event: error\ndata: " + body(exc) + b"\n\n"
        return lambda exc: b"data: " + body(exc) + b"\n\n"
    if api == "ollama":
        return lambda exc: body(exc) + b"\n"
    return lambda exc: b""  # a JSON array cut short: the client's parser tells


# --------------------------------------------------------------------------- helpers


def _gemini_key(request: Request) -> bytes | None:
    """A Gemini client's key: the x-goog-api-key header, else ``?key=``."""
    key = request.header(b"x-goog-api-key")
    return key if key is not None else _query_without_key(request.query)[1]


def _azure_key(request: Request) -> bytes | None:
    return request.header(b"api-key")


def _query_without_key(query: bytes) -> tuple[str, bytes | None]:
    """The query string minus ``key=`` (a Gemini client's credential), and that key."""
    if not query:
        return "", None
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    key = next((v for k, v in pairs if k == "key"), None)
    rest = urlencode([(k, v) for k, v in pairs if k != "key"])
    return ("?" + rest if rest else ""), (key.encode("latin-1") if key is not None else None)


def _relayed_headers(request: Request, api: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in _FORWARDED[api]:
        value = request.header(name)
        if value is not None:
            out[name.decode()] = value.decode("latin-1")
    if api == "anthropic" and "anthropic-version" not in out:
        out["anthropic-version"] = _ANTHROPIC_VERSION
    out.setdefault("content-type", "application/json")
    return out


def _content_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.lower()
    return b""


# --------------------------------------------------------------------------- handlers


class NativeApi:
    """The native endpoints, built once at start-up for the configured APIs."""

    __slots__ = ("_keys", "_service", "created")

    def __init__(self, service: PassthroughService, keys: KeyCache, *, created: int) -> None:
        self._service = service
        self._keys = keys
        self.created = created

    def endpoints(
        self,
        shared: dict[str, Endpoint] | None = None,
        shared_prefixes: Sequence[tuple[str, Endpoint]] = (),
    ) -> tuple[dict[str, Endpoint], list[tuple[str, Endpoint]]]:
        """Exact paths and path prefixes (Gemini and Azure put the model in the
        path) for the APIs some configured provider speaks.

        ``shared`` and ``shared_prefixes``: OpenAI's endpoints. Gemini's ``v1``
        (google-genai's default version) lives under OpenAI's ``/v1/models``:
        OpenAI's ``/v1/models`` (and ``/v1/models/`` prefix, when there is
        one) get a ``pick`` that hands Gemini's requests to Gemini's endpoints.
        A request is Gemini's when it is a POST (``/v1/models/{m}:{method}``;
        OpenAI has no POST there) or carries Google's credential
        (``x-goog-api-key`` or ``?key=``)."""
        apis = self._service.apis()
        exact: dict[str, Endpoint] = {}
        prefixed: list[tuple[str, Endpoint]] = []

        also = {"gemini": _gemini_key, "azure": _azure_key}
        keys = self._keys

        def mount(
            api: str,
            method: str,
            handler: Handler,
            *,
            body: bool = True,
            more: dict[str, Handler] | None = None,
            reads: bool = False,
        ) -> Endpoint:
            # Errors on these paths (a body too large included) in the API's own
            # shape. Calls need CALL_MODELS; reading about models (listing them,
            # ``reads``) READ_MODELS, as on /v1/models. ``more``: other methods.
            needs = Permission.CALL_MODELS if body and not reads else Permission.READ_MODELS
            return Endpoint(
                {method: handler, **(more or {})},
                reads_body=body,
                render=ERROR_BODIES[api],
                auth=KeyAuth(keys, needs, also.get(api)),
                id_header=_ID_HEADERS.get(api),
            )

        def unknown(api: str) -> Endpoint:
            # A path under a mounted API that is none of its endpoints.
            return _not_found(api, _unknown_path)

        fallbacks: list[tuple[str, Endpoint]] = []
        if "anthropic" in apis:
            exact["/v1/messages"] = mount("anthropic", "POST", self.anthropic_messages)
            exact["/v1/messages/count_tokens"] = mount(
                "anthropic", "POST", self.anthropic_count_tokens
            )
            fallbacks.append(("/v1/messages/", unknown("anthropic")))
        if "gemini" in apis:
            models = mount("gemini", "GET", self.gemini_models, body=False)
            call = mount("gemini", "POST", self.gemini_call)
            model = mount("gemini", "GET", self.gemini_model, body=False)
            exact["/v1beta/models"] = models
            # GET /v1beta/models/{m} reads about a model (READ_MODELS), POST calls it.
            v1beta = mount("gemini", "POST", self.gemini_call)
            v1beta.pick = lambda request: model if request.method == "GET" else None
            prefixed.append(("/v1beta/models/", v1beta))
            self._share_v1(models, call, model, shared or {}, shared_prefixes, prefixed)
            fallbacks.append(("/v1beta/", unknown("gemini")))
        if "azure" in apis:
            prefixed.append(("/openai/deployments/", mount("azure", "POST", self.azure_call)))
            fallbacks.append(("/openai/", unknown("azure")))
        if "ollama" in apis:
            for path in ("/api/chat", "/api/generate", "/api/embed"):
                exact[path] = mount("ollama", "POST", self.ollama_call)
            exact["/api/show"] = mount("ollama", "POST", self.ollama_call, reads=True)
            exact["/api/tags"] = mount("ollama", "GET", self.ollama_tags, body=False)
            # Open, as Ollama's own: a constant that clients probe before anything else.
            exact["/api/version"] = Endpoint(
                {"GET": self.ollama_version}, reads_body=False, render=ollama_error
            )
            fallbacks.append(("/api/", unknown("ollama")))
        # An API no enabled provider speaks: its paths answer a 404 in its own
        # shape that says why (a client pointed here, e.g. Claude Code, shows it).
        if "anthropic" not in apis:
            closed = unserved("anthropic")
            exact["/v1/messages"] = closed
            fallbacks.append(("/v1/messages/", closed))  # count_tokens and the rest
        if "gemini" not in apis:
            fallbacks.append(("/v1beta/", unserved("gemini")))
        if "azure" not in apis:
            fallbacks.append(("/openai/", unserved("azure")))
        if "ollama" not in apis:
            fallbacks.append(("/api/", unserved("ollama")))
        return exact, [*prefixed, *fallbacks]

    @staticmethod
    def _share_v1(
        models: Endpoint,
        call: Endpoint,
        model: Endpoint,
        shared: dict[str, Endpoint],
        shared_prefixes: Sequence[tuple[str, Endpoint]],
        prefixed: list[tuple[str, Endpoint]],
    ) -> None:
        def pick_list(request: Request) -> Endpoint | None:
            return models if _google_credential(request) else None

        def pick_item(request: Request) -> Endpoint | None:
            if request.method == "POST":
                return call
            return model if _google_credential(request) else None

        openai_list = shared.get("/v1/models")
        if openai_list is not None:
            openai_list.pick = pick_list
        openai_item = next((e for p, e in shared_prefixes if p == "/v1/models/"), None)
        if openai_item is not None:
            openai_item.pick = pick_item
        else:  # no OpenAI endpoint under /v1/models/: Gemini's, else OpenAI's 404
            unknown = Endpoint({"GET": _unknown_path}, reads_body=False)
            unknown.pick = pick_item
            prefixed.append(("/v1/models/", unknown))

    # ------------------------------------------------------------ common

    async def _relay(
        self,
        request: Request,
        api: str,
        endpoint: str,
        alias: str,
        build: Callable[[Target], NativeRequest],
        stream: bool,
        max_output: int | None = None,
    ) -> Response:
        """Relay through the PassthroughService; ``max_output``: the request's
        output-token limit when its API names one (for the governor's estimate)."""
        identity = request.identity  # authenticated by the core before the body was read
        assert identity is not None
        # Streamed or not, a client that leaves cancels the upstream call (499).
        watch = request.watch() if stream else None
        if not stream:
            request.track()
        try:
            relayed = await self._service.forward(
                identity,
                api,
                alias,
                endpoint,
                build,
                request.request_id,
                request.started,
                request.body,
                max_output,
            )
        except BaseException:
            if watch is not None:
                watch.stop()
            raise
        finally:
            if not stream:
                request.untrack()
        reply, recorded = relayed.reply, relayed.stream
        # The upstream's headers, and the governor's x-ratelimit-* (app/pipeline.py).
        headers = relay_with_limits(reply.headers, relayed.headers)
        if recorded is None:
            if watch is not None:
                watch.stop()
            return Response(reply.status, reply.body, headers)
        streamed_as = _content_type(reply.headers)
        return Response(
            reply.status,
            headers=headers,
            stream=recorded,
            watch=watch,
            error_event=in_band_error(api, streamed_as),
            keepalive=_SSE_KEEPALIVE.get(api, False)
            if streamed_as.startswith(b"text/event-stream")
            else False,
        )

    # ------------------------------------------------------------ anthropic

    async def anthropic_messages(self, request: Request) -> Response:
        return await self._anthropic(request, "/v1/messages", "anthropic.messages")

    async def anthropic_count_tokens(self, request: Request) -> Response:
        return await self._anthropic(request, "/v1/messages/count_tokens", "anthropic.count_tokens")

    async def _anthropic(self, request: Request, path: str, endpoint: str) -> Response:
        body = _decode_model_body(request.body)
        stream = bool(body.stream) and endpoint == "anthropic.messages"
        headers = _relayed_headers(request, "anthropic")
        if request.query:  # e.g. Claude Code's ?beta=true
            path += "?" + request.query.decode("latin-1")

        def build(target: Target) -> NativeRequest:
            return NativeRequest(
                api="anthropic",
                method="POST",
                path=path,
                headers=headers,
                body=request.body,
                stream=stream,
                body_model=target.model if target.model != body.model else None,
            )

        limit = _limit(body.max_tokens)
        return await self._relay(request, "anthropic", endpoint, body.model, build, stream, limit)

    # ------------------------------------------------------------ gemini

    async def gemini_call(self, request: Request) -> Response:
        # /v1beta/models/{m}:{method} or /v1/models/{m}:{method}: relayed to the
        # same API version (v1 refuses some v1beta fields, as Google would).
        version, _, rest = request.path[1:].partition("/models/")
        alias, sep, method = rest.rpartition(":")
        if not sep or not alias or method not in _GEMINI_METHODS:
            raise NotFound(f"Unknown path: {printable(request.path)}")
        # Relayed as is; decoding checks it is JSON, UTF-8, of bounded depth.
        config = decode_body(_gemini_body, request.body).generationConfig
        query, _ = _query_without_key(request.query)
        stream = method == "streamGenerateContent"
        headers = _relayed_headers(request, "gemini")

        def build(target: Target) -> NativeRequest:
            model = target.model.removeprefix("models/")
            body = request.body
            if method == "batchEmbedContents" and model != alias.removeprefix("models/"):
                body = _batch_for(body, model)
            return NativeRequest(
                api="gemini",
                method="POST",
                path=f"/{version}/models/{quote(model, safe='')}:{method}{query}",
                headers=headers,
                body=body,
                stream=stream,
            )

        limit = _option(config, "maxOutputTokens")
        candidates = _option(config, "candidateCount")
        if limit is not None and candidates is not None:
            limit *= candidates  # each candidate may write up to the limit
        return await self._relay(request, "gemini", f"gemini.{method}", alias, build, stream, limit)

    async def gemini_models(self, request: Request) -> Response:
        identity = request.identity
        assert identity is not None
        models = [_gemini_model(alias) for alias in self._service.models(identity, "gemini")]
        return Response(200, orjson.dumps({"models": models}))

    async def gemini_model(self, request: Request) -> Response:
        """``GET /v1beta/models/{model}``, or ``/v1/models/{model}`` with
        Google's credential: one model, in Google's shape; 404 NOT_FOUND for a
        model the caller cannot use through Gemini."""
        identity = request.identity
        assert identity is not None
        alias = request.path[1:].partition("/models/")[2]
        if alias in self._service.models(identity, "gemini"):
            return Response(200, orjson.dumps(_gemini_model(alias)))
        raise NotFound(f"models/{printable(alias)} is not found.")

    # ------------------------------------------------------------ azure

    async def azure_call(self, request: Request) -> Response:
        rest = request.path[len("/openai/deployments/") :]
        alias, sep, operation = rest.partition("/")
        if not sep or not alias or operation not in ("chat/completions", "embeddings"):
            raise NotFound(f"Unknown path: {printable(request.path)}")
        query = "?" + request.query.decode("latin-1") if request.query else ""
        flags = decode_body(_azure_body, request.body)  # embeddings too: relayed, checked first
        stream = operation == "chat/completions" and bool(flags.stream)
        headers = _relayed_headers(request, "azure")
        endpoint = "azure.chat" if operation == "chat/completions" else "azure.embeddings"

        def build(target: Target) -> NativeRequest:
            return NativeRequest(
                api="azure",
                method="POST",
                path=f"/openai/deployments/{quote(target.model, safe='')}/{operation}{query}",
                headers=headers,
                body=request.body,
                stream=stream,
            )

        limit = _limit(flags.max_completion_tokens) or _limit(flags.max_tokens)
        choices = _limit(flags.n)
        if limit is not None and choices is not None:
            limit *= choices  # each choice may write up to the limit
        return await self._relay(request, "azure", endpoint, alias, build, stream, limit)

    # ------------------------------------------------------------ ollama

    async def ollama_call(self, request: Request) -> Response:
        body = _decode_model_body(request.body)
        path = request.path
        # Ollama streams chat and generate unless told not to; embed and show never do.
        stream = path in _OLLAMA_STREAMED and body.stream is not False
        headers = _relayed_headers(request, "ollama")

        def build(target: Target) -> NativeRequest:
            return NativeRequest(
                api="ollama",
                method="POST",
                path=path,
                headers=headers,
                body=request.body,
                stream=stream,
                body_model=target.model if target.model != body.model else None,
            )

        endpoint = "ollama." + path.rsplit("/", 1)[1]
        limit = _option(body.options, "num_predict")
        return await self._relay(request, "ollama", endpoint, body.model, build, stream, limit)

    async def ollama_version(self, request: Request) -> Response:
        return Response(200, _OLLAMA_VERSION_BODY)

    async def ollama_tags(self, request: Request) -> Response:
        identity = request.identity
        assert identity is not None
        modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        models = [
            {"name": alias, "model": alias, "modified_at": modified, "size": 0, "digest": ""}
            for alias in self._service.models(identity, "ollama")
        ]
        return Response(200, orjson.dumps({"models": models}))


_GEMINI_METHODS = frozenset(
    {
        "generateContent",
        "streamGenerateContent",
        "embedContent",
        "batchEmbedContents",  # google-genai's embed_content and litellm always use it
        "countTokens",
    }
)
_GEMINI_METHOD_LIST = sorted(_GEMINI_METHODS)


def _gemini_model(alias: str) -> dict[str, object]:
    """A model in Google's shape (``models.get`` / ``models.list``)."""
    return {
        "name": f"models/{alias}",
        "displayName": alias,
        "supportedGenerationMethods": _GEMINI_METHOD_LIST,
    }


_OLLAMA_STREAMED = frozenset({"/api/chat", "/api/generate"})
# The Ollama API level Gandalf's relay speaks (/api/embed, /api/show with
# capabilities): what /api/version answers, for clients that gate features on it.
OLLAMA_API_VERSION = "0.6.0"
_OLLAMA_VERSION_BODY = orjson.dumps({"version": OLLAMA_API_VERSION})
# Headers repeating the request id on the errors Gandalf writes: Anthropic's
# SDK reads ``request-id`` (``APIStatusError.request_id``).
_ID_HEADERS = {"anthropic": b"request-id"}
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


async def _unknown_path(request: Request) -> Response:
    raise NotFound(f"Unknown path: {printable(request.path)}")


# The provider type serving each native API, and the API's name in messages.
_API_NAMES = {
    "anthropic": "Anthropic's Messages API",
    "gemini": "Google's Gemini API",
    "azure": "The Azure OpenAI API",
    "ollama": "Ollama's API",
}


def unserved(api: str) -> Endpoint:
    """The paths of a native API that no enabled provider speaks: a 404 in
    that API's shape naming the provider type that would serve it (before
    any key check, as for any unknown path)."""
    message = (
        f"{_API_NAMES[api]} is not served here: no enabled provider of type {api!r} is "
        f"configured (one whose API key is unset is disabled)."
    )

    async def refuse(request: Request) -> Response:
        raise NotFound(f"Unknown path: {printable(request.path)}. {message}")

    return _not_found(api, refuse)


def _not_found(api: str, handler: Handler) -> Endpoint:
    """Every method of a path answered by ``handler`` (a 404) in ``api``'s
    error shape, with no body read and before any key check, as for any
    unknown path."""
    return Endpoint(
        dict.fromkeys(_METHODS, handler),
        reads_body=False,
        render=ERROR_BODIES[api],
        id_header=_ID_HEADERS.get(api),
    )


def _batch_for(body: bytes, model: str) -> bytes:
    """A ``batchEmbedContents`` body whose requests name ``models/<model>``:
    Gemini refuses requests whose ``model`` differs from the path's, and the
    client named the alias."""
    payload = orjson.loads(body)  # a JSON object: checked before
    requests = payload.get("requests")
    if not isinstance(requests, list):
        return body  # malformed: the upstream says so in its own words
    name = f"models/{model}"
    for item in requests:
        if isinstance(item, dict) and "model" in item:
            item["model"] = name
    return orjson.dumps(payload)


def _google_credential(request: Request) -> bool:
    """Whether the request carries Google's credential (a Gemini client's)."""
    return request.header(b"x-goog-api-key") is not None or (
        b"key=" in request.query and _query_without_key(request.query)[1] is not None
    )


class _AzureBody(msgspec.Struct):
    stream: bool | None = None
    # Output-token limits, for the governor's estimate only (any JSON value).
    max_tokens: object = None
    max_completion_tokens: object = None
    n: object = None  # choices: the limits are per choice


_azure_body = msgspec.json.Decoder(_AzureBody)


class _GeminiBody(msgspec.Struct):
    """Any JSON object; ``generationConfig.maxOutputTokens`` is read for the
    governor's estimate."""

    generationConfig: object = None  # Google's spelling


_gemini_body = msgspec.json.Decoder(_GeminiBody)


def _decode_model_body(body: bytes) -> _ModelBody:
    return decode_body(_model_body, body)
