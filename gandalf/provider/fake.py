"""The fake provider: answers locally, deterministically, with no network.

It echoes the last user message back and estimates usage at ~4 characters a
token, so demos, tests, sidecar smoke tests and the bench all work out of the
box. ``latency_ms`` simulates upstream latency; ``ttft_ms`` and
``tokens_per_second`` pace a stream; ``errors`` (domain.FakeErrors) injects
429s, 5xx and timeouts on purpose, for testing a client's retries.

It runs on the gateway's event loop, so it bounds its own work per request
whatever the gateway let through: a reply is at most :data:`MAX_REPLY_TOKENS`
tokens (fewer when the request's ``max_completion_tokens``/``max_tokens`` says
so), and an embeddings request computes at most :data:`MAX_EMBEDDING_VALUES`
numbers (inputs x dimensions; more is a 400 naming ``dimensions``), yielding
to the loop between vectors.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import random
import struct
import time
from collections.abc import AsyncIterator

import msgspec

from gandalf.domain import (
    ChatCall,
    ChatMessage,
    EmbeddingsCall,
    FakeErrors,
    ProviderConfig,
    ProviderReply,
    Usage,
)
from gandalf.errors import (
    InvalidRequest,
    UpstreamClientError,
    UpstreamError,
    UpstreamTimeout,
)

MAX_REPLY_TOKENS = 4096  # ~16 KiB of echoed text: at most 4,096 stream events
MAX_EMBEDDING_VALUES = 131_072  # inputs x dimensions: ~50 ms of work
_MAX_REPLY_CHARS = MAX_REPLY_TOKENS * 4  # built once: no int per request
_VECTORS_PER_SLICE = 16  # embeddings computed between two yields to the event loop

_any = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
FINGERPRINT = "fp_gandalf_fake"


class _Message(msgspec.Struct):
    role: str
    content: str
    refusal: None = None  # OpenAI's document: present, null when the model did not refuse


class _Choice(msgspec.Struct):
    index: int
    message: _Message
    logprobs: None
    finish_reason: str


class _WireUsage(msgspec.Struct):
    """OpenAI's usage object: the three counts the fake knows."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _wire(usage: Usage) -> _WireUsage:
    return _WireUsage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


class _Completion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[_Choice]
    usage: _WireUsage
    system_fingerprint: str = FINGERPRINT  # a string in OpenAI's document, never null


def content_text(raw: msgspec.Raw) -> str:
    """The text of a message's content: a string, or the text parts of a list
    ("" when it cannot be read; the gateway validated the body already, but
    this decode runs deeper in the stack)."""
    try:
        value = _any.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            part.get("text", "")
            for part in value
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def estimate_tokens(chars: int) -> int:
    return (chars + 3) // 4 if chars else 0


def reply_text(messages: list[ChatMessage], limit: int | None = None) -> str:
    """The last user message's text, cut to ``limit`` tokens (at most
    :data:`MAX_REPLY_TOKENS`) of ~4 characters."""
    chars = _MAX_REPLY_CHARS if limit is None else min(limit, MAX_REPLY_TOKENS) * 4
    for message in reversed(messages):
        if message.role == "user":
            return content_text(message.content)[:chars]
    return ""


def prompt_chars(messages: list[ChatMessage]) -> int:
    return sum(len(message.content) for message in messages)


def text_pieces(text: str) -> list[str]:
    """The reply cut into ~4-character "tokens", as many as the usage estimate counts."""
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def input_texts(raw: msgspec.Raw) -> list[str]:
    """An embeddings ``input`` as strings: a string, strings, or token arrays."""
    value = _any.decode(raw)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        return [
            v if isinstance(v, str) else " ".join(map(str, v)) if isinstance(v, list) else str(v)
            for v in value
        ]
    return [str(value)]


