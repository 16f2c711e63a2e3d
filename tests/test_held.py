"""What held when Gandalf was attacked (issue 11, "What held"), kept held.

Through a real ``gandalf serve`` with native APIs mounted, over raw sockets
where a client library would not send what an attacker does:
- ``allowed_models`` cannot be bypassed on any API by case, whitespace,
  lookalike characters, JSON escapes, ``%2F`` or ``..`` in a path;
- no request is smuggled behind a body refused as too large;
- a caller's ``x-request-id`` is echoed only when it is harmless;
- the provider's secret is in no log line, error body, model list or database file;
- ``kill -9`` leaves a database that passes SQLite's integrity check.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gandalf.auth.apikey import generate_key
from tests.mock_anthropic import MockAnthropic
from tests.mock_gemini import MockGemini
from tests.serve import NATIVE_ROUTES, GandalfServer, native_providers, route, wait_until
from tests.upstream import MockUpstream, running_upstream

KEY = generate_key()
LIMITED = generate_key()  # may use "gemini" only
ANTHROPIC_SECRET = "sk-ant-held-" + "s3cr3t" * 4
GEMINI_SECRET = "gemini-held-" + "s3cr3t" * 4
AZURE_SECRET = "azure-held-" + "s3cr3t" * 4
OPENAI_SECRET = "sk-held-" + "s3cr3t" * 4
SECRETS = (ANTHROPIC_SECRET, GEMINI_SECRET, AZURE_SECRET, OPENAI_SECRET)
MAX_BODY = 2048


@pytest.fixture(scope="module")
def openai_mock() -> Iterator[MockUpstream]:
    with running_upstream() as mock:
        yield mock


@pytest.fixture(scope="module")
def gateway(
    anthropic_mock: MockAnthropic,
    gemini_mock: MockGemini,
    openai_mock: MockUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GandalfServer]:
    root = f"http://127.0.0.1:{openai_mock.port}"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        dead = holder.getsockname()[1]
    config = {
        "server": {"access_log": True, "max_body_bytes": MAX_BODY},
        "providers": [
            *native_providers(
                anthropic_mock.base_url,
                gemini_mock.base_url,
                root,
                (ANTHROPIC_SECRET, GEMINI_SECRET, AZURE_SECRET),
            ),
            {"name": "up", "type": "openai", "base_url": f"{root}/v1", "api_key": OPENAI_SECRET},
            {
                "name": "dark",
                "type": "openai",
                "base_url": f"http://127.0.0.1:{dead}/v1",
                "api_key": OPENAI_SECRET,
            },
        ],
        "routes": [
            *NATIVE_ROUTES,
            route("up", "up", "ok-model"),
            route("up-500", "up", "status-500"),
            route("dark", "dark", "ok-model"),
        ],
        "keys": [
            {"name": "app", "key": KEY, "role": "member"},
            {"name": "limited", "key": LIMITED, "role": "member", "allowed_models": ["gemini"]},
        ],
    }
    with GandalfServer(tmp_path_factory.mktemp("held"), config) as server:
        yield server


@pytest.fixture(scope="module")
def http(gateway: GandalfServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30.0) as client:
        yield client


def raw(port: int, request: bytes, *, quiet_after: float = 10.0) -> bytes:
    """Send ``request`` as is; everything the server sends until it closes the
    connection or stays silent for ``quiet_after`` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=quiet_after) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------- allowed_models

# Spellings of a model the limited key may not use; "gemini" is the one it may.
_NOT_GEMINI = [
    "claude",
    "Gemini",
    "GEMINI",
    " gemini",
    "gemini ",
    "gem\u0131ni",
    "gemini\u200b",
    "\uff47\uff45\uff4d\uff49\uff4e\uff49",  # fullwidth
    "gemini/../claude",
]


@pytest.mark.parametrize("model", _NOT_GEMINI)
def test_allowed_models_holds_on_every_api(http: httpx.Client, model: str) -> None:
    def chat(extra: str) -> str:
        return (
            '{"model":' + json.dumps(model) + extra + ',"messages":[{"role":"user","content":"x"}]}'
        )

    quoted = httpx.URL(f"/{model}").raw_path.decode()[1:]
    requests = [
        (
            "/v1/chat/completions",
            {"authorization": f"Bearer {LIMITED}"},
            chat(""),
        ),
        (
            "/v1/messages",
            {"x-api-key": LIMITED},
            chat(',"max_tokens":5'),
        ),
        (
            "/api/chat",
            {"authorization": f"Bearer {LIMITED}"},
            chat(',"stream":false'),
        ),
        (
            f"/v1beta/models/{quoted}:generateContent",
            {"x-goog-api-key": LIMITED},
            '{"contents":[{"parts":[{"text":"x"}]}]}',
        ),
        (
            f"/openai/deployments/{quoted}/chat/completions?api-version=2024-10-21",
            {"api-key": LIMITED},
            '{"messages":[{"role":"user","content":"x"}]}',
        ),
    ]
    for path, headers, body in requests:
        reply = http.post(
            path, headers={**headers, "content-type": "application/json"}, content=body.encode()
        )
        assert reply.status_code in (400, 403, 404), (path, model, reply.status_code, reply.text)


