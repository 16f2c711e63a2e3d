"""Bad input never gets a 500: a seeded fuzz of every JSON endpoint, in process.

Each class of malformed body (deep nesting, invalid UTF-8 in keys and values,
wrong types for each field, mixed lists, huge numbers, NaN/Infinity literals,
truncated JSON, an empty body, a top level that is not an object) plus seeded
random truncations and byte flips is sent to /v1/chat/completions (plain and
streamed), /v1/embeddings and the native Anthropic, Gemini, Azure and Ollama
paths. Every answer must be anything but a 500, and every error must be in the
calling API's own shape. The fake provider answers the OpenAI paths; the native
providers point at a closed port (a body good enough to be relayed gets a 502
in the API's shape). Deterministic (fixed seed) and fast (one app for all).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import ProviderConfig, Resilience, Route, Target
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.upstream import MockUpstream

SEED = 20261201
KEY = "gnd_" + "f" * 43
VERSION = "api-version=2024-10-21"
DEEP = 1000  # levels: a 2 KB body that made msgspec raise RecursionError


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    """Bound but not listening: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def config(port: int) -> GandalfConfig:
    root = f"http://127.0.0.1:{port}"

    def native(name: str, kind: str) -> ProviderConfig:
        return ProviderConfig(name=name, type=kind, base_url=root, api_key="secret")

    return GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(
            ProviderConfig(name="fake", type="fake"),
            native("an", "anthropic"),
            native("ge", "gemini"),
            native("az", "azure"),
            native("ol", "ollama"),
        ),
        routes=(
            Route(model_alias="fake-model", targets=(Target(provider="fake", model="fake-1"),)),
            Route(model_alias="claude", targets=(Target(provider="an", model="claude-x"),)),
            Route(model_alias="gem", targets=(Target(provider="ge", model="gemini-x"),)),
            Route(model_alias="az", targets=(Target(provider="az", model="gpt-x"),)),
            Route(model_alias="ol", targets=(Target(provider="ol", model="llama-x"),)),
        ),
        keys=(KeyEntry(name="k", key=KEY, role="member"),),
        # One attempt, and a breaker that never opens: each answer is the request's own.
        resilience=Resilience(max_attempts=1),
    )


# ---------------------------------------------------------------------------- error shapes


def openai_shape(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


def anthropic_shape(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(body, dict)
        and body.get("type") == "error"
        and isinstance(error, dict)
        and set(error) == {"type", "message"}
    )


def google_shape(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and set(error) == {"code", "message", "status"}


def ollama_shape(body: Any) -> bool:
    return isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str)


class Endpoint:
    """A path, the valid body its cases start from, and its API's error shape."""

    def __init__(
        self,
        name: str,
        path: str,
        base: dict[str, Any],
        shape: Callable[[Any], bool],
        query: str = "",
    ) -> None:
        self.name = name
        self.path = path
        self.base = base
        self.shape = shape
        self.query = query


MESSAGES = [{"role": "user", "content": "hello"}]
ENDPOINTS = [
    Endpoint(
        "chat", "/v1/chat/completions", {"model": "fake-model", "messages": MESSAGES}, openai_shape
    ),
    Endpoint(
        "chat-stream",
        "/v1/chat/completions",
        {"model": "fake-model", "messages": MESSAGES, "stream": True},
        openai_shape,
    ),
    Endpoint(
        "embeddings", "/v1/embeddings", {"model": "fake-model", "input": ["a", "b"]}, openai_shape
    ),
    Endpoint(
        "anthropic",
        "/v1/messages",
        {"model": "claude", "max_tokens": 16, "messages": MESSAGES},
        anthropic_shape,
    ),
    Endpoint(
        "gemini",
        "/v1beta/models/gem:generateContent",
        {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]},
        google_shape,
    ),
    Endpoint(
        "azure",
        "/openai/deployments/az/chat/completions",
        {"messages": MESSAGES, "stream": True},
        openai_shape,
        VERSION,
    ),
    Endpoint(
        "azure-embeddings",
        "/openai/deployments/az/embeddings",
        {"input": "a"},
        openai_shape,
        VERSION,
    ),
    Endpoint("ollama", "/api/chat", {"model": "ol", "messages": MESSAGES}, ollama_shape),
]


# ---------------------------------------------------------------------------- cases


def deep(opening: bytes, closing: bytes, levels: int = DEEP) -> bytes:
    return opening * levels + closing * levels


def with_member(base: dict[str, Any], key: bytes, value: bytes) -> bytes:
    """``base`` as JSON with one more member, written raw (any bytes at all)."""
    return orjson.dumps(base)[:-1] + b"," + key + b":" + value + b"}"


