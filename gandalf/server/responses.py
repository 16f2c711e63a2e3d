"""The Responses API's endpoints: ``POST /v1/responses`` (answered or
streamed), ``GET`` / ``DELETE /v1/responses/{id}``. Decode -> the service
(app/responses.py) -> encode, as server/handlers.py does for chat; nothing
here is on the chat route."""

from __future__ import annotations

import orjson

from gandalf.app.responses import ResponsesService
from gandalf.app.responses_wire import decode_request
from gandalf.auth.apikey import KeyCache
from gandalf.domain import Permission
from gandalf.errors import GatewayError, NotFound
from gandalf.server.handlers import Endpoint, KeyAuth, ServedHeaders
from gandalf.server.wire import (
    JSON_HEADERS,
    SSE_HEADERS,
    Request,
    Response,
    relay_with_limits,
)

PATH = "/v1/responses"
PREFIX = PATH + "/"


def _error_event(exc: GatewayError) -> bytes:
    """A failure after the stream started, as the Responses API tells it: an
    ``error`` event (the openai SDK raises it as an APIError)."""
    event = {
        "type": "error",
        "code": exc.code,
        "message": exc.message,
        "param": exc.param,
        "sequence_number": 0,
    }
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


class ResponsesApi:
    """The endpoints of ``/v1/responses``."""

    __slots__ = ("_json_served", "_keys", "_service", "_sse_served")

    def __init__(self, service: ResponsesService, keys: KeyCache) -> None:
        self._service = service
        self._keys = keys
        self._json_served = ServedHeaders(JSON_HEADERS)
        self._sse_served = ServedHeaders(SSE_HEADERS)

    def endpoints(self) -> dict[str, Endpoint]:
        call = KeyAuth(self._keys, Permission.CALL_MODELS)
        return {PATH: Endpoint({"POST": self.create}, reads_body=True, auth=call)}

    def prefixes(self) -> list[tuple[str, Endpoint]]:
        call = KeyAuth(self._keys, Permission.CALL_MODELS)
        return [
            (
                PREFIX,
                Endpoint(
                    {"GET": self.retrieve, "DELETE": self.delete}, reads_body=False, auth=call
                ),
            )
        ]

    async def create(self, request: Request) -> Response:
        identity = request.identity
        assert identity is not None
        decoded = decode_request(request.body)
        service = self._service
        if decoded.stream:
            watch = request.watch()
            try:
                opened = await service.stream(
                    identity, decoded, request.body, request.request_id, request.started
                )
            except BaseException:
                if watch is not None:
                    watch.stop()
                raise
            stream = opened.value
            headers = self._sse_served.of(opened.slot.name, opened.attempts)
            if opened.headers:
                limits = relay_with_limits(stream.headers, opened.headers, stream.limits_at)
                headers = (*headers, *limits)
            elif stream.headers:
                headers = (*headers, *stream.headers)
            return Response(
                200, headers=headers, stream=stream, watch=watch, error_event=_error_event
            )
        request.track()
        try:
            outcome = await service.create(
                identity, decoded, request.body, request.request_id, request.started
            )
        finally:
            request.untrack()
        reply = outcome.value
        headers = self._json_served.of(outcome.slot.name, outcome.attempts)
        if outcome.headers:
            limits = relay_with_limits(reply.headers, outcome.headers, reply.limits_at)
            headers = (*headers, *limits)
        elif reply.headers:
            headers = (*headers, *reply.headers)
        return Response(200, reply.body, headers)

    def _id(self, request: Request) -> str:
        response_id = request.path[len(PREFIX) :]
        if not response_id or "/" in response_id:
            raise NotFound(f"Unknown path: {request.path[:200]}")
        return response_id

    async def retrieve(self, request: Request) -> Response:
        identity = request.identity
        assert identity is not None
        return Response(200, await self._service.retrieve(identity, self._id(request)))

    async def delete(self, request: Request) -> Response:
        identity = request.identity
        assert identity is not None
        return Response(200, await self._service.delete(identity, self._id(request)))
