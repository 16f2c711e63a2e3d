"""The OpenAI adapter: the body goes upstream as the client sent it.

Only these change on the way out: the model (when the route's target names a
different one), ``stream_options.include_usage`` (always set on streams so
usage can be recorded, decided from the decoded request however the client
spelled the key; the usage-only event is then dropped before the client sees
it unless the client asked for it), and the credentials (the provider's key
replaces the caller's). Answers come back as bytes; only ``usage`` is decoded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import aiohttp
import msgspec

from gandalf.domain import (
    ChatCall,
    EmbeddingsCall,
    LastChunk,
    ProviderConfig,
    ProviderReply,
    StreamOptions,
    Usage,
)
from gandalf.errors import GatewayError, UpstreamError
from gandalf.provider import transport
from gandalf.provider.sse import EventParser, EventRelay
from gandalf.provider.usage import OpenAIUsage


class _UsageOnly(msgspec.Struct):
    usage: OpenAIUsage | None = None


_usage_decoder = msgspec.json.Decoder(_UsageOnly)
_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()
_ZERO = Usage()
_TRUE = msgspec.Raw(b"true")
_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def rewrite_body(body: bytes, *, model: str | None = None, include_usage: bool = False) -> bytes:
    """``body`` with its top-level ``model`` replaced and/or
    ``stream_options.include_usage`` set; every other value keeps its exact
    original bytes (numbers, escapes, unknown fields)."""
    fields = _fields_decoder.decode(body)
    if model is not None:
        fields["model"] = msgspec.Raw(_encoder.encode(model))
    if include_usage:
        raw = fields.get("stream_options")
        options = _fields_decoder.decode(raw) if raw is not None and bytes(raw) != b"null" else {}
        options["include_usage"] = _TRUE
        fields["stream_options"] = msgspec.Raw(_encoder.encode(options))
    return _encoder.encode(fields)


def _one_plain_option(body: bytes) -> bool:
    """Is ``stream_options`` (and ``include_usage``) spelled once, plainly, in
    ``body``? Keys could otherwise hide behind a ``\\u`` escape or repeat, and
    an upstream's parser may resolve repeats otherwise than msgspec did; JSON
    spells those two names either plainly or with ``\\u``, and a string value
    cannot hold the plain spelling without an escaped quote inside, so a false
    answer is never wrong, only a reason to re-encode."""
    return (
        b"\\u" not in body
        and body.count(b'"stream_options"') == 1
        and body.count(b'"include_usage"') == 1
    )


def stream_body(
    body: bytes, options: StreamOptions | msgspec.UnsetType | None, model: str | None = None
) -> bytes:
    """``body`` as sent upstream for a stream: the upstream is always asked for
    usage (``stream_options.include_usage`` true), whatever the client sent,
    decided from the decoded ``options`` (:data:`msgspec.UNSET`: no such key
    in any spelling) rather than from the bytes; ``model`` replaces the
    top-level model when given. Who sees the usage event is the caller's
    business (:class:`~gandalf.provider.sse.EventRelay`'s ``drop_usage``)."""
    if model is None:
        if options is msgspec.UNSET:
            # The common case: splice the option in rather than re-encode the body.
            # The body is a JSON object with members (at least ``stream``) but
            # without this key, so a member and a comma right after its "{" keep
            # it valid.
            brace = body.index(b"{")
            return body[: brace + 1] + _INCLUDE_USAGE + body[brace + 1 :]
        if isinstance(options, StreamOptions) and options.include_usage and _one_plain_option(body):
            return body
    # A rewrite collapses repeated and escaped keys into one plain member.
    return rewrite_body(body, model=model, include_usage=True)


# Upstream response headers relayed to the client, by lower-case name -> the
# name it is relayed as; plus every ``x-ratelimit-*``. The upstream's request id
# becomes ``x-upstream-request-id``: ``x-request-id`` stays Gandalf's own (its
# access log and usage rows are keyed by it, and the SDKs show it as the
# request id), and the provider's is kept for a ticket with the provider.
_RELAYED_HEADERS: dict[bytes, bytes] = {
    b"openai-processing-ms": b"openai-processing-ms",
    b"openai-organization": b"openai-organization",
    b"openai-project": b"openai-project",
    b"openai-version": b"openai-version",
    b"x-request-id": b"x-upstream-request-id",
}
_RATELIMIT = b"x-ratelimit-"
_FIRST_BYTES = frozenset(b"oOxX")  # the first byte of every relayed name, either case
_NOTHING_RELAYED: tuple[tuple[tuple[bytes, bytes], ...], int] = ((), 0)


def relayed_headers(raw: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """The headers of an upstream answer (aiohttp's ``raw_headers``) that the
    client gets too (:data:`_RELAYED_HEADERS`, ``x-ratelimit-*``), as relayed
    (:func:`relayed`'s headers)."""
    return relayed(raw)[0]


def relayed(raw: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[tuple[bytes, bytes], ...], int]:
    """:func:`relayed_headers`, the upstream's ``x-ratelimit-*`` last, and how
    many come before them: a limited caller's answer swaps them for the
    gateway's own by slicing (``ProviderReply.limits_at``), with no look at
    the names per request (server/wire.py's relay_with_limits)."""
    out: list[tuple[bytes, bytes]] | None = None
    limits: list[tuple[bytes, bytes]] | None = None
    get = _RELAYED_HEADERS.get
    first = _FIRST_BYTES
    for name, value in raw:
        if name[0] not in first:  # most headers: one int test, no lower()
            continue
        lower = name.lower()
        renamed = get(lower)
        if renamed is not None:
            if out is None:
                out = []
            out.append((renamed, value))
        elif lower.startswith(_RATELIMIT):
            if limits is None:
                limits = []
            limits.append((lower, value))
    if out is None:
        return _NOTHING_RELAYED if limits is None else (tuple(limits), 0)
    at = len(out)
    if limits is not None:
        out += limits  # one list, one tuple: no more than relaying them unsorted
    return tuple(out), at


def replace_model(body: bytes, model: str) -> bytes:
    return rewrite_body(body, model=model)


def extract_usage(body: bytes) -> Usage | None:
    """The ``usage`` of a completion body (zeros when absent); None when the
    body is not a JSON object at all."""
    try:
        usage = _usage_decoder.decode(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return usage.domain() if usage is not None else _ZERO


class OpenAIChatStream:
    """An accepted upstream stream, relayed event by event (see provider/sse.py)."""

    __slots__ = ("_errors", "_name", "_relay", "_resp", "headers", "limits_at")

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        relay: EventRelay,
        errors: transport.UpstreamErrors,
        name: str,
    ) -> None:
        self._resp = resp
        self._relay = relay
        self._errors = errors
        self._name = name
        # Relayed to the client (limits_at: see ProviderReply).
        self.headers, self.limits_at = relayed(resp.raw_headers)

    @property
    def usage(self) -> Usage | None:
        return self._relay.usage

    @property
    def events(self) -> int:
        return self._relay.events

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        resp = self._resp
        relay = self._relay
        complete = False
        # readany() directly rather than ``async for`` over iter_any(): one
        # coroutine less per read and no StopAsyncIteration raised at the end
        # (b"" is the end of the body either way).
        content = resp.content
        readany = content.readany
        try:
            with self._errors:
                while chunk := await readany():
                    out = relay.feed(chunk)
                    if relay.done and content.at_eof():
                        # [DONE] came and the body ended with this read (the
                        # usual way a short answer arrives): hand the server
                        # the last chunk as such, so that it ends the response
                        # with it rather than with one more (empty) message.
                        rest = relay.finish()
                        if rest:
                            out += rest
                        complete = True
                        if out:
                            yield LastChunk(out)
                        return
                    if out:
                        yield out
            rest = relay.finish()
            if rest:
                yield rest
            if not relay.done:
                raise UpstreamError(
                    f"Upstream provider '{self._name}' ended the stream before [DONE]."
                )
            complete = True
        finally:
            if complete:
                resp.release()  # fully read: the connection goes back to the pool
            else:
                resp.close()  # cut short: drop the connection, the upstream sees it close

    async def aclose(self) -> None:
        self._resp.close()


class OpenAIProvider(transport.UpstreamClient):
    """Any OpenAI-compatible upstream (OpenAI itself, vLLM, the bench mock, ...)."""

    __slots__ = ("_chat_url", "_embeddings_url", "_headers", "responses")

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        base = config.base_url.rstrip("/")
        self._chat_url = base + "/chat/completions"
        self._embeddings_url = base + "/embeddings"
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._headers = headers
        # The Responses API relayed (``responses: true``, the default), or None:
        # Gandalf translates it through chat for this provider.
        # Only type openai: Azure and Ollama reuse this adapter but serve the
        # Responses API elsewhere or not at all.
        relays = config.type == "openai" and config.responses is not False
        self.responses = ResponsesRelay(self) if relays else None

    async def chat(self, call: ChatCall) -> ProviderReply:
        model = call.target.model
        body = call.body if model == call.request.model else rewrite_body(call.body, model=model)
        return await self._post(self._chat_url, body)

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply:
        model = call.target.model
        body = call.body if model == call.request.model else rewrite_body(call.body, model=model)
        return await self._post(self._embeddings_url, body)

    async def get(self, url: str) -> bytes:
        """GET ``url`` with the provider's credentials (model listings)."""
        return await transport.get_json(
            self._live_session(), url, self._headers, self._errors, self._status_error
        )

    def _status_error(self, status: int, body: bytes, retry_after: str | None) -> GatewayError:
        return transport.http_status_error(self.name, status, body, retry_after)

    async def _refuse_stream(self, resp: aiohttp.ClientResponse) -> NoReturn:
        """A streaming request's answer that is an error or not an event stream:
        read and released, then raised as the upstream's error (its
        ``x-ratelimit-*`` relayed) or as an UpstreamError naming what came."""
        status = resp.status
        try:
            data = await transport.read_body(resp, self._errors)
            retry_after = resp.headers.get("Retry-After") if status >= 400 else None
        finally:
            resp.release()
        if status >= 300:
            error = transport.http_status_error(self.name, status, data, retry_after)
            error.relayed = relayed_headers(resp.raw_headers)
            raise error
        raise UpstreamError(
            f"Upstream provider '{self.name}' answered a streaming request with "
            f"'{resp.content_type}' instead of an event stream."
        )

    async def _post(
        self, url: str, body: bytes, usage_of: Callable[[bytes], Usage | None] = extract_usage
    ) -> ProviderReply:
        """POST ``body`` to ``url``; the answer relayed with its usage
        (``usage_of``: chat and embeddings by default, the Responses API's own)."""
        session = self._live_session()
        errors = self._errors
        phase = errors
        timer = transport.deadline(errors.timeout_s)
        try:
            with errors:
                async with session.post(
                    url, data=body, headers=self._headers, timeout=errors.call_timeout
                ) as resp:
                    phase = errors.body
                    if errors.lift_first_byte:
                        transport.headers_arrived(resp, None)
                    data = await transport.read_body(resp, errors)
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After") if status >= 400 else None
                    raw_headers = resp.raw_headers
        except asyncio.CancelledError as exc:
            transport.timed_out(exc, phase)
        finally:
            timer.cancel()
        if status >= 300:
            error = transport.http_status_error(self.name, status, data, retry_after)
            error.relayed = relayed_headers(raw_headers)  # a 429's rate limits, above all
            raise error
        usage = usage_of(data)
        if usage is None:
            raise UpstreamError(
                f"Upstream provider '{self.name}' returned a response that is not a JSON object."
            )
        headers, limits_at = relayed(raw_headers)
        return ProviderReply(
            body=data, usage=usage, status=status, headers=headers, limits_at=limits_at
        )

    async def stream(self, call: ChatCall, url: str | None = None) -> OpenAIChatStream:
        """Open a stream (at ``url``, default the provider's chat URL)."""
        session = self._live_session()
        model = call.target.model
        request = call.request
        wants_usage = request.wants_usage
        body = stream_body(
            call.body, request.stream_options, None if model == request.model else model
        )
        with self._errors:
            resp = await session.post(
                url or self._chat_url,
                data=body,
                headers=self._headers,
                timeout=self._stream_timeout,
            )
            if resp.status >= 300 or not resp.content_type.startswith("text/event-stream"):
                await self._refuse_stream(resp)
        errors = self._errors
        if errors.first_byte_ms != errors.timeout_ms:
            # The stream started: from now on timeout_ms bounds each silence.
            transport.headers_arrived(resp, errors.timeout_s)
        return OpenAIChatStream(
            resp, EventRelay(drop_usage=not wants_usage), errors.stream_body, self.name
        )


# ------------------------------------------------------------- the Responses API, relayed


class _ResponsesUsageIn(msgspec.Struct, gc=False):
    """A Response's ``usage`` (input / output tokens and their details)."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: dict[str, int | None] | None = None
    output_tokens_details: dict[str, int | None] | None = None

    def domain(self) -> Usage:
        details_in = self.input_tokens_details or {}
        details_out = self.output_tokens_details or {}
        return Usage(
            prompt_tokens=self.input_tokens,
            completion_tokens=self.output_tokens,
            total_tokens=self.total_tokens or self.input_tokens + self.output_tokens,
            cached_prompt_tokens=details_in.get("cached_tokens") or 0,
            reasoning_tokens=details_out.get("reasoning_tokens") or 0,
        )


class _ResponseUsageOnly(msgspec.Struct):
    usage: _ResponsesUsageIn | None = None


class _Terminal(msgspec.Struct):
    """A stream event: its ``response`` kept raw (the final one is stored)."""

    type: str = ""
    response: msgspec.Raw = msgspec.Raw(b"null")


_NULL = msgspec.Raw(b"null")
_response_usage = msgspec.json.Decoder(_ResponseUsageOnly)
_terminal = msgspec.json.Decoder(_Terminal)
# The events that end a Responses stream (each carries the whole Response).
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def response_usage(body: bytes) -> Usage | None:
    """The usage of a Response object (zeros when absent); None when ``body``
    is not a JSON object."""
    try:
        usage = _response_usage.decode(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return usage.domain() if usage is not None else _ZERO


class ResponsesRelayStream:
    """An upstream Responses API stream, relayed byte for byte. Its events are
    parsed on the side for the terminal one (``response.completed`` /
    ``incomplete`` / ``failed``): its usage, and the whole Response
    (:attr:`response`, raw JSON) the gateway stores. The upstream closing
    before a terminal event is an UpstreamError."""

    __slots__ = (
        "_errors",
        "_name",
        "_parser",
        "_resp",
        "events",
        "headers",
        "limits_at",
        "response",
        "usage",
    )

    def __init__(
        self, resp: aiohttp.ClientResponse, errors: transport.UpstreamErrors, name: str
    ) -> None:
        self._resp = resp
        self._errors = errors
        self._name = name
        self._parser = EventParser()
        self.headers, self.limits_at = relayed(resp.raw_headers)
        self.usage: Usage | None = None
        self.response: bytes | None = None  # the terminal event's Response
        self.events = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    def _watch(self, events: list[tuple[bytes, bytes]]) -> None:
        for _name, data in events:
            self.events += 1
            if b'"response.' not in data or self.response is not None:
                continue
            try:
                event = _terminal.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if event.type in _TERMINAL and event.response != _NULL:
                self.response = bytes(event.response)
                self.usage = response_usage(self.response)

    async def _iterate(self) -> AsyncIterator[bytes]:
        resp = self._resp
        parser = self._parser
        complete = False
        try:
            with self._errors:
                async for chunk in resp.content.iter_any():
                    self._watch(parser.feed(chunk))
                    yield chunk
            self._watch(parser.finish())
            if self.response is None:
                raise UpstreamError(
                    f"Upstream provider '{self._name}' ended the stream before the response "
                    "completed."
                )
            complete = True
        finally:
            if complete:
                resp.release()
            else:
                resp.close()

    async def aclose(self) -> None:
        self._resp.close()


class ResponsesRelay:
    """What a provider that serves ``/v1/responses`` itself offers: the body
    relayed (the model replaced when the target names another), the answer
    relayed as bytes with its usage read."""

    __slots__ = ("_owner", "_url")

    def __init__(self, owner: OpenAIProvider) -> None:
        self._owner = owner
        self._url = owner.config.base_url.rstrip("/") + "/responses"

    async def create(self, body: bytes, model: str | None) -> ProviderReply:
        if model is not None:
            body = rewrite_body(body, model=model)
        return await self._owner._post(self._url, body, response_usage)

    async def stream(self, body: bytes, model: str | None) -> ResponsesRelayStream:
        owner = self._owner
        if model is not None:
            body = rewrite_body(body, model=model)
        session = owner._live_session()
        errors = owner._errors
        with errors:
            resp = await session.post(
                self._url, data=body, headers=owner._headers, timeout=owner._stream_timeout
            )
            if resp.status >= 300 or not resp.content_type.startswith("text/event-stream"):
                await owner._refuse_stream(resp)
        if errors.first_byte_ms != errors.timeout_ms:
            transport.headers_arrived(resp, errors.timeout_s)
        return ResponsesRelayStream(resp, errors.stream_body, owner.name)
