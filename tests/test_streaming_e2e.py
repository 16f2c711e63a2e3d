"""End to end: streamed chat, embeddings and /v1/models through a real ``gandalf serve``.

One gateway process (fixture ``gateway``, keep-alive every 200 ms) sits in front of
one MockUpstream (fixture ``mock``); each route's target model picks the mock's
behaviour (see tests/upstream.py). The official ``openai`` SDK drives the API as a
user would; raw httpx streams check the bytes. A streaming mock is held behind
test-controlled gates (``mock.release``), so ordering is asserted on gates, never on
wall-clock sleeps; every wait is a poll with a deadline or a bounded read.
A dedicated process covers SIGTERM with streams in flight.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import socket
import sqlite3
import struct
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gandalf.auth.apikey import generate_key
from tests.serve import GandalfServer, route, scenario_providers, wait_until
from tests.upstream import SLOW_CHUNKS, MockUpstream, chunk_event, mock_vector, running_upstream

UPSTREAM_SECRET = "sk-upstream-secret"
UNSET_VAR = "UNSET_VAR_FOR_STREAM_TEST"

ADMIN = generate_key()
MEMBER = generate_key()
VIEWER = generate_key()
LIMITED = generate_key()
LIMITED_MODELS = [
    "fake-model",
    "up-stream",
    "nokey",
    "ghost",
]  # nokey: unavailable; ghost: no route

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
ERROR_FIELDS = {"message", "type", "param", "code"}
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
STREAM_N = 5
READ_TIMEOUT = 10.0  # bounds every read that waits on the gateway


# ---------------------------------------------------------------------------- config


ROUTES = [
    route("fake-model", "fake", "fake-1"),
    route("fake-embed", "fake", "fake-embed-1"),
    route("up-stream", "up", f"stream-{STREAM_N}"),
    route("up-slow", "up", "slow-stream"),
    route("up-silent", "up", "stream-silent"),
    route("up-die", "up", "stream-then-die"),
    route("up-late", "up", "stream-late"),
    *(route(f"up-s{n}", "up", f"stream-status-{n}") for n in (400, 401, 404, 429, 500)),
    route("up-embed", "up", "embed-model"),
    route("up-embed-400", "up", "status-400"),
    route("dead", "dead", "stream-3"),
    route("slow-hang", "slow", "hang"),
    route("nokey", "nokey", "stream-3"),
]
AVAILABLE = sorted(r["model_alias"] for r in ROUTES if r["model_alias"] != "nokey")
OWNER = {r["model_alias"]: r["targets"][0]["provider"] for r in ROUTES}


def gateway_config(mock: MockUpstream, dead_port: int, **server: Any) -> dict[str, Any]:
    return {
        "server": {
            "stream_keepalive": "200ms",
            "shutdown_timeout": "10s",
            "access_log": False,
            **server,
        },
        "providers": scenario_providers(mock.base_url, dead_port, UPSTREAM_SECRET, UNSET_VAR),
        "routes": ROUTES,
        "keys": [
            {"name": "admin", "key": ADMIN, "role": "admin"},
            {"name": "member", "key": MEMBER, "role": "member"},
            {"name": "viewer", "key": VIEWER, "role": "viewer"},
            {"name": "limited", "key": LIMITED, "role": "member", "allowed_models": LIMITED_MODELS},
        ],
        # These scenarios check how one upstream answer is relayed: one attempt each,
        # and no breaker (the mock's failing models would open the breaker of 'up').
        "resilience": {"max_attempts": 1, "breaker": {"min_samples": 1_000_000}},
    }


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """Bound but not listening: connections are refused, and no one else gets the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


