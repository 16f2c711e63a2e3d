"""The server seam against hostile or broken clients, end to end: a real
``gandalf serve`` (both granian interfaces) spoken to over raw sockets.

Timeouts are exercised with a small ``server.read_timeout``; the tests wait on
reads from the socket (bounded by a generous socket timeout), never on sleeps.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gandalf.auth.apikey import generate_key
from tests.serve import GandalfServer, route, wait_until
from tests.upstream import MockUpstream

MEMBER = generate_key()
READ_TIMEOUT = 0.5  # the gateway's server.read_timeout in this module
SOCKET_TIMEOUT = 10.0  # a failure bound for every socket read, never a sync point
OLLAMA_SECRET = "ollama-secret"


@pytest.fixture(scope="module", params=["asgi", "rsgi"])
def gateway(
    mock: MockUpstream, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[GandalfServer]:
    tmp = tmp_path_factory.mktemp(f"seam-{request.param}")
    root = f"http://127.0.0.1:{mock.port}"
    config = {
        "server": {
            "interface": request.param,
            "read_timeout": f"{int(READ_TIMEOUT * 1000)}ms",
            "access_log": False,
        },
        "providers": [
            {"name": "fake", "type": "fake"},
            {"name": "up", "type": "openai", "base_url": root + "/v1", "api_key": "sk-up"},
            {"name": "ol", "type": "ollama", "base_url": root + "/v1", "api_key": OLLAMA_SECRET},
        ],
        "routes": [
            route("fake-model", "fake", "fake-1"),
            route("up-late", "up", "late"),
            route("ol-chat", "ol", "stream-3"),
        ],
        "keys": [{"name": "member", "key": MEMBER, "role": "member"}],
        "resilience": {"max_attempts": 1},
    }
    with GandalfServer(tmp, config) as server:
        yield server


def connect(server: GandalfServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return got
        got += chunk


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def request_head(path: str, length: int, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def openai_error(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


BEARER = f"Authorization: Bearer {MEMBER}"


# ---------------------------------------------------------------------------- short bodies


@pytest.mark.parametrize(
    ("path", "shape"), [("/v1/chat/completions", "openai"), ("/api/chat", "ollama")]
)
def test_a_body_shorter_than_its_content_length_is_a_400_in_the_apis_shape(
    gateway: GandalfServer, path: str, shape: str
) -> None:
    """The client announces 100 bytes, sends 2 and stops sending: a 400 in the
    API's shape (it was a plain-text 500 from granian)."""
    with connect(gateway) as sock:
        sock.sendall(request_head(path, 100, BEARER) + b"{}")
        sock.shutdown(socket.SHUT_WR)
        status, headers, body = parse(read_all(sock))
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    if shape == "openai":
        assert openai_error(body)["code"] == "incomplete_body"
    else:
        assert set(orjson.loads(body)) == {"error"}


@pytest.mark.parametrize(
    ("path", "shape"), [("/v1/chat/completions", "openai"), ("/api/chat", "ollama")]
)
def test_a_body_that_stops_arriving_is_a_408_and_the_connection_closes(
    gateway: GandalfServer, path: str, shape: str
) -> None:
    with connect(gateway) as sock:
        started = time.monotonic()
        sock.sendall(request_head(path, 100, BEARER) + b"{}")
        raw = read_all(sock)  # returns once the server closed the connection
        took = time.monotonic() - started
    status, headers, body = parse(raw)
    assert status == 408, raw
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    if shape == "openai":
        assert openai_error(body)["code"] == "request_timeout"
    else:
        assert "did not arrive" in orjson.loads(body)["error"]
    assert took < SOCKET_TIMEOUT / 2


def test_a_keyless_request_is_refused_before_its_body_is_read(gateway: GandalfServer) -> None:
    """No key: 401 at once, although the body never arrives (it used to be read,
    4 MiB of it, before the key was looked at)."""
    for path in ("/v1/chat/completions", "/api/chat"):
        with connect(gateway) as sock:
            started = time.monotonic()
            sock.sendall(request_head(path, 4_000_000) + b'{"model":')
            head = sock.recv(65536)
            took = time.monotonic() - started
        assert parse(head)[0] == 401, head
        assert took < READ_TIMEOUT, took  # not the 408 of a body read


def test_an_idle_connection_is_closed_after_the_read_timeout(gateway: GandalfServer) -> None:
    """A connection that never sends a byte is closed (it used to stay open)."""
    with connect(gateway) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""
        took = time.monotonic() - started
    assert READ_TIMEOUT * 0.5 <= took < SOCKET_TIMEOUT / 2, took


def test_two_authorization_headers_are_refused(gateway: GandalfServer) -> None:
    body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "x"}]})
    other = f"Authorization: Bearer {generate_key()}"
    for first, second in ((BEARER, other), (other, BEARER)):
        with connect(gateway) as sock:
            sock.sendall(
                request_head("/v1/chat/completions", len(body), first, second, "Connection: close")
                + body
            )
            status, _, reply = parse(read_all(sock))
        assert status == 400, reply
        assert "more than one" in openai_error(reply)["message"]


# ---------------------------------------------------------------------------- disconnects


def usage_row(db: Path, request_id: str) -> sqlite3.Row:
    found: list[sqlite3.Row] = []

    def written() -> bool:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.row_factory = sqlite3.Row
            found[:] = conn.execute(
                "SELECT * FROM usage_records WHERE request_id = ?", (request_id,)
            ).fetchall()
        return bool(found)

    wait_until(written, 5.0, f"the usage row of request {request_id}")
    assert len(found) == 1
    return found[0]


def test_a_client_leaving_a_non_streamed_call_cancels_it_and_records_499(
    gateway: GandalfServer, mock: MockUpstream
) -> None:
    text = f"leaving-{uuid.uuid4().hex}"
    request_id = f"rid-{uuid.uuid4().hex}"
    log = mock.stream_log(text)
    body = orjson.dumps({"model": "up-late", "messages": [{"role": "user", "content": text}]})
    watchdog = threading.Timer(SOCKET_TIMEOUT, mock.release, (text, 10))
    watchdog.start()
    try:
        with connect(gateway) as sock:
            sock.sendall(
                request_head(
                    "/v1/chat/completions", len(body), BEARER, f"X-Request-Id: {request_id}"
                )
                + body
            )
            wait_until(lambda: log.requests == 1, 5.0, "the upstream to receive the call")
        # the client hung up while the upstream holds its answer
        wait_until(lambda: log.closed, 5.0, "the upstream call to be cancelled")
    finally:
        watchdog.cancel()
        mock.release(text, 10)
    assert usage_row(gateway.tmp / "gandalf.db", request_id)["status"] == 499


# ---------------------------------------------------------------------------- sanity


def test_a_chat_completion_is_served(gateway: GandalfServer) -> None:
    body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
    with connect(gateway) as sock:
        sock.sendall(
            request_head("/v1/chat/completions", len(body), BEARER, "Connection: close") + body
        )
        status, headers, reply = parse(read_all(sock))
    assert status == 200, reply
    assert orjson.loads(reply)["choices"][0]["message"]["content"]
    assert headers["x-gandalf-provider"] == "fake"