def replaced(base: dict[str, Any], field: str, value: bytes) -> bytes:
    """``base`` with ``field`` set to the raw ``value``."""
    rest = {k: v for k, v in base.items() if k != field}
    body = orjson.dumps(rest)
    sep = b"," if rest else b""
    return b'{"' + field.encode() + b'":' + value + sep + body[1:]


WRONG_TYPES = [
    b"null",
    b"true",
    b"1",
    b"-1",
    b"1.5",
    b'"x"',
    b'""',
    b"[]",
    b"{}",
    b"[1]",
    b'["x"]',
    b'{"a":1}',
]
HUGE = [
    b"1e400",
    b"-1e400",
    b"1" + b"0" * 400,
    b"-1" + b"0" * 400,
    b"99999999999999999999999",
    b"1.7976931348623157e309",
]
LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"undefined"]
BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"ok\x80ok"]
FIELDS = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "logit_bias",
    "tools",
    "temperature",
    "input",
    "dimensions",
    "encoding_format",
    "contents",
    "system",
]


def cases(endpoint: Endpoint, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    base = endpoint.base
    good = orjson.dumps(base)
    # deep nesting: the whole body, a known field, an unknown key, inside content
    yield "deep-array", deep(b"[", b"]")
    yield "deep-object", deep(b'{"a":', b"}")
    for field in ("messages", "input", "contents", "extra"):
        yield f"deep-array-{field}", replaced(base, field, deep(b"[", b"]"))
        yield f"deep-object-{field}", replaced(base, field, deep(b'{"a":', b"}"))
    yield (
        "deep-content",
        replaced(base, "messages", b'[{"role":"user","content":' + deep(b"[", b"]") + b"}]"),
    )
    # invalid UTF-8 in keys and values
    for bad in BAD_UTF8:
        yield f"utf8-key-{bad!r}", with_member(base, b'"k' + bad + b'"', b"1")
        yield f"utf8-value-{bad!r}", with_member(base, b'"extra"', b'"' + bad + b'"')
        yield f"utf8-model-{bad!r}", replaced(base, "model", b'"' + bad + b'"')
        content = b'[{"role":"user","content":"' + bad + b'"}]'
        yield f"utf8-content-{bad!r}", replaced(base, "messages", content)
        yield f"utf8-input-{bad!r}", replaced(base, "input", b'["a","' + bad + b'"]')
        yield (
            f"utf8-parts-{bad!r}",
            replaced(base, "contents", b'[{"parts":[{"text":"' + bad + b'"}]}]'),
        )
        yield (
            f"utf8-nested-key-{bad!r}",
            replaced(base, "messages", b'[{"role":"user","content":"x","n' + bad + b'":1}]'),
        )
    # wrong types for each field, huge numbers, NaN/Infinity literals
    for field in FIELDS:
        for value in WRONG_TYPES + HUGE + LITERALS:
            yield f"{field}={value[:20]!r}", replaced(base, field, value)
    # mixed lists
    for value in (
        b'["a",1]',
        b'[[1,2],"a"]',
        b"[1,[2]]",
        b'["a",null]',
        b"[[1],[]]",
        b"[true]",
        b'[[["a"]]]',
    ):
        yield f"input-mixed-{value!r}", replaced(base, "input", value)
    yield "messages-mixed", replaced(base, "messages", b'[{"role":"user","content":"x"},1]')
    yield (
        "messages-content-types",
        replaced(
            base, "messages", b'[{"role":"user","content":[1,{"type":"text","text":2},null]}]'
        ),
    )
    # truncated JSON, empty body, non-object top level, garbage
    for cut in sorted(rng.sample(range(len(good)), min(12, len(good)))):
        yield f"truncated-{cut}", good[:cut]
    for body in (
        b"",
        b" ",
        b"[]",
        b'"x"',
        b"1",
        b"null",
        b"true",
        b"[{}]",
        b"{",
        b"}",
        b"\xef\xbb\xbf{}",
    ):
        yield f"top-{body!r}", body
    # seeded byte flips of the valid body
    for i in range(24):
        mutated = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        yield f"flip-{i}", bytes(mutated)


def test_bad_input_is_never_a_500_and_errors_are_in_the_apis_shape(closed_port: int) -> None:
    rng = random.Random(SEED)
    failures: list[str] = []
    sent = 0

    async def main() -> None:
        nonlocal sent
        app = create_app(config(closed_port), access_log=False)
        await app.startup()
        try:
            for endpoint in ENDPOINTS:
                for label, body in cases(endpoint, rng):
                    sent += 1
                    reply = await call(
                        app,
                        "POST",
                        endpoint.path,
                        headers=[("authorization", f"Bearer {KEY}")],
                        body=body,
                        query=endpoint.query,
                        stay=True,
                    )
                    problem = judge(endpoint, reply)
                    if problem:
                        failures.append(f"{endpoint.name} {label}: {problem}")
        finally:
            await app.shutdown()

    asyncio.run(main())
    assert sent > 1000
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} in all)"


