"""A seeded fuzz run against ``gandalf serve``: never a 500, always the API's error shape.

Each interface (ASGI and RSGI) gets the same 1,500 hostile requests over
raw sockets, so nothing a client library would refuse to send is off limits:
deep nesting, invalid UTF-8 in keys and values, mutated and truncated bodies,
wrong types, mixed lists, absurd sizes, duplicate and conflicting headers, a
``content-length`` that lies, strange paths. The generator is seeded, so a
failure names a request that can be sent again.

What must hold for every answer the application wrote:
- the status is not 5xx unless an upstream could have caused it (502/503/504
  come from the providers' side; 500 never);
- an error carries ``content-type: application/json`` and a body in the
  calling API's shape (OpenAI, Anthropic, Google or Ollama);
- the worker keeps serving (``/healthz``) and logged no traceback.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gandalf.auth.apikey import generate_key
from tests.mock_anthropic import MockAnthropic
from tests.mock_gemini import MockGemini
from tests.serve import NATIVE_ROUTES, GandalfServer, native_providers, route
from tests.upstream import MockUpstream, running_upstream

KEY = generate_key()
VIEWER = generate_key()
SEED = 20261201
REQUESTS = 1500  # per interface
SOCKET_TIMEOUT = 10.0

Shape = Callable[[Any], bool]


def _openai_shape(doc: Any) -> bool:
    error = doc.get("error") if isinstance(doc, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and "code" in error
    )


def _anthropic_shape(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and doc.get("type") == "error"
        and isinstance(doc.get("error"), dict)
        and isinstance(doc["error"].get("type"), str)
        and isinstance(doc["error"].get("message"), str)
    )


def _google_shape(doc: Any) -> bool:
    error = doc.get("error") if isinstance(doc, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("code"), int)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("status"), str)
    )


def _ollama_shape(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("error"), str)


# (method, path, seed body, error shape)
_ENDPOINTS: list[tuple[str, str, dict[str, Any] | None, Shape]] = [
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hello"}],
            "temperature": 0.2,
            "max_tokens": 16,
        },
        _openai_shape,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "up",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "stream_options": {"include_usage": False},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        },
        _openai_shape,
    ),
    (
        "POST",
        "/v1/embeddings",
        {"model": "fake-model", "input": ["one", "two"], "dimensions": 8},
        _openai_shape,
    ),
    ("GET", "/v1/models", None, _openai_shape),
    (
        "POST",
        "/v1/messages",
        {
            "model": "claude",
            "max_tokens": 32,
            "messages": [{"role": "user", "content": "hello"}],
        },
        _anthropic_shape,
    ),
    (
        "POST",
        "/v1/messages/count_tokens",
        {"model": "claude", "messages": [{"role": "user", "content": "hello"}]},
        _anthropic_shape,
    ),
    (
        "POST",
        "/v1beta/models/gemini:generateContent",
        {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]},
        _google_shape,
    ),
    ("GET", "/v1beta/models", None, _google_shape),
    (
        "POST",
        "/openai/deployments/az-chat/chat/completions?api-version=2024-10-21",
        {"messages": [{"role": "user", "content": "hello"}]},
        _openai_shape,
    ),
    (
        "POST",
        "/api/chat",
        {"model": "ol-chat", "messages": [{"role": "user", "content": "hi"}], "stream": False},
        _ollama_shape,
    ),
    ("POST", "/api/embed", {"model": "ol-chat", "input": "hi"}, _ollama_shape),
    ("GET", "/api/tags", None, _ollama_shape),
]

_STRANGE_PATHS = [
    # A raw "<" in the request line is refused by granian's HTTP parser before the
    # app sees it (a bare 400, the one answer Gandalf cannot shape); percent-encoded,
    # it reaches Gandalf and must get a JSON 404.
    "/index.php?x=%3Cscript%3Ealert(1)%3C/script%3E",
    "/v1/chat/completions/../../etc/passwd",
    "/%2e%2e/%2e%2e/admin",
    "/v1/%0d%0aX-Injected:%20yes",
    "/v1//models",
    "/v1beta/models/:generateContent",
    "/v1beta/models/gemini:unknownMethod",
    "/openai/deployments//chat/completions",
    "/" + "a" * 3000,
    "/v1/models?" + "q=1&" * 500,
]


def _shape_for(path: str) -> Shape:
    if path.startswith("/v1/messages"):
        return _anthropic_shape
    if path.startswith("/v1beta/"):
        return _google_shape
    if path.startswith("/api/"):
        return _ollama_shape
    return _openai_shape


# --------------------------------------------------------------------------- mutations


def _nest(rng: random.Random) -> bytes:
    depth = rng.choice([200, 1000, 3000, 20000])
    if rng.random() < 0.5:
        return b"[" * depth + b"]" * depth
    inner = b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"model":"fake-model","messages":[{"role":"user","content":' + inner + b"}]}"


def _bad_utf8(body: bytes, rng: random.Random) -> bytes:
    junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
    quotes = [i for i, c in enumerate(body) if c == 0x22]  # inside some string
    if not quotes:
        return body + junk
    at = rng.choice(quotes) + 1
    return body[:at] + junk + body[at:]


_ODD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**63,
    -(2**70),
    1.5e308,
    "",
    "x" * 5000,
    [],
    {},
    [1, "a", None, {}],
    [[1, 2], "a"],
    {"$ref": "#"},
    "\u0000\u001b[31m",
    100_000_000,
]


def _retype(doc: Any, rng: random.Random) -> Any:
    """Replace one value somewhere in ``doc`` with something of another type."""
    if isinstance(doc, dict) and doc:
        key = rng.choice(list(doc))
        out = dict(doc)
        out[key] = _retype(doc[key], rng) if rng.random() < 0.4 else rng.choice(_ODD_VALUES)
        return out
    if isinstance(doc, list) and doc:
        out_list = list(doc)
        i = rng.randrange(len(doc))
        out_list[i] = _retype(doc[i], rng) if rng.random() < 0.4 else rng.choice(_ODD_VALUES)
        return out_list
    return rng.choice(_ODD_VALUES)


def _mutate(body: bytes, rng: random.Random) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 6)):
        if not data:
            break
        i = rng.randrange(len(data))
        kind = rng.random()
        if kind < 0.4:
            data[i] = rng.randrange(256)
        elif kind < 0.7:
            del data[i]
        else:
            data[i:i] = bytes([rng.choice(b'{}[]",:\\0123456789eE+-.tfn ')])
    return bytes(data)


def _body(seed: dict[str, Any] | None, rng: random.Random) -> bytes:
    base = json.dumps(seed or {}).encode()
    kind = rng.randrange(14)
    if kind == 0:
        return _nest(rng)
    if kind == 1:
        return _bad_utf8(base, rng)
    if kind == 2:
        return _mutate(base, rng)
    if kind == 3:
        return base[: rng.randrange(len(base) + 1)]
    if kind == 4:
        return json.dumps(_retype(seed or {}, rng)).encode()
    if kind == 5:
        return rng.choice([b"", b"null", b"[]", b'"text"', b"42", b"true", b"\x00" * 8])
    if kind == 6:
        return base.replace(b"1", b"NaN", 1).replace(b"0.2", b"Infinity")
    if kind == 7:  # escaped keys: the same fields, spelled differently
        return base.replace(b'"model"', b'"mod\\u0065l"').replace(b'"stream', b'"str\\u0065am')
    if kind == 8:  # duplicate keys
        return base[:-1] + b', "model": 7, "messages": "no"}' if base.endswith(b"}") else base
    if kind == 9:  # absurd sizes a client controls
        doc = dict(seed or {})
        field = rng.choice(["n", "max_tokens", "dimensions", "top_logprobs", "max_output_tokens"])
        doc[field] = rng.choice([10**9, 2**31, -5, 0, 10**30])
        return json.dumps(doc).encode()
    if kind == 10:
        return (
            b'{"model":"fake-model","messages":[{"role":"user","content":"' + b"\\ud800" + b'"}]}'
        )
    if kind == 11:  # huge numbers
        return base.replace(b"16", b"1" + b"0" * 400, 1).replace(b"8", b"9" * 500, 1)
    return base  # valid: the happy path stays in the mix


def _credentials(rng: random.Random, path: str) -> list[tuple[bytes, bytes]]:
    kind = rng.randrange(10)
    if kind == 0:
        return []
    if kind == 1:
        return [(b"authorization", b"Bearer gnd_" + b"x" * 43)]
    if kind == 2:
        return [(b"authorization", b"Bearer " + KEY.encode()), (b"authorization", b"Bearer zz")]
    if kind == 3:
        return [(b"authorization", b"Bearer \xff\xfe" + KEY.encode()[2:])]
    if kind == 4:
        return [(b"authorization", b"Basic " + KEY.encode())]
    if kind == 5:
        return [(b"authorization", b"Bearer " + VIEWER.encode())]
    if kind == 6 and path.startswith("/v1beta"):
        return [(b"x-goog-api-key", KEY.encode())]
    if kind == 7:
        return [(b"x-api-key", KEY.encode())]
    return [(b"authorization", b"Bearer " + KEY.encode())]


def _extra_headers(rng: random.Random) -> list[tuple[bytes, bytes]]:
    kind = rng.randrange(8)
    if kind == 0:
        return [(b"x-request-id", rng.choice([b"a" * 500, b"\xff\xfe", b"<script>", b"ok-1"]))]
    if kind == 1:
        return [(b"content-type", rng.choice([b"text/plain", b"application/json; charset=latin1"]))]
    if kind == 2:
        return [(b"x-filler-%d" % i, b"v" * 50) for i in range(rng.choice([10, 90]))]
    if kind == 3:
        return [(b"x-big", b"v" * rng.choice([4000, 20000]))]
    return []


class Case:
    __slots__ = ("body", "headers", "length", "method", "path", "shape")

    def __init__(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        length: int | None,
        shape: Shape,
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.length = length  # the content-length to claim; None: the true one
        self.shape = shape

    def describe(self) -> str:
        return (
            f"{self.method} {self.path[:120]} headers={self.headers!r:.300} body={self.body!r:.300}"
        )

    def wire(self, port: int) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1".encode("latin-1")]
        lines.append(b"host: 127.0.0.1:%d" % port)
        lines.append(b"connection: close")
        lines.extend(name + b": " + value for name, value in self.headers)
        if self.method == "POST" or self.body:
            length = len(self.body) if self.length is None else self.length
            lines.append(b"content-length: %d" % length)
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def cases(seed: int, count: int) -> Iterator[Case]:
    rng = random.Random(seed)
    for _ in range(count):
        if rng.random() < 0.06:
            path = rng.choice(_STRANGE_PATHS)
            method = rng.choice(["GET", "POST", "DELETE", "PUT"])
            body = b"{}" if method == "POST" else b""
            yield Case(method, path, _credentials(rng, path), body, None, _shape_for(path))
            continue
        method, path, seed_body, shape = rng.choice(_ENDPOINTS)
        if rng.random() < 0.05:
            method = "PATCH" if method == "POST" else "POST"
        body = _body(seed_body, rng) if seed_body is not None else b""
        length: int | None = None
        if body and rng.random() < 0.04:
            length = len(body) + rng.choice([1, 1000])  # claims more than it sends
        headers = _credentials(rng, path) + _extra_headers(rng)
        yield Case(method, path, headers, body, length, shape)


# --------------------------------------------------------------------------- the wire


class Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def send(port: int, case: Case) -> Answer | None:
    """The answer, or None when the server closed the connection without one
    (a lying content-length: nothing more will come, so the server gives up)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    except OSError as exc:  # the server is gone
        return Answer(0, {}, repr(exc).encode())
    with sock:
        # The server may answer early and close (a 413 or 401) while we still send.
        with contextlib.suppress(OSError):
            sock.sendall(case.wire(port))
            if case.length is not None:
                sock.shutdown(socket.SHUT_WR)  # the promised bytes never come
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                return Answer(0, {}, b"no answer within %d s" % SOCKET_TIMEOUT)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding") == b"chunked":
        body = _dechunk(body)
    return Answer(status, headers, body)