@pytest.mark.parametrize(
    "spelling",
    ['"cl\\u0061ude"', '"\\u0063laude"', '"claude"'],
)
def test_a_json_escape_names_the_same_model_and_is_refused_the_same(
    http: httpx.Client, spelling: str
) -> None:
    for path, header in (("/v1/chat/completions", "authorization"), ("/v1/messages", "x-api-key")):
        value = f"Bearer {LIMITED}" if header == "authorization" else LIMITED
        body = (
            '{"model":' + spelling + ',"max_tokens":5,"messages":[{"role":"user","content":"x"}]}'
        )
        reply = http.post(path, headers={header: value}, content=body.encode())
        assert reply.status_code == 403, (path, spelling, reply.text)


def test_encoded_slashes_and_dots_in_native_paths_do_not_reach_another_model(
    http: httpx.Client,
) -> None:
    limited = {"x-goog-api-key": LIMITED}
    body = {"contents": [{"parts": [{"text": "x"}]}]}
    for path in (
        "/v1beta/models/gemini%2F..%2Fclaude:generateContent",
        "/v1beta/models/gemini/../claude:generateContent",
        "/v1beta/models/..%2Fclaude:generateContent",
        "/v1beta/models/claude%3AgenerateContent%3F:generateContent",
    ):
        reply = http.post(path, json=body, headers=limited)
        assert reply.status_code in (403, 404), (path, reply.status_code, reply.text)
    azure = {"api-key": LIMITED}
    for deployment in ("gemini%2F..%2Faz-chat", "..%2Faz-chat", "az-chat%2F"):
        reply = http.post(
            f"/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21",
            json={"messages": [{"role": "user", "content": "x"}]},
            headers=azure,
        )
        assert reply.status_code in (403, 404), (deployment, reply.status_code, reply.text)


# ---------------------------------------------------------------------------- framing


def test_nothing_is_smuggled_behind_a_body_too_large(gateway: GandalfServer) -> None:
    """A refused body's bytes are never read as a request of their own: the
    body begins with a complete request that must not be answered."""
    smuggled = (
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    )
    body = smuggled + b"x" * (MAX_BODY + 100)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
        + KEY.encode()
        + b"\r\ncontent-type: application/json\r\n"
    )
    declared = head + b"content-length: %d\r\n\r\n" % len(body) + body
    chunked = (
        head + b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    for wire in (declared, chunked):
        # Silence for a second after the 413 means no second answer is coming.
        answer = raw(gateway.port, wire, quiet_after=1.0)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert answer.count(b"HTTP/1.1 ") == 1, answer  # the models list never answered
        assert b'"object":"list"' not in answer


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [(b"abc-123", True), (b"<script>", False), (b"a" * 500, False), (b"x\xff", False)],
)
def test_a_request_id_is_echoed_only_when_harmless(
    gateway: GandalfServer, sent: bytes, echoed: bool
) -> None:
    answer = raw(
        gateway.port,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-request-id: "
        + sent
        + b"\r\n\r\n",
    )
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    line = next(x for x in head.split(b"\r\n") if x.startswith(b"x-request-id:"))
    assert (line == b"x-request-id: " + sent.lower()) is echoed, line


# ---------------------------------------------------------------------------- secrets


def test_no_secret_in_errors_logs_model_lists_or_the_database(
    http: httpx.Client, gateway: GandalfServer
) -> None:
    bearer = {"authorization": f"Bearer {KEY}"}
    bodies = []
    for model in ("dark", "up-500", "up", "nosuch"):
        reply = http.post(
            "/v1/chat/completions",
            headers=bearer,
            json={"model": model, "messages": [{"role": "user", "content": "x"}]},
        )
        bodies.append(reply.text + json.dumps(dict(reply.headers)))
    bodies.append(http.get("/v1/models", headers=bearer).text)
    bodies.append(http.get("/v1beta/models", headers={"x-goog-api-key": KEY}).text)
    bodies.append(http.get("/api/tags", headers=bearer).text)
    db = Path(gateway.tmp) / "gandalf.db"
    wait_until(lambda: db.exists(), 5, "the database")
    stored = b"".join(p.read_bytes() for p in db.parent.glob("gandalf.db*"))
    for secret in SECRETS:
        assert all(secret not in text for text in bodies), secret
        assert secret not in gateway.stdout() and secret not in gateway.stderr(), secret
        assert secret.encode() not in stored, secret


# ---------------------------------------------------------------------------- kill -9


def test_kill_9_leaves_an_intact_database(openai_mock: MockUpstream, tmp_path: Path) -> None:
    config = {
        "server": {"access_log": False},
        "providers": [{"name": "fake", "type": "fake"}],
        "routes": [route("fake-model", "fake", "fake-model")],
        "keys": [{"name": "app", "key": KEY, "role": "member"}],
    }
    server = GandalfServer(tmp_path, config).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for i in range(200):
                reply = client.post(
                    "/v1/chat/completions",
                    headers={"authorization": f"Bearer {KEY}"},
                    json={"model": "fake-model", "messages": [{"role": "user", "content": f"{i}"}]},
                )
                assert reply.status_code == 200
        db = tmp_path / "gandalf.db"

        def some_rows() -> bool:
            with sqlite3.connect(db) as conn:
                return int(conn.execute("SELECT count(*) FROM usage_records").fetchone()[0]) > 0

        wait_until(some_rows, 10, "usage rows written")
    finally:
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = int(conn.execute("SELECT count(*) FROM usage_records").fetchone()[0])
    assert 0 < rows <= 200