def judge(endpoint: Endpoint, reply: Reply) -> str | None:
    """Why ``reply`` is wrong for bad input (None: it is fine)."""
    if reply.status >= 500 and reply.status not in (502, 503):
        return f"HTTP {reply.status}: {reply.body[:200]!r}"
    if reply.status < 400:
        if endpoint.name in ("chat-stream",) and b"error" in reply.body.split(b"\n\n", 1)[0]:
            return f"an error event on a 200 stream: {reply.body[:200]!r}"
        return None
    if reply.header("content-type") != "application/json":
        return f"HTTP {reply.status} with content-type {reply.header('content-type')}"
    try:
        body = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return f"HTTP {reply.status}, not JSON: {reply.body[:200]!r}"
    if not endpoint.shape(body):
        return f"HTTP {reply.status} not in the API's error shape: {reply.body[:200]!r}"
    if b"Traceback" in reply.body:
        return "a traceback on the wire"
    return None


def test_the_deep_bodies_are_400s_naming_the_nesting(closed_port: int) -> None:
    """The reported attack, per endpoint: a 2 KB body nested 1,000 levels deep."""

    async def main() -> None:
        app = create_app(config(closed_port), access_log=False)
        await app.startup()
        try:
            for endpoint in ENDPOINTS:
                body = replaced(endpoint.base, "extra", deep(b"[", b"]"))
                assert len(body) < 2200
                reply = await call(
                    app,
                    "POST",
                    endpoint.path,
                    headers=[("authorization", f"Bearer {KEY}")],
                    body=body,
                    query=endpoint.query,
                )
                assert reply.status == 400, (endpoint.name, reply.status, reply.body[:200])
                assert endpoint.shape(reply.json()), (endpoint.name, reply.body)
                assert b"nested too deeply" in reply.body, (endpoint.name, reply.body)
        finally:
            await app.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"fake-model","messages":[{"role":"user","content":"\xff"}]}',
        b'{"model":"fake-model","messages":[{"role":"user","content":"x"}],"k\xff":1}',
        b'{"model":"fake-model","input":["a","\xc0\xaf"]}',
    ],
    ids=["content", "key", "embeddings-input"],
)
def test_invalid_utf8_is_a_400_before_anything_is_relayed(closed_port: int, body: bytes) -> None:
    path = "/v1/embeddings" if b'"input"' in body else "/v1/chat/completions"

    async def main() -> None:
        app = create_app(config(closed_port), access_log=False)
        await app.startup()
        try:
            reply = await call(
                app, "POST", path, headers=[("authorization", f"Bearer {KEY}")], body=body
            )
        finally:
            await app.shutdown()
        assert reply.status == 400, reply.body
        assert openai_shape(reply.json()) and b"UTF-8" in reply.body

    asyncio.run(main())


def test_the_openai_adapter_never_relays_invalid_utf8(upstream: MockUpstream) -> None:
    """msgspec skips unknown keys and raw content without checking their UTF-8:
    the gateway checks the body before the OpenAI adapter relays it as is."""
    root = f"http://127.0.0.1:{upstream.port}/v1"
    cfg = GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="up", type="openai", base_url=root, api_key="sk-up"),),
        routes=(Route(model_alias="ok-model", targets=(Target(provider="up", model="ok-model"),)),),
        keys=(KeyEntry(name="k", key=KEY, role="member"),),
    )
    marker = b"utf8-relay-check"
    bodies = [
        b'{"model":"ok-model","messages":[{"role":"user","content":"' + marker + b'\xff"}]}',
        b'{"model":"ok-model","messages":[{"role":"user","content":"' + marker + b'"}],"k\xc3":1}',
        b'{"model":"ok-model","stream":true,"messages":[{"role":"user","content":"'
        + marker
        + b'","x":"\xed\xa0\x80"}]}',
    ]

    async def main() -> list[Reply]:
        app = create_app(cfg, access_log=False)
        await app.startup()
        try:
            return [
                await call(
                    app,
                    "POST",
                    "/v1/chat/completions",
                    headers=[("authorization", f"Bearer {KEY}")],
                    body=body,
                )
                for body in bodies
            ]
        finally:
            await app.shutdown()

    upstream.received.clear()
    for reply in asyncio.run(main()):
        assert reply.status == 400 and openai_shape(reply.json()), reply.body
    assert not [r for r in list(upstream.received) if marker in r.body]
