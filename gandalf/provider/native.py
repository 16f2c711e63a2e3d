"""Native passthrough: a provider's own API relayed byte for byte.

Clients that speak Anthropic, Gemini, Azure OpenAI or Ollama natively send
their requests to Gandalf; the app layer decides where they go, and a
:class:`NativeClient` (one per provider of those types) sends them upstream
with the provider's credentials in place of the caller's. Bodies and answers
are not decoded on the way through; only the usage is read out of them, per
wire format (:data:`USAGE_READERS`), from the answer or from the head and tail
of a stream (usage sits in the first and last events of every format here).

Azure OpenAI streams report usage only when asked (``stream_options.
include_usage``): the upstream is always asked, and the extra usage-only
event is dropped from the relayed stream when the client did not ask itself,
so a client cannot make its own usage go unrecorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import msgspec

from gandalf.domain import NativeReply, NativeRequest, ProviderConfig, StreamOptions, Usage
from gandalf.errors import UpstreamAuthError, UpstreamError
from gandalf.provider import transport
from gandalf.provider.openai import replace_model, stream_body
from gandalf.provider.sse import EventParser, EventRelay
from gandalf.provider.usage import (
    usage_from_anthropic,
    usage_from_gemini,
    usage_from_ollama,
    usage_from_openai,
)

# Response headers never relayed: hop-by-hop ones, the framing this server sets
# itself, and cookies (a gateway must not let an upstream set cookies on callers).
_DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "server",
        "set-cookie",
        "alt-svc",
        "x-request-id",
        "via",
    }
)

# Credentials, per wire format: the provider's key goes in the header its API reads.
_CREDENTIAL_HEADER: Mapping[str, str] = {
    "anthropic": "x-api-key",
    "gemini": "x-goog-api-key",
    "azure": "api-key",
    "ollama": "authorization",
}

NATIVE_TYPES = frozenset(_CREDENTIAL_HEADER)

HEAD_BYTES = 8192
TAIL_BYTES = 16384


# --------------------------------------------------------------------------- usage readers

_any = msgspec.json.Decoder()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def anthropic_usage(head: bytes, tail: bytes, streamed: bool) -> Usage | None:
    """Anthropic counts input (and cache reads and writes) in ``message_start``
    and output, cumulatively, in each ``message_delta`` (which may repeat the
    input counts: the latest wins)."""
    if not streamed:
        usage = _decode_dict(head).get("usage")
        if not isinstance(usage, dict):
            return None
        return _anthropic(usage, {})
    start: dict[str, Any] = {}
    latest: dict[str, Any] = {}
    found = False
    for name, data in _events(head):
        if name == b"message_start":
            message = _decode_dict(data).get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                start = usage
                found = True
            break
    for name, data in _events(tail):
        if name == b"message_delta":
            usage = _decode_dict(data).get("usage")
            if isinstance(usage, dict):
                latest.update((k, v) for k, v in usage.items() if _int(v))
                found = True
    return _anthropic(start, latest) if found else None


def _anthropic(start: dict[str, Any], latest: dict[str, Any]) -> Usage:
    """The counts of ``latest`` (a delta's non-zero ones) over ``start``'s."""

    def count(name: str) -> int:
        return _int(latest.get(name)) or _int(start.get(name))

    return usage_from_anthropic(
        count("input_tokens"),
        count("output_tokens"),
        count("cache_read_input_tokens"),
        count("cache_creation_input_tokens"),
    )


def gemini_usage(head: bytes, tail: bytes, streamed: bool) -> Usage | None:
    """Gemini's ``usageMetadata`` is cumulative: the last one counts."""
    data = head if not streamed else tail
    mark = data.rfind(b'"usageMetadata"')
    if mark < 0:
        return None
    meta = _object_after(data, data.find(b"{", mark))
    if meta is None:
        return None
    return usage_from_gemini(
        _int(meta.get("promptTokenCount")),
        _int(meta.get("candidatesTokenCount")),
        _int(meta.get("thoughtsTokenCount")),
        _int(meta.get("cachedContentTokenCount")),
    )


def openai_usage(head: bytes, tail: bytes, streamed: bool) -> Usage | None:
    """OpenAI's format (Azure): ``usage`` in the body, or in the last event that
    carries one (only when the client asked for ``include_usage``)."""
    data = head if not streamed else tail
    mark = data.rfind(b'"usage"')
    if mark < 0:
        return None
    usage = _object_after(data, data.find(b"{", mark))
    if usage is None:
        return None
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    return usage_from_openai(
        _int(usage.get("prompt_tokens")),
        _int(usage.get("completion_tokens")),
        cached=_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0,
        reasoning=_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else 0,
    )


def ollama_usage(head: bytes, tail: bytes, streamed: bool) -> Usage | None:
    """Ollama reports ``prompt_eval_count``/``eval_count`` in its answer, or in
    the last line (``"done": true``) of a streamed one."""
    data = head if not streamed else tail
    lines = data.strip().rsplit(b"\n", 1)
    last = _decode_dict(lines[-1])
    if "prompt_eval_count" not in last and "eval_count" not in last:
        return None
    return usage_from_ollama(_int(last.get("prompt_eval_count")), _int(last.get("eval_count")))


# --------------------------------------------------------------------------- stream ends

# A stream framed by closing the connection that dies mid-way ends like a
# whole one: only its last events tell. An SSE stream of these formats is
# whole when its tail holds the format's last event, or an error event (the
# upstream told the client itself). Gemini: a chunk with ``finishReason`` (or
# a blocked prompt's ``blockReason``, which has no candidate to finish).
_ENDS: Mapping[str, tuple[bytes, ...]] = {
    # The line's end too: inside a JSON string a newline is escaped.
    "anthropic": (
        b"event: message_stop\n",
        b"event: message_stop\r",
        b"event: error\n",
        b"event: error\r",
    ),
    "gemini": (b'"finishReason"', b'"blockReason"', b'{"error"'),
}


def _ended(api: str, content_type: str) -> tuple[bytes, ...] | None:
    """The marks one of which a whole SSE stream of ``api`` ends with; None
    when its end cannot be told (other APIs, JSON arrays: the client's
    parser tells a cut array)."""
    ends = _ENDS.get(api)
    return ends if ends is not None and content_type.startswith("text/event-stream") else None


UsageReader = Callable[[bytes, bytes, bool], "Usage | None"]
USAGE_READERS: Mapping[str, UsageReader] = {
    "anthropic": anthropic_usage,
    "gemini": gemini_usage,
    "azure": openai_usage,
    "ollama": ollama_usage,
}


def _decode_dict(data: bytes) -> dict[str, Any]:
    try:
        value = _any.decode(data)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _events(data: bytes) -> list[tuple[bytes, bytes]]:
    parser = EventParser()
    # Start at an event boundary: a tail may begin inside an event.
    return parser.feed(data) + parser.finish()


def _object_after(data: bytes, start: int) -> dict[str, Any] | None:
    """The JSON object that starts at ``data[start]`` (a ``{``), or None."""
    if start < 0:
        return None
    depth = 0
    in_string = escaped = False
    for i in range(start, len(data)):
        c = data[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                value = _decode_dict(data[start : i + 1])
                return value or None
    return None


# --------------------------------------------------------------------------- the client


class _StreamView(msgspec.Struct):
    """An Azure chat body's usage option (UNSET: no such key, in any spelling)."""

    stream_options: StreamOptions | msgspec.UnsetType | None = msgspec.UNSET


_stream_view = msgspec.json.Decoder(_StreamView)


def _azure_stream(body: bytes) -> tuple[bytes, EventRelay | None]:
    """The Azure stream body that asks for usage, and the relay that reads it
    (dropping the usage-only event unless the client asked for it); the body
    unchanged and no relay when its ``stream_options`` is malformed (the
    upstream refuses it)."""
    try:
        options = _stream_view.decode(body).stream_options
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return body, None
    wants = isinstance(options, StreamOptions) and options.include_usage
    return stream_body(body, options), EventRelay(drop_usage=not wants)


class NativeStream:
    """An upstream stream relayed as it arrives, its head and tail kept for the
    usage reader; with a ``relay`` (OpenAI-format events), the events pass
    through it and the usage is the relay's. Failures raise gateway errors
    (the server tells them in the caller's format)."""

    __slots__ = (
        "_ends",
        "_errors",
        "_head",
        "_provider",
        "_reader",
        "_relay",
        "_resp",
        "_tail",
        "chunks",
    )

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        errors: transport.UpstreamErrors,
        reader: UsageReader,
        relay: EventRelay | None = None,
        ends: tuple[bytes, ...] | None = None,
        provider: str = "",
    ) -> None:
        self._resp = resp
        self._ends = ends  # see _ENDS: the stream is cut unless its tail holds one
        self._provider = provider
        self._errors = errors.stream_body  # a read timeout now is silence, not a first byte
        self._reader = reader
        self._relay = relay
        self._head = bytearray()
        self._tail = bytearray()
        self.chunks = 0

    @property
    def usage(self) -> Usage | None:
        relay = self._relay
        if relay is not None and relay.usage is not None:
            return relay.usage
        return self._reader(bytes(self._head), bytes(self._tail), True)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        resp = self._resp
        head = self._head
        tail = self._tail
        relay = self._relay
        complete = False
        try:
            with self._errors:
                async for chunk in resp.content.iter_any():
                    if relay is not None:
                        chunk = relay.feed(chunk)
                        if not chunk:
                            continue
                    if len(head) < HEAD_BYTES:
                        head += chunk[: HEAD_BYTES - len(head)]
                    tail += chunk
                    if len(tail) > 2 * TAIL_BYTES:
                        del tail[:-TAIL_BYTES]
                    self.chunks += 1
                    yield chunk
            if relay is not None:
                rest = relay.finish()
                if rest:
                    self.chunks += 1
                    yield rest
            ends = self._ends
            if ends is not None and not any(mark in tail for mark in ends):
                raise UpstreamError(
                    f"Upstream provider '{self._provider}' ended the stream before its end "
                    "(the connection closed mid-answer)."
                )
            complete = True
        finally:
            if complete:
                resp.release()
            else:
                resp.close()

    async def aclose(self) -> None:
        self._resp.close()


class NativeClient(transport.UpstreamClient):
    """One provider's native API: its base URL, its credentials, its session."""

    __slots__ = ("_credentials", "base")

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        # Native paths carry their API version (/v1/messages, /v1beta/models/...,
        # /api/chat): a base_url that ends with one must not double it.
        base = config.base_url.rstrip("/")
        for suffix in ("/v1beta", "/v1"):
            base = base.removesuffix(suffix)
        self.base = base
        header = _CREDENTIAL_HEADER.get(config.type, "authorization")
        credentials: dict[str, str] = {}
        if config.api_key:
            secret = config.api_key
            credentials[header] = f"Bearer {secret}" if header == "authorization" else secret
        self._credentials = credentials

    async def send(self, request: NativeRequest) -> NativeReply:
        """Relay ``request``. Upstream answers of any status come back as they
        are (they are in the caller's API already), except 401/403: the
        upstream refused Gandalf's own credentials, which is never the
        caller's fault (UpstreamAuthError)."""
        session = self._live_session()
        reader = USAGE_READERS[request.api]
        headers = {**request.headers, **self._credentials}
        body = request.body
        if request.body_model is not None:
            body = replace_model(body, request.body_model)
        relay = None
        if request.stream and request.api == "azure":
            body, relay = _azure_stream(body)
        url = self.base + request.path
        errors = self._errors
        # A non-streamed call's total timeout is its own timer (transport.deadline).
        timer = None if request.stream else transport.deadline(errors.timeout_s)
        phase = errors
        try:
            with errors:
                if request.stream:
                    resp = await session.request(
                        request.method,
                        url,
                        data=body,
                        headers=headers,
                        timeout=self._stream_timeout,
                    )
                else:
                    resp = await session.request(
                        request.method,
                        url,
                        data=body or None,
                        headers=headers,
                        timeout=errors.call_timeout,
                    )
                    phase = errors.body
                status = resp.status
                # The headers came: from now on the first-byte bound no longer applies.
                if request.stream:
                    transport.headers_arrived(resp, errors.timeout_s)
                elif errors.lift_first_byte:
                    transport.headers_arrived(resp, None)
                relayed = [
                    (lower.encode("latin-1"), value.encode("latin-1"))
                    for name, value in resp.headers.items()
                    if (lower := name.lower()) not in _DROPPED_RESPONSE_HEADERS
                ]
                streaming = request.stream and status < 300
                if not streaming:
                    try:
                        body = await transport.read_body(resp, errors)
                    finally:
                        resp.release()
        except asyncio.CancelledError as exc:
            if timer is None:
                raise
            transport.timed_out(exc, phase)
        finally:
            if timer is not None:
                timer.cancel()
        if status in (401, 403):
            raise UpstreamAuthError(
                f"Upstream provider '{self.name}' rejected the gateway's credentials "
                f"(HTTP {status}); check the provider's api_key."
            )
        if not streaming:
            usage = reader(body, b"", False) if status < 300 else None
            return NativeReply(status, relayed, body, usage=usage)
        ends = _ended(request.api, resp.headers.get("content-type", "").lower())
        stream = NativeStream(resp, self._errors, reader, relay, ends, self.name)
        return NativeReply(status, relayed, stream=stream)