# --------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def openai_mock() -> Iterator[MockUpstream]:
    with running_upstream() as mock:
        yield mock


@pytest.fixture(scope="module", params=["asgi", "rsgi"])
def gateway(
    request: pytest.FixtureRequest,
    anthropic_mock: MockAnthropic,
    gemini_mock: MockGemini,
    openai_mock: MockUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GandalfServer]:
    root = f"http://127.0.0.1:{openai_mock.port}"
    config = {
        "server": {"access_log": True, "interface": request.param, "read_timeout": "2s"},
        "providers": [
            {"name": "fake", "type": "fake"},
            {"name": "up", "type": "openai", "base_url": f"{root}/v1", "api_key": "sk-up"},
            *native_providers(anthropic_mock.base_url, gemini_mock.base_url, root),
        ],
        "routes": [
            route("fake-model", "fake", "fake-model"),
            route("up", "up", "ok-model"),
            *NATIVE_ROUTES,
        ],
        "keys": [
            {"name": "app", "key": KEY, "role": "member"},
            {"name": "viewer", "key": VIEWER, "role": "viewer"},
        ],
    }
    with GandalfServer(tmp_path_factory.mktemp(f"fuzz-{request.param}"), config) as server:
        yield server


def test_fuzz_never_500_and_always_the_apis_shape(gateway: GandalfServer) -> None:
    all_cases = list(cases(SEED, REQUESTS))
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda case: send(gateway.port, case), all_cases))
    problems: list[str] = []
    for case, answer in zip(all_cases, answers, strict=True):
        if answer is None:
            if case.length is None:
                problems.append(f"no answer at all: {case.describe()}")
            continue
        if answer.status == 0:
            problems.append(f"no answer ({answer.body!r}): {case.describe()}")
            continue
        if answer.status >= 500 and answer.status not in (502, 503, 504):
            problems.append(f"{answer.status}: {case.describe()} -> {answer.body[:300]!r}")
            continue
        if answer.status < 400:
            continue
        content_type = answer.headers.get(b"content-type", b"")
        if not content_type.startswith(b"application/json"):
            problems.append(
                f"{answer.status} without a JSON content type ({content_type!r}): "
                f"{case.describe()} -> {answer.body[:200]!r}"
            )
            continue
        try:
            doc = json.loads(answer.body)
        except ValueError:
            problems.append(f"{answer.status} body not JSON: {case.describe()}")
            continue
        if not case.shape(doc):
            problems.append(f"{answer.status} in the wrong shape {doc!r:.200}: {case.describe()}")
    assert not problems, f"{len(problems)} bad answer(s):\n" + "\n".join(problems[:25])
    # The run reached the handlers, not just the front door: answers served and refused.
    statuses = Counter(answer.status for answer in answers if answer is not None)
    served = sum(n for status, n in statuses.items() if status < 300)
    refused = sum(n for status, n in statuses.items() if 400 <= status < 500)
    assert served >= REQUESTS // 10 and refused >= REQUESTS // 3, statuses
    # The worker is still serving, and nothing was logged as an internal error.
    healthy = send(gateway.port, Case("GET", "/healthz", [], b"", None, _openai_shape))
    assert healthy is not None and healthy.status == 200
    stderr = gateway.stderr()
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr[-3000:]