def fake_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``text``: the same input, the same vector."""
    seed = hashlib.sha256(text.encode()).digest()
    raw = b"".join(
        hashlib.blake2b(seed + i.to_bytes(4, "little"), digest_size=64).digest()
        for i in range((dimensions * 4 + 63) // 64)
    )
    values = [v / 2_147_483_648.0 for v in struct.unpack(f"<{dimensions}i", raw[: dimensions * 4])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


class FakeStream:
    """OpenAI-format chunks of the echoed reply, paced by ttft_ms and tokens_per_second."""

    __slots__ = (
        "_closed",
        "_delay",
        "_head",
        "_include_usage",
        "_pieces",
        "_ttft",
        "_usage",
        "events",
        "usage",
    )

    def __init__(
        self,
        head: bytes,
        pieces: list[str],
        usage: Usage,
        include_usage: bool,
        ttft: float,
        delay: float,
    ) -> None:
        self._head = head
        self._pieces = pieces
        self._usage = usage
        self._include_usage = include_usage
        self._ttft = ttft
        self._delay = delay
        self._closed = False
        self.usage: Usage | None = None
        self.events = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        head = self._head
        tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        if self._ttft:
            await asyncio.sleep(self._ttft)
        yield head + b'{"role":"assistant","content":"","refusal":null' + tail
        for i, piece in enumerate(self._pieces):
            if self._closed:
                return
            if self._delay and i:
                await asyncio.sleep(self._delay)
            self.events += 1
            yield head + b'{"content":' + _encoder.encode(piece) + tail
        final = head + b'{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
        if self._include_usage:
            final += (
                head.split(b'"choices":[', 1)[0]
                + b'"choices":[],"usage":'
                + _encoder.encode(_wire(self._usage))
                + b"}\n\n"
            )
        self.usage = self._usage
        yield final + b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self._closed = True


class _Injector:
    """Draws, per chat request, whether it fails and how (domain.FakeErrors)."""

    __slots__ = ("_5xx", "_429", "_random", "_retry_after", "_timeout", "_wait", "provider")

    def __init__(self, provider: str, errors: FakeErrors, wait: float) -> None:
        self.provider = provider
        self._429 = errors.rate_429
        self._5xx = self._429 + errors.rate_5xx
        self._timeout = self._5xx + errors.rate_timeout
        self._retry_after = str(errors.retry_after)
        self._random = random.Random(errors.seed)  # not for secrets: a test sequence
        self._wait = wait

    async def maybe_fail(self) -> None:
        draw = self._random.random()
        if draw >= self._timeout:
            return
        if draw < self._429:
            raise UpstreamClientError(
                f"Rate limit reached for provider '{self.provider}' "
                "(injected by the fake provider's errors.rate_429).",
                status=429,
                retry_after=self._retry_after,
                error_type="rate_limit_exceeded",
                error_code="rate_limit_exceeded",
            )
        if draw < self._5xx:
            raise UpstreamError(
                f"Upstream provider '{self.provider}' returned HTTP 500 "
                "(injected by the fake provider's errors.rate_5xx)."
            )
        await asyncio.sleep(self._wait)
        raise UpstreamTimeout(
            f"Upstream provider '{self.provider}' timed out after {self._wait * 1000:g} ms "
            "(injected by the fake provider's errors.rate_timeout)."
        )


class FakeProvider:
    __slots__ = (
        "_delay",
        "_dimensions",
        "_inject",
        "_token_delay",
        "_ttft",
        "config",
        "name",
    )

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        self._delay = config.latency_ms / 1000.0
        self._ttft = config.ttft_ms / 1000.0
        tps = config.tokens_per_second
        self._token_delay = 1.0 / tps if tps > 0 else 0.0
        self._dimensions = 1536
        # None unless errors are configured: the healthy path pays one test.
        self._inject = (
            _Injector(
                config.name,
                config.errors,
                (config.first_byte_timeout_ms or config.timeout_ms) / 1000.0,
            )
            if config.errors is not None
            else None
        )

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def chat(self, call: ChatCall) -> ProviderReply:
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._inject is not None:
            await self._inject.maybe_fail()
        messages = call.request.messages
        text = reply_text(messages, call.request.output_limit)
        prompt = estimate_tokens(prompt_chars(messages))
        completion = estimate_tokens(len(text))
        usage = Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
        body = _encoder.encode(
            _Completion(
                id="chatcmpl-" + call.request_id.replace("-", ""),
                object="chat.completion",
                created=int(time.time()),
                model=call.target.model,
                choices=[_Choice(0, _Message("assistant", text), None, "stop")],
                usage=_wire(usage),
            )
        )
        return ProviderReply(body=body, usage=usage)

    async def stream(self, call: ChatCall) -> FakeStream:
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._inject is not None:
            await self._inject.maybe_fail()
        messages = call.request.messages
        text = reply_text(messages, call.request.output_limit)
        prompt = estimate_tokens(prompt_chars(messages))
        completion = estimate_tokens(len(text))
        usage = Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
        head = (
            b'data: {"id":"chatcmpl-'
            + call.request_id.replace("-", "").encode()
            + b'","object":"chat.completion.chunk","created":'
            + str(int(time.time())).encode()
            + b',"model":'
            + _encoder.encode(call.target.model)
            + b',"system_fingerprint":"'
            + FINGERPRINT.encode()
            + b'","choices":[{"index":0,"delta":'
        )
        return FakeStream(
            head, text_pieces(text), usage, call.request.wants_usage, self._ttft, self._token_delay
        )

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply:
        if self._delay:
            await asyncio.sleep(self._delay)
        request = call.request
        texts = input_texts(request.input)
        dimensions = request.dimensions or self._dimensions
        if len(texts) * dimensions > MAX_EMBEDDING_VALUES:
            raise InvalidRequest(
                f"The fake provider computes at most {MAX_EMBEDDING_VALUES} embedding values "
                f"per request (inputs x dimensions); this one asks for {len(texts)} x "
                f"{dimensions}. Send fewer inputs or fewer 'dimensions'.",
                param="dimensions",
            )
        as_base64 = request.encoding_format == "base64"
        data = []
        for index, text in enumerate(texts):
            if index and not index % _VECTORS_PER_SLICE:
                await asyncio.sleep(0)  # let other requests (and /healthz) run
            vector = fake_vector(text, dimensions)
            embedding: object = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = estimate_tokens(sum(len(t) for t in texts))
        usage = Usage(prompt_tokens=tokens, total_tokens=tokens)
        body = _encoder.encode(
            {
                "object": "list",
                "data": data,
                "model": call.target.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        return ProviderReply(body=body, usage=usage)
