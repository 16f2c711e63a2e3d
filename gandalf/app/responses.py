"""The Responses API (``/v1/responses``) through the request pipeline.

A request goes through the same stages as a chat completion (app/pipeline.py):
the route and its permission check, the governor (rate limits; budgets
reserve from ``max_output_tokens``), ``Failover.serve`` over the route's
targets, one UsageRecord (endpoint ``responses``) with its cost. Per target:

- a provider that serves the Responses API itself (its adapter has a
  ``responses`` relay: type ``openai`` unless ``responses: false``) gets the
  body as the client sent it (the model replaced when the target names
  another), its answer relayed as bytes;
- any other is asked through the chat translation (app/responses_wire.py):
  the request becomes a chat completion body, which the provider's adapter
  carries as it carries chat; the answer (or stream) becomes a Response (or
  the Responses API's events).

Stored responses. ``store`` (true unless the client says false) keeps the
conversation (input items, history included) and the Response in Gandalf's
database, per key, for ``responses.retention``; relayed answers too, so a
conversation started on one provider continues on any other.
``previous_response_id`` is always resolved here: its history is prepended
to the input (for a relayed target the body is rewritten without
``previous_response_id``), and an id that is unknown, expired or another
key's is a 404. GET and DELETE ``/v1/responses/{id}`` read Gandalf's store
only (never the upstream's).

Response cache: none. Every answer of a caching route says
``x-gandalf-cache: bypass`` (a Response carries fresh ids; a continuation
depends on stored state).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec

from gandalf.app.balancer import Slot
from gandalf.app.cache import BYPASS
from gandalf.app.failover import Outcome
from gandalf.app.governance import Ticket
from gandalf.app.health import STREAM_FAILURE_WEIGHTS
from gandalf.app.pipeline import Pipeline
from gandalf.app.proxy import ProxyService
from gandalf.app.requests import decode_chat
from gandalf.app.responses_wire import (
    EventWriter,
    ResponsesRequest,
    chat_body,
    encode,
    from_completion,
    input_items,
    new_id,
    shorten,
)
from gandalf.app.router import RouteEntry
from gandalf.domain import (
    ChatCall,
    ChatStream,
    Identity,
    ProviderReply,
    RelayedResponses,
    ResponsesUpstream,
    StoredResponse,
    Usage,
)
from gandalf.errors import GatewayError, NotFound, StoreUnavailable

__all__ = ["ResponseStore", "ResponsesService", "ResponsesStream"]

logger = logging.getLogger("gandalf")

ENDPOINT = "responses"
# Provider types whose chat API takes ``reasoning_effort``.
_REASONING_TYPES = frozenset({"openai", "azure"})


class ResponseStore(Protocol):
    """Where stored responses live (storage/sqlite.py implements it)."""

    async def save_response(self, stored: StoredResponse) -> None: ...

    async def get_response(self, response_id: str, key_id: str) -> StoredResponse | None: ...

    async def delete_response(self, response_id: str, key_id: str) -> bool: ...


class _Output(msgspec.Struct):
    """What Gandalf reads of a Response it stores: its id and output items
    (any JSON value kept: an upstream's odd output is not Gandalf's to refuse)."""

    output: list[msgspec.Raw] | None = None
    id: str | None = None


_output = msgspec.json.Decoder(_Output)
_items = msgspec.json.Decoder(list[msgspec.Raw])
_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()


_T = TypeVar("_T")


class _Job:
    """One request's facts, shared by every attempt: the decoded request, the
    whole conversation (``items``: the history, then this request's input),
    the body a relayed target gets, the id a translated answer gets."""

    __slots__ = ("_chat", "body", "items", "relay_body", "request", "request_id", "response_id")

    def __init__(
        self,
        request: ResponsesRequest,
        body: bytes,
        items: list[msgspec.Raw],
        relay_body: bytes,
        request_id: str,
    ) -> None:
        self.request = request
        self.body = body
        self.items = items
        self.relay_body = relay_body
        self.request_id = request_id
        self.response_id = new_id("resp_")
        self._chat: dict[bool, bytes] = {}

    def chat(self, slot: Slot) -> ChatCall:
        """The chat call that asks ``slot``'s chat-only provider the same thing."""
        reasoning = slot.provider.config.type in _REASONING_TYPES
        body = self._chat.get(reasoning)
        if body is None:
            body = self._chat[reasoning] = chat_body(self.request, self.items, reasoning=reasoning)
        request = decode_chat(body)
        return ChatCall(
            body=body,
            request=request,
            alias=self.request.model,
            target=slot.target,
            request_id=self.request_id,
        )

    def model(self, slot: Slot) -> str | None:
        model = slot.target.model
        return None if model == self.request.model else model


# Output items whose ``id`` is optional as input: dropped there, since the id
# may be another provider's (or Gandalf's own) and mean nothing upstream.
_ID_OPTIONAL = frozenset({b'"message"', b'"function_call"'})


def _as_input(item: msgspec.Raw) -> msgspec.Raw:
    """A stored output item as the next request's input item."""
    try:
        fields = _fields.decode(item)
    except msgspec.DecodeError:
        return item  # not an object: sent on as it was stored
    kind = fields.get("type")
    if kind is None or bytes(kind) not in _ID_OPTIONAL or "id" not in fields:
        return item
    del fields["id"]
    return msgspec.Raw(_encoder.encode(fields))


def _relay(slot: Slot) -> ResponsesUpstream | None:
    relay: ResponsesUpstream | None = getattr(slot.provider, "responses", None)
    return relay


async def _create(slot: Slot, job: _Job) -> ProviderReply:
    relay = _relay(slot)
    if relay is not None:
        return await relay.create(job.relay_body, job.model(slot))
    reply = await slot.provider.chat(job.chat(slot))
    response = from_completion(job.request, job.response_id, reply.body, reply.usage)
    return ProviderReply(
        body=encode(response),
        usage=reply.usage,
        status=reply.status,
        headers=reply.headers,
        limits_at=reply.limits_at,
    )


class _Translated:
    """A chat stream's events turned into the Responses API's (EventWriter)."""

    __slots__ = ("_stream", "_writer", "headers", "limits_at", "response")

    def __init__(self, stream: ChatStream, writer: EventWriter) -> None:
        self._stream = stream
        self._writer = writer
        self.headers: tuple[tuple[bytes, bytes], ...] = getattr(stream, "headers", ())
        self.limits_at: int = getattr(stream, "limits_at", -1)  # see ProviderReply
        self.response: bytes | None = None

    @property
    def usage(self) -> Usage | None:
        return self._stream.usage

    @property
    def events(self) -> int:
        return self._stream.events

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        writer = self._writer
        yield writer.start()
        async for chunk in self._stream:
            out = writer.feed(chunk)
            if out:
                yield out
        out = writer.finish(self._stream.usage)
        self.response = encode(writer.response)
        yield out

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _open(slot: Slot, job: _Job) -> RelayedResponses:
    relay = _relay(slot)
    if relay is not None:
        return await relay.stream(job.relay_body, job.model(slot))
    stream = await slot.provider.stream(job.chat(slot))
    return _Translated(stream, EventWriter(job.request, job.response_id))


class ResponsesStream:
    """An opened Responses stream, accounted for once when the server closes
    it (as app/proxy.py's RecordedStream), and stored when it completed."""

    __slots__ = ("_done", "_facts", "_owner", "_stream", "headers", "limits_at")

    def __init__(
        self,
        stream: RelayedResponses,
        owner: ResponsesService,
        facts: tuple[Identity, _Job, float, Slot, int, Ticket | None],
    ) -> None:
        self._stream = stream
        self._owner = owner
        self._facts = facts
        self._done = False
        self.headers: tuple[tuple[bytes, bytes], ...] = getattr(stream, "headers", ())
        self.limits_at: int = getattr(stream, "limits_at", -1)  # see ProviderReply

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()

    async def aclose(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        stream = self._stream
        identity, job, started, slot, attempts, ticket = self._facts
        usage = stream.usage
        if usage is None and stream.events:
            usage = Usage(completion_tokens=stream.events, total_tokens=stream.events)
        owner = self._owner
        owner.pipeline.account(
            identity, job.request.model, job.request_id, started, ENDPOINT, slot.name,
            slot.target.model, usage, status, attempts, ticket,
        )  # fmt: skip
        weight = STREAM_FAILURE_WEIGHTS.get(status)
        if weight is not None:
            slot.breaker.record(weight, owner.monotonic())
        await stream.aclose()
        response = stream.response
        if status == 200 and response is not None and job.request.store:
            await owner.save(identity, job, response)


class ResponsesService:
    """``POST /v1/responses`` (answered or streamed), GET and DELETE of stored
    responses. Shares the chat service's routes, pipeline and failover."""

    __slots__ = ("_clock", "_proxy", "_retention", "_store", "monotonic")

    def __init__(
        self,
        proxy: ProxyService,
        store: ResponseStore,
        *,
        retention: float = 30 * 86400.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``retention``: seconds a stored response is kept (0: until deleted)."""
        self._proxy = proxy
        self._store = store
        self._retention = retention
        self._clock = clock
        self.monotonic = monotonic

    @property
    def pipeline(self) -> Pipeline:
        return self._proxy.pipeline

    # ------------------------------------------------------------------ create

    async def _job(
        self, identity: Identity, request: ResponsesRequest, body: bytes, request_id: str
    ) -> _Job:
        """The request's job: ``previous_response_id``'s history loaded (404
        when unknown, expired or another key's) and the relayed body built."""
        items = input_items(request)
        previous = request.previous_response_id
        if previous is None:
            return _Job(request, body, items, body, request_id)
        stored = await self._load(previous, identity.key_id)
        if stored is None:
            raise NotFound(
                f"Previous response with id '{shorten(previous)}' not found.",
                param="previous_response_id",
            )
        try:
            output = _output.decode(stored.response).output or []
        except msgspec.DecodeError:
            output = []  # stored, so it was a JSON object; its output was not a list
        history = [*_items.decode(stored.input), *map(_as_input, output)]
        items = [*history, *items]
        fields = _fields.decode(body)
        fields.pop("previous_response_id", None)
        fields["input"] = msgspec.Raw(_encoder.encode(items))
        return _Job(request, body, items, _encoder.encode(fields), request_id)

    async def _load(self, response_id: str, key_id: str) -> StoredResponse | None:
        try:
            return await self._store.get_response(response_id, key_id)
        except Exception as exc:  # the database did not answer: retrying may help
            logger.warning("reading stored response %s failed: %s", response_id, exc)
            raise _unavailable() from None

    async def save(self, identity: Identity, job: _Job, response: bytes) -> None:
        """Keep ``response`` (a Response object's JSON) and the conversation it
        answered. A failure is logged: the answer was given, only the ability
        to continue from it is lost."""
        try:
            response_id = _output.decode(response).id
        except msgspec.DecodeError:
            response_id = None
        if not response_id:
            return
        now = self._clock()
        stored = StoredResponse(
            id=response_id,
            key_id=identity.key_id,
            created_at=now,
            expires_at=now + self._retention if self._retention > 0 else None,
            input=_encoder.encode(job.items),
            response=response,
        )
        try:
            await self._store.save_response(stored)
        except Exception as exc:  # the store's failure must not turn a served answer into a 500
            logger.warning("storing response %s failed: %s", response_id, exc)

    async def _serve(
        self,
        identity: Identity,
        request: ResponsesRequest,
        body: bytes,
        request_id: str,
        started: float,
        attempt: Callable[[Slot, _Job], Awaitable[_T]],
    ) -> tuple[RouteEntry, _Job, Ticket | None, Outcome[_T]]:
        """The route, the job (history loaded), the governor's ticket and the
        served attempt (``attempt``: :func:`_create` or :func:`_open`) of one
        request. A failure is accounted for (its ticket given back) and raised,
        marked as a cache bypass on a caching route."""
        alias = request.model
        proxy = self._proxy
        pipeline = proxy.pipeline
        ticket: Ticket | None = None
        try:
            entry = pipeline.route(proxy.routes, identity, alias)
        except BaseException as exc:
            pipeline.failed(identity, alias, request_id, started, ENDPOINT, exc, None)
            raise
        try:
            job = await self._job(identity, request, body, request_id)
            if identity.scopes:
                limit = request.max_output_tokens
                ticket = (
                    pipeline.govern(identity, entry, job.relay_body, limit)
                    if pipeline.local
                    else await pipeline.govern_shared(identity, entry, job.relay_body, limit)
                )
            served = await proxy.failover.serve(entry, attempt, job, request_id, self.monotonic())
        except BaseException as exc:
            pipeline.failed(identity, alias, request_id, started, ENDPOINT, exc, ticket)
            if entry.cache is not None and isinstance(exc, GatewayError):
                exc.relayed = (*exc.relayed, BYPASS)
            raise
        return entry, job, ticket, served

    async def create(
        self,
        identity: Identity,
        request: ResponsesRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> Outcome[ProviderReply]:
        """Serve one non-streamed request; the Outcome's reply is the Response."""
        entry, job, ticket, outcome = await self._serve(
            identity, request, body, request_id, started, _create
        )
        reply, slot = outcome.value, outcome.slot
        self._proxy.pipeline.account(
            identity, request.model, request_id, started, ENDPOINT, slot.name, slot.target.model,
            reply.usage, reply.status, outcome.attempts, ticket,
        )  # fmt: skip
        if request.store:
            await self.save(identity, job, reply.body)
        outcome.headers = self._headers(entry.cache is not None, ticket)
        return outcome

    def _headers(self, caching: bool, ticket: Ticket | None) -> tuple[tuple[bytes, bytes], ...]:
        headers = tuple(ticket.headers) if ticket is not None else ()
        if caching:
            self._proxy.pipeline.verdict(BYPASS)
            headers = (*headers, BYPASS)
        return headers

    async def stream(
        self,
        identity: Identity,
        request: ResponsesRequest,
        body: bytes,
        request_id: str,
        started: float,
    ) -> Outcome[ResponsesStream]:
        """Open a streamed request: failures before the upstream accepted it
        fail over, then raise (accounted for); later ones end the stream."""
        entry, job, ticket, opened = await self._serve(
            identity, request, body, request_id, started, _open
        )
        slot, attempts = opened.slot, opened.attempts
        stream = ResponsesStream(
            opened.value, self, (identity, job, started, slot, attempts, ticket)
        )
        return Outcome(stream, slot, attempts, self._headers(entry.cache is not None, ticket))

    # ------------------------------------------------------------------ stored

    async def retrieve(self, identity: Identity, response_id: str) -> bytes:
        """The stored Response ``response_id`` of the caller's key (404 else)."""
        stored = await self._load(response_id, identity.key_id)
        if stored is None:
            raise _not_found(response_id)
        return stored.response

    async def delete(self, identity: Identity, response_id: str) -> bytes:
        """Delete the caller's stored Response ``response_id`` (404 when none);
        the deletion object OpenAI answers."""
        try:
            deleted = await self._store.delete_response(response_id, identity.key_id)
        except Exception as exc:
            logger.warning("deleting stored response %s failed: %s", response_id, exc)
            raise _unavailable() from None
        if not deleted:
            raise _not_found(response_id)
        return _encoder.encode({"id": response_id, "object": "response", "deleted": True})


def _unavailable() -> StoreUnavailable:
    return StoreUnavailable("Stored responses cannot be read right now: try again later.")


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{shorten(response_id)}' not found.", param="response_id")