@pytest.fixture(scope="module", params=["asgi", "rsgi"])
def gateway(
    mock: MockUpstream,
    dead_port: int,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[GandalfServer]:
    """One gateway per granian interface: every test runs against both."""
    tmp = tmp_path_factory.mktemp(f"streaming-{request.param}")
    config = gateway_config(mock, dead_port, interface=request.param)
    with GandalfServer(tmp, config, unset=[UNSET_VAR]) as server:
        yield server


@pytest.fixture(scope="module")
def db(gateway: GandalfServer) -> Path:
    return gateway.tmp / "gandalf.db"


@pytest.fixture(scope="module")
def sdk(gateway: GandalfServer) -> Iterator[Callable[[str], OpenAI]]:
    """``sdk(key)``: an OpenAI client for the gateway (no retries, bounded waits)."""
    clients: dict[str, OpenAI] = {}

    def make(key: str) -> OpenAI:
        if key not in clients:
            clients[key] = OpenAI(
                base_url=gateway.base_url, api_key=key, max_retries=0, timeout=READ_TIMEOUT
            )
        return clients[key]

    yield make
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def http(gateway: GandalfServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=READ_TIMEOUT) as client:
        yield client


# ---------------------------------------------------------------------------- helpers


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def stream_body(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": user(text), "stream": True, **extra}


def assert_error(
    status: int,
    headers: Mapping[str, str],
    content: bytes,
    want_status: int,
    type_: str,
    code: str | None,
    param: Any = ...,
) -> dict[str, Any]:
    """A plain JSON error in the contract's shape; returns ``error``."""
    assert status == want_status, content
    assert headers["content-type"] == "application/json", headers
    assert headers.get("x-request-id")
    payload = json.loads(content)
    assert set(payload) == {"error"}, payload
    error: dict[str, Any] = payload["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"]) == (type_, code), error
    if param is not ...:
        assert error["param"] == param, error
    assert b"Traceback" not in content and UPSTREAM_SECRET.encode() not in content
    return error


def assert_response_error(
    response: httpx.Response, status: int, type_: str, code: str | None, param: Any = ...
) -> dict[str, Any]:
    return assert_error(
        response.status_code, response.headers, response.content, status, type_, code, param
    )


def split_events(raw: bytes) -> list[bytes]:
    """The events of an SSE body, keep-alive comments included, each without its blank line."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    return raw[:-2].split(b"\n\n")


def data_payloads(raw: bytes) -> list[Any]:
    """The JSON of every data event (``[DONE]`` as the string), comments skipped."""
    out: list[Any] = []
    for item in split_events(raw):
        if item.startswith(b":"):
            continue
        assert item.startswith(b"data: ") and b"\n" not in item, item
        out.append("[DONE]" if item == b"data: [DONE]" else json.loads(item[6:]))
    return out


def usage_row(db: Path, request_id: str, timeout: float = 5.0) -> sqlite3.Row:
    """The one usage row of ``request_id``, polled until it is written."""
    found: list[sqlite3.Row] = []

    def written() -> bool:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.row_factory = sqlite3.Row
            found[:] = conn.execute(
                "SELECT * FROM usage_records WHERE request_id = ?", (request_id,)
            ).fetchall()
        return bool(found)

    wait_until(written, timeout, f"the usage row of request {request_id}")
    assert len(found) == 1, [dict(r) for r in found]
    return found[0]


def tokens(row: sqlite3.Row) -> dict[str, int]:
    return {k: row[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


@contextlib.contextmanager
def gated(mock: MockUpstream, key: str) -> Iterator[None]:
    """Bound a test that holds the mock's stream ``key`` behind its gate: whatever
    happens, the gate opens after READ_TIMEOUT (a failure bound, never a sync point)
    and when the test is over, so no mock handler stays parked."""
    watchdog = threading.Timer(READ_TIMEOUT, mock.release, (key, 1000))
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        mock.release(key, 1000)


def mock_stream_bytes(model: str, pieces: list[str]) -> bytes:
    """What the mock sends for ``pieces`` without include_usage (tests/upstream.py)."""
    events = [
        chunk_event(model, {"role": "assistant", "content": p} if i == 0 else {"content": p})
        for i, p in enumerate(pieces)
    ]
    return b"".join(events) + chunk_event(model, {}, "stop") + DONE


def words(count: int) -> list[str]:
    return [f"w{i} " for i in range(count)]


def read_until(chunks: Iterator[bytes], marker: bytes) -> bytes:
    """Read a raw body until ``marker`` arrived (keep-alive comments may come first)."""
    got = b""
    for piece in chunks:
        got += piece
        if marker in got:
            return got
    raise AssertionError(f"the stream ended before {marker!r}: {got[-300:]!r}")


# =================================================================================== streamed text


@pytest.mark.parametrize(
    ("model", "expected"),
    [("up-stream", "".join(words(STREAM_N))), ("fake-model", None)],
    ids=["upstream", "fake"],
)
def test_streamed_text_is_the_concatenation_of_the_chunks(
    sdk: Callable[[str], OpenAI], db: Path, model: str, expected: str | None
) -> None:
    text = unique("Stream me, please: \u00e9\u4e16")
    response = sdk(MEMBER).chat.completions.with_raw_response.create(
        model=model, messages=user(text), stream=True
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    request_id = response.headers["x-request-id"]
    with response.parse() as stream:
        chunks = list(stream)
    assert len(chunks) >= 3
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == (expected if expected is not None else text)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    row = usage_row(db, request_id)
    assert (row["status"], row["model_alias"], row["endpoint"]) == (200, model, "chat")
    assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0


def test_raw_stream_is_relayed_byte_for_byte_and_ends_with_done(
    http: httpx.Client, mock: MockUpstream
) -> None:
    text = unique("raw bytes")
    with http.stream("POST", CHAT, headers=auth(MEMBER), json=stream_body("up-stream", text)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers.get("x-request-id")
        assert "content-length" not in r.headers
        raw = r.read()
    assert raw.endswith(DONE)
    relayed = raw.replace(KEEPALIVE, b"")  # a slow machine may see one; nothing else is added
    assert relayed == mock_stream_bytes(f"stream-{STREAM_N}", words(STREAM_N))
    assert mock.stream_log(text).done


# =================================================================================== include_usage


@pytest.mark.parametrize(
    "options",
    [None, b"null", b'{"include_usage":false}', b'{"include_usage":false,"x_custom":1.50}'],
    ids=["absent", "null", "false", "false-with-other-keys"],
)
def test_without_include_usage_the_client_sees_no_usage_but_it_is_recorded(
    http: httpx.Client, mock: MockUpstream, db: Path, options: bytes | None
) -> None:
    text = unique("no usage for me")
    body = json.dumps(stream_body("up-stream", text), separators=(",", ":")).encode()
    if options is not None:
        body = body[:-1] + b',"stream_options":' + options + b"}"
    headers = {**auth(MEMBER), "content-type": "application/json"}
    with http.stream("POST", CHAT, headers=headers, content=body) as r:
        assert r.status_code == 200
        raw = r.read()
        request_id = r.headers["x-request-id"]
    payloads = data_payloads(raw)
    assert payloads[-1] == "[DONE]"
    assert b"usage" not in raw, payloads
    assert all(p["choices"] for p in payloads[:-1])

    log = mock.stream_log(text)
    assert log.include_usage, "the gateway must ask the upstream for usage"
    assert log.usage is not None and log.done
    [seen] = [r for r in list(mock.received) if text.encode() in r.body]
    assert seen.include_usage
    sent = seen.json()
    assert sent["model"] == f"stream-{STREAM_N}" and sent["messages"] == user(text)
    if options is not None and b"x_custom" in options:
        assert sent["stream_options"] == {"include_usage": True, "x_custom": 1.5}
        assert b'"x_custom":1.50' in seen.body  # the client's other options, byte for byte
    else:
        assert sent["stream_options"] == {"include_usage": True}
    assert tokens(usage_row(db, request_id)) == log.usage


def test_with_include_usage_the_client_sees_the_usage_chunk_once(
    sdk: Callable[[str], OpenAI], mock: MockUpstream, db: Path
) -> None:
    text = unique("usage please")
    response = sdk(MEMBER).chat.completions.with_raw_response.create(
        model="up-stream", messages=user(text), stream=True, stream_options={"include_usage": True}
    )
    with response.parse() as stream:
        chunks = list(stream)
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
    assert with_usage[0].choices == []
    log = mock.stream_log(text)
    assert log.include_usage and log.usage is not None
    usage = with_usage[0].usage
    assert usage is not None
    assert {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    } == log.usage
    [seen] = [r for r in list(mock.received) if text.encode() in r.body]
    assert seen.json()["stream_options"] == {"include_usage": True}
    row = usage_row(db, response.headers["x-request-id"])
    assert tokens(row) == log.usage and row["status"] == 200


def test_fake_provider_honours_include_usage(sdk: Callable[[str], OpenAI]) -> None:
    for include in (False, True):
        with sdk(MEMBER).chat.completions.create(
            model="fake-model",
            messages=user("count me"),
            stream=True,
            stream_options={"include_usage": include},
        ) as stream:
            chunks = list(stream)
        usages = [c.usage for c in chunks if c.usage is not None]
        assert len(usages) == (1 if include else 0), chunks
        if include:
            assert usages[0].completion_tokens == 2 and usages[0].total_tokens > 2


# ============================================================================ incremental delivery


def test_chunks_reach_the_client_while_the_upstream_holds_the_rest(
    sdk: Callable[[str], OpenAI], mock: MockUpstream, db: Path
) -> None:
    text = unique("slowly")
    log = mock.stream_log(text)
    received: list[str] = []
    with gated(mock, text):
        response = sdk(MEMBER).chat.completions.with_raw_response.create(
            model="up-slow", messages=user(text), stream=True
        )
        with response.parse() as stream:
            for chunk in stream:
                if not chunk.choices or chunk.choices[0].delta.content is None:
                    continue
                received.append(chunk.choices[0].delta.content)
                assert log.sent == len(received), (log.sent, received)
                if len(received) < SLOW_CHUNKS:
                    # The client has this chunk while the mock holds the next behind its gate.
                    assert not log.done
                    mock.release(text)
    assert received == words(SLOW_CHUNKS)
    assert log.done and not log.closed
    assert usage_row(db, response.headers["x-request-id"])["status"] == 200


# ==================================================================== errors before the first byte


@pytest.mark.parametrize(
    ("model", "exc_type", "status", "type_", "code"),
    [
        ("up-s400", openai.BadRequestError, 400, "mock_error", "mock_400"),
        ("up-s404", openai.NotFoundError, 404, "mock_error", "mock_404"),
        ("up-s429", openai.RateLimitError, 429, "mock_error", "mock_429"),
        ("up-s401", openai.InternalServerError, 502, "upstream_error", "upstream_auth_error"),
        ("up-s500", openai.InternalServerError, 502, "upstream_error", "upstream_error"),
        ("dead", openai.InternalServerError, 502, "upstream_error", "upstream_error"),
        ("slow-hang", openai.InternalServerError, 504, "upstream_error", "upstream_timeout"),
        ("nokey", openai.InternalServerError, 503, "provider_unavailable", "provider_unavailable"),
        ("no-such-model", openai.NotFoundError, 404, "invalid_request_error", "model_not_found"),
    ],
)
def test_failures_before_the_first_byte_are_plain_json_errors(
    sdk: Callable[[str], OpenAI],
    db: Path,
    model: str,
    exc_type: type[openai.APIStatusError],
    status: int,
    type_: str,
    code: str,
) -> None:
    with pytest.raises(exc_type) as info:
        sdk(MEMBER).chat.completions.create(
            model=model, messages=user(unique(f"fail {model}")), stream=True
        )
    exc = info.value
    assert_error(exc.status_code, exc.response.headers, exc.response.content, status, type_, code)
    assert (exc.type, exc.code) == (type_, code)
    assert exc.request_id
    row = usage_row(db, exc.request_id)
    assert (row["status"], row["total_tokens"]) == (status, 0)


@pytest.mark.parametrize(
    ("key", "model", "status", "type_", "code"),
    [
        (VIEWER, "up-stream", 403, "permission_denied", "permission_denied"),
        (LIMITED, "up-slow", 403, "permission_denied", "permission_denied"),
        ("gnd_" + "x" * 43, "up-stream", 401, "invalid_request_error", "invalid_api_key"),
    ],
    ids=["viewer", "model-not-allowed", "unknown-key"],
)
def test_refused_streams_are_plain_json_errors(
    http: httpx.Client, mock: MockUpstream, key: str, model: str, status: int, type_: str, code: str
) -> None:
    text = unique("refused")
    response = http.post(CHAT, headers=auth(key), json=stream_body(model, text))
    assert_response_error(response, status, type_, code)
    assert not any(text.encode() in r.body for r in list(mock.received))


# ===================================================================== errors after the first byte


def test_upstream_dying_mid_stream_ends_with_one_error_event(
    http: httpx.Client, sdk: Callable[[str], OpenAI], db: Path
) -> None:
    with http.stream(
        "POST", CHAT, headers=auth(MEMBER), json=stream_body("up-die", unique("die raw"))
    ) as r:
        assert r.status_code == 200
        raw = r.read()  # the gateway ends its own body cleanly: no transport error here
        request_id = r.headers["x-request-id"]
    payloads = data_payloads(raw)
    assert [p["choices"][0]["delta"]["content"] for p in payloads[:2]] == ["w0 ", "w1 "]
    assert len(payloads) == 3, payloads  # two chunks, one error, no [DONE]
    error_event = payloads[2]
    assert set(error_event) == {"error"} and set(error_event["error"]) == ERROR_FIELDS
    assert error_event["error"]["type"] == "upstream_error"
    assert error_event["error"]["code"] == "upstream_error"
    assert error_event["error"]["message"]
    assert split_events(raw)[-1].startswith(b"data: {"), "the error event is the last one"
    row = usage_row(db, request_id)
    assert row["status"] == 502
    assert row["completion_tokens"] == 2  # no usage arrived: the relayed chunks are counted

    text = unique("die sdk")
    got: list[str] = []
    with (
        pytest.raises(openai.APIError) as info,
        sdk(MEMBER).chat.completions.create(
            model="up-die", messages=user(text), stream=True
        ) as stream,
    ):
        for chunk in stream:  # the error comes mid-iteration
            got.append(chunk.choices[0].delta.content or "")
    assert type(info.value) is openai.APIError  # in-band, not an HTTP status
    assert got == ["w0 ", "w1 "]
    assert info.value.code == "upstream_error" and info.value.type == "upstream_error"


# ====================================================================================== disconnect


def test_client_disconnect_cancels_the_upstream_and_records_499(
    gateway: GandalfServer, mock: MockUpstream, db: Path
) -> None:
    text = unique("going away")
    log = mock.stream_log(text)
    with (
        gated(mock, text),
        httpx.Client(base_url=gateway.url, timeout=READ_TIMEOUT) as client,
    ):
        with client.stream(
            "POST", CHAT, headers=auth(MEMBER), json=stream_body("up-slow", text)
        ) as r:
            assert r.status_code == 200
            request_id = r.headers["x-request-id"]
            read_until(r.iter_raw(), b'"w0 "')
            assert log.sent == 1
        # closing the response mid-body drops the connection
        wait_until(lambda: log.closed, 1.0, "the mock to see its connection closed")
    assert log.sent == 1 and not log.done
    row = usage_row(db, request_id)
    assert row["status"] == 499
    assert row["completion_tokens"] == 1  # the one chunk relayed


def test_client_disconnect_before_the_upstream_answered_cancels_it_too(
    gateway: GandalfServer, mock: MockUpstream, db: Path
) -> None:
    """The client gives up while the upstream has not even sent its headers (a slow
    first byte): the upstream request must not be left running for the full timeout."""
    text = unique("impatient")
    request_id = unique("rid")
    log = mock.stream_log(text)
    body = json.dumps(stream_body("up-late", text)).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {MEMBER}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-Id: {request_id}\r\n\r\n"
    )
    with gated(mock, text):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=READ_TIMEOUT) as sock:
            sock.sendall(head.encode() + body)
            wait_until(lambda: log.requests == 1, 5, "the upstream to receive the request")
        # the client's socket is closed; the mock still holds its answer behind the gate
        wait_until(lambda: log.closed, 1.0, "the mock to see its connection closed")
    assert log.sent == 0
    assert usage_row(db, request_id)["status"] == 499


# ====================================================================================== keep-alive


def test_keep_alive_comments_flow_while_the_upstream_is_silent(
    http: httpx.Client, mock: MockUpstream, db: Path
) -> None:
    text = unique("silence")
    log = mock.stream_log(text)
    seen: list[bytes] = []
    with (
        gated(mock, text),
        http.stream("POST", CHAT, headers=auth(MEMBER), json=stream_body("up-silent", text)) as r,
    ):
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        for line in r.iter_lines():
            seen.append(line.encode())
            if line == ": keep-alive" and log.sent == 1 and not log.done:
                mock.release(text)  # only after a comment arrived while the mock was silent
    body = b"".join(line + b"\n" for line in seen)
    assert body.count(b": keep-alive\n") >= 1
    first_comment = seen.index(b": keep-alive")
    assert b'"w0 "' in b"".join(seen[:first_comment])
    assert b'"w1 "' in b"".join(seen[first_comment:])
    assert seen[-2:] == [b"data: [DONE]", b""]
    assert log.done
    assert usage_row(db, request_id)["status"] == 200


# ====================================================================================== embeddings


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


def float32(vector: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(vector)}f", struct.pack(f"<{len(vector)}f", *vector)))


def test_fake_embeddings_through_the_sdk(sdk: Callable[[str], OpenAI], db: Path) -> None:
    client = sdk(MEMBER)
    inputs = ["first text", "second text", "first text"]
    response = client.embeddings.with_raw_response.create(
        model="fake-embed", input=inputs, encoding_format="float", dimensions=24
    )
    as_float = response.parse()
    assert as_float.model == "fake-embed-1" and as_float.object == "list"
    vectors = [item.embedding for item in as_float.data]
    assert [item.index for item in as_float.data] == [0, 1, 2]
    assert all(len(v) == 24 and math.isclose(norm(v), 1.0, rel_tol=1e-9) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert as_float.usage.prompt_tokens > 0
    row = usage_row(db, response.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["model_alias"]) == ("embeddings", 200, "fake-embed")
    assert row["prompt_tokens"] == as_float.usage.prompt_tokens
    assert row["completion_tokens"] == 0

    decoded = client.embeddings.create(model="fake-embed", input=inputs, dimensions=24)  # base64
    assert [item.embedding for item in decoded.data] == [float32(v) for v in vectors]


def test_upstream_embeddings_float_and_base64(
    sdk: Callable[[str], OpenAI], http: httpx.Client, mock: MockUpstream, db: Path
) -> None:
    inputs = [unique("embed"), "x"]
    as_float = sdk(MEMBER).embeddings.create(
        model="up-embed", input=inputs, encoding_format="float", dimensions=5
    )
    assert [item.embedding for item in as_float.data] == [mock_vector(t, 5) for t in inputs]

    response = sdk(MEMBER).embeddings.with_raw_response.create(
        model="up-embed", input=inputs, dimensions=5
    )
    decoded = response.parse()  # the SDK asked for base64 and decoded it
    assert [item.embedding for item in decoded.data] == [mock_vector(t, 5) for t in inputs]
    [seen] = [
        r
        for r in list(mock.received)
        if r.path == EMBEDDINGS
        and r.json()
        == {"model": "embed-model", "input": inputs, "dimensions": 5, "encoding_format": "base64"}
    ]
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_SECRET}"
    row = usage_row(db, response.headers["x-request-id"])
    assert row["endpoint"] == "embeddings" and row["status"] == 200
    assert row["prompt_tokens"] == decoded.usage.prompt_tokens == row["total_tokens"]

    raw = http.post(
        EMBEDDINGS,
        headers=auth(MEMBER),
        json={"model": "up-embed", "input": inputs, "encoding_format": "base64", "dimensions": 3},
    )
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    for item, text in zip(raw.json()["data"], inputs, strict=True):
        assert (
            item["embedding"]
            == base64.b64encode(struct.pack("<3f", *mock_vector(text, 3))).decode()
        )  # passed through untouched


@pytest.mark.parametrize(
    ("key", "body", "status", "type_", "code", "param"),
    [
        (MEMBER, {"model": "fake-embed"}, 400, "invalid_request_error", None, "input"),
        (MEMBER, {"model": "fake-embed", "input": ""}, 400, "invalid_request_error", None, "input"),
        (MEMBER, {"model": "fake-embed", "input": []}, 400, "invalid_request_error", None, "input"),
        (MEMBER, {"input": "x"}, 400, "invalid_request_error", None, "model"),
        (
            MEMBER,
            {"model": "fake-embed", "input": "x", "dimensions": 0},
            400,
            "invalid_request_error",
            None,
            "dimensions",
        ),
        (
            MEMBER,
            {"model": "nope", "input": "x"},
            404,
            "invalid_request_error",
            "model_not_found",
            "model",
        ),
        (
            VIEWER,
            {"model": "fake-embed", "input": "x"},
            403,
            "permission_denied",
            "permission_denied",
            ...,
        ),
        (
            LIMITED,
            {"model": "fake-embed", "input": "x"},
            403,
            "permission_denied",
            "permission_denied",
            ...,
        ),
        (MEMBER, {"model": "up-embed-400", "input": "x"}, 400, "mock_error", "mock_400", ...),
    ],
    ids=[
        "missing-input",
        "empty-input",
        "empty-list",
        "missing-model",
        "zero-dimensions",
        "unknown-model",
        "viewer",
        "not-allowed",
        "upstream-400",
    ],
)
def test_embeddings_errors(
    http: httpx.Client,
    key: str,
    body: dict[str, Any],
    status: int,
    type_: str,
    code: str | None,
    param: Any,
) -> None:
    response = http.post(EMBEDDINGS, headers=auth(key), json=body)
    assert_response_error(response, status, type_, code, param)


def test_embeddings_empty_input_through_the_sdk(sdk: Callable[[str], OpenAI]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(MEMBER).embeddings.create(model="fake-embed", input="")
    assert info.value.param == "input" and info.value.type == "invalid_request_error"


# ========================================================================================== models


def listed(client: OpenAI) -> list[str]:
    return [model.id for model in client.models.list()]


def test_models_lists_the_aliases_a_key_may_use(sdk: Callable[[str], OpenAI]) -> None:
    page = sdk(ADMIN).models.list()
    assert [m.id for m in page] == AVAILABLE
    assert all(m.object == "model" and m.owned_by == OWNER[m.id] for m in page)
    assert listed(sdk(MEMBER)) == AVAILABLE
    assert listed(sdk(VIEWER)) == AVAILABLE  # viewers may list, not call
    assert listed(sdk(LIMITED)) == ["fake-model", "up-stream"]


def test_models_needs_a_key(gateway: GandalfServer, http: httpx.Client) -> None:
    with (
        OpenAI(base_url=gateway.base_url, api_key="gnd_" + "y" * 43, max_retries=0) as stranger,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        stranger.models.list()
    assert info.value.code == "invalid_api_key"
    assert_response_error(http.get("/v1/models"), 401, "invalid_request_error", "invalid_api_key")
    response = http.post("/v1/models", headers=auth(ADMIN))
    assert_response_error(response, 405, "invalid_request_error", "method_not_allowed")


# ======================================================================================== shutdown


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


SHUTDOWN_TIMEOUT = 2.0


def read_all(chunks: Iterator[bytes]) -> tuple[bytes, str | None]:
    """Everything a raw body delivers, and how it failed if it did not end cleanly."""
    got = b""
    try:
        for piece in chunks:
            got += piece
    except httpx.TransportError as exc:
        return got, f"{type(exc).__name__}: {exc}"
    return got, None


@contextlib.contextmanager
def shutdown_server(
    tmp: Path, dead_port: int, interface: str
) -> Iterator[tuple[GandalfServer, MockUpstream]]:
    with running_upstream() as own_mock:
        config = gateway_config(
            own_mock, dead_port, shutdown_timeout=f"{SHUTDOWN_TIMEOUT:g}s", interface=interface
        )
        with GandalfServer(tmp, config, unset=[UNSET_VAR], name="shutdown") as server:
            yield server, own_mock


@pytest.mark.parametrize("interface", ["asgi", "rsgi"])
def test_sigterm_lets_an_in_flight_stream_finish(
    dead_port: int, tmp_path: Path, interface: str
) -> None:
    """SIGTERM while a stream is held by its upstream: the listener closes, and the
    stream, released well within shutdown_timeout, ends normally; then the process exits 0."""
    text = unique("finishing")
    with (
        shutdown_server(tmp_path, dead_port, interface) as (server, own_mock),
        gated(own_mock, text),
        httpx.Client(base_url=server.url, timeout=READ_TIMEOUT) as client,
        client.stream("POST", CHAT, headers=auth(MEMBER), json=stream_body("up-slow", text)) as r,
    ):
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        chunks = r.iter_raw()
        head = read_until(chunks, b'"w0 "')
        server.send_sigterm()
        wait_until(lambda: refuses_connections(server.port), 5, "the listener to close")
        assert server.running, "exited with a stream in flight"
        own_mock.release(text, SLOW_CHUNKS)  # the upstream goes on
        rest, failure = read_all(chunks)
        code = server.wait(SHUTDOWN_TIMEOUT + 15)
    assert failure is None, f"{failure}\n{server.diagnostics()}"
    assert code == 0, server.diagnostics()
    body = head + rest
    assert body.endswith(DONE) and b'"error"' not in body
    contents = [p["choices"][0]["delta"].get("content") for p in data_payloads(body)[:-1]]
    assert "".join(c for c in contents if c) == "".join(words(SLOW_CHUNKS))
    assert usage_row(tmp_path / "gandalf.db", request_id)["status"] == 200


@pytest.mark.parametrize("interface", ["asgi", "rsgi"])
def test_sigterm_ends_a_stream_that_outlives_the_shutdown_timeout(
    dead_port: int, tmp_path: Path, interface: str
) -> None:
    """A stream whose upstream never finishes: after shutdown_timeout the client gets one
    ``server_shutdown`` error event and a clean end of the body, the usage row says 503,
    and the process exits 0."""
    text = unique("endless")
    with (
        shutdown_server(tmp_path, dead_port, interface) as (server, own_mock),
        gated(own_mock, text),
        httpx.Client(base_url=server.url, timeout=READ_TIMEOUT) as client,
        client.stream("POST", CHAT, headers=auth(MEMBER), json=stream_body("up-silent", text)) as r,
    ):
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        chunks = r.iter_raw()
        head = read_until(chunks, b'"w0 "')
        server.send_sigterm()
        rest, failure = read_all(chunks)  # bounded: the shutdown timeout, or the worker kill
        code = server.wait(SHUTDOWN_TIMEOUT + 15)
    diagnostics = server.diagnostics()
    assert failure is None, (
        "the stream was cut without an error event and a clean end "
        f"({failure}; received after SIGTERM: {rest[-200:]!r})\n{diagnostics}"
    )
    assert code == 0, diagnostics
    payloads = data_payloads(head + rest)
    assert payloads[-1] == {
        "error": {
            "message": payloads[-1]["error"]["message"],
            "type": "service_unavailable",
            "param": None,
            "code": "server_shutdown",
        }
    }
    assert payloads[-1]["error"]["message"]
    assert "[DONE]" not in payloads and all("choices" in p for p in payloads[:-1])
    assert b"w1 " not in rest  # its upstream never sent more
    row = usage_row(tmp_path / "gandalf.db", request_id)
    assert row["status"] == 503 and row["completion_tokens"] == 1
