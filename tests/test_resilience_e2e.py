"""End to end: failover and coalescing through a real ``gandalf serve``.

One gateway (module fixture) in front of one MockUpstream, whose behaviour the
target model picks. Providers ``broken`` and ``good`` are both the mock (their
routes pick a failing or a working model); ``dead`` refuses connections. The
usage rows are read after the gateway stopped (it flushes on shutdown).
Nothing sleeps: conditions are polled with a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gandalf.auth.apikey import generate_key
from tests.serve import GandalfServer, wait_until
from tests.upstream import MockUpstream

KEY = generate_key()
CHAT_PATH = "/v1/chat/completions"


def target(provider: str, model: str, priority: int) -> dict[str, Any]:
    return {"provider": provider, "model": model, "priority": priority}


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


class Gateway:
    def __init__(self, server: GandalfServer, db: Path) -> None:
        self.server = server
        self.db = db
        self.sdk = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=30.0)

    def rows(self) -> dict[str, sqlite3.Row]:
        """Usage rows by request id; only once the gateway stopped (see ``stopped``)."""
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.row_factory = sqlite3.Row
            return {r["request_id"]: r for r in conn.execute("SELECT * FROM usage_records")}


@pytest.fixture(scope="module")
def gateway(
    mock: MockUpstream, dead_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("resilience")
    db = tmp / "gandalf.db"
    base = mock.base_url
    config = {
        "server": {"access_log": False},
        "database": {"dsn": str(db)},
        "providers": [
            {"name": "broken", "type": "openai", "base_url": base, "api_key": "sk-broken"},
            {"name": "good", "type": "openai", "base_url": base, "api_key": "sk-good"},
            {
                "name": "dead",
                "type": "openai",
                "base_url": f"http://127.0.0.1:{dead_port}/v1",
                "api_key": "sk-dead",
                "connect_timeout_ms": 1000,
            },
        ],
        "routes": [
            {
                "model_alias": "failover-500",
                "targets": [target("broken", "status-500", 1), target("good", "ok-model", 2)],
            },
            {
                "model_alias": "failover-dead",
                "targets": [target("dead", "ok-model", 1), target("good", "ok-model", 2)],
            },
            {
                "model_alias": "all-broken",
                "targets": [target("broken", "status-503", 1)],
                "max_attempts": 2,
            },
            {
                "model_alias": "no-failover-400",
                "targets": [target("broken", "status-400", 1), target("good", "ok-model", 2)],
            },
            {"model_alias": "shared", "targets": [target("good", "gate", 1)], "coalesce": True},
            {"model_alias": "plain", "targets": [target("good", "ok-model", 1)]},
        ],
        # The failing models must not open the breakers while these tests run.
        "resilience": {"breaker": {"min_samples": 1000}},
        "keys": [{"name": "tester", "key": KEY, "role": "member"}],
    }
    server = GandalfServer(tmp, config)
    with server:
        gateway = Gateway(server, db)
        try:
            yield gateway
        finally:
            gateway.sdk.close()


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def received(mock: MockUpstream, marker: str) -> list[Any]:
    return [r for r in list(mock.received) if marker.encode() in r.body]


def stopped_rows(gateway: Gateway) -> dict[str, sqlite3.Row]:
    """Stop the gateway (it flushes usage on shutdown) and read every usage row."""
    if gateway.server.running:
        assert gateway.server.terminate() == 0, gateway.server.diagnostics()
    return gateway.rows()


# Every test below records (request id -> expected usage) here; the last test
# stops the gateway and checks the rows.
EXPECTED: dict[str, tuple[int, str, int]] = {}


@pytest.mark.parametrize(
    ("alias", "first_model"),
    [("failover-500", "status-500"), ("failover-dead", None)],
    ids=["from-a-500", "from-a-dead-host"],
)
def test_failover_to_the_healthy_target(
    gateway: Gateway, mock: MockUpstream, alias: str, first_model: str | None
) -> None:
    text = unique(alias)
    raw = gateway.sdk.chat.completions.with_raw_response.create(model=alias, messages=user(text))
    completion = raw.parse()
    assert completion.choices[0].message.content == text
    assert raw.headers["x-gandalf-provider"] == "good"
    assert raw.headers["x-gandalf-attempts"] == "2"
    models = [r.json()["model"] for r in received(mock, text)]
    assert models == ([first_model] if first_model else []) + ["ok-model"]
    EXPECTED[raw.headers["x-request-id"]] = (200, "good", 2)


def test_a_stream_fails_over_before_its_first_byte(gateway: Gateway, mock: MockUpstream) -> None:
    text = unique("stream")
    with gateway.sdk.chat.completions.with_streaming_response.create(
        model="failover-500", messages=user(text), stream=True
    ) as response:
        assert response.headers["x-gandalf-provider"] == "good"
        assert response.headers["x-gandalf-attempts"] == "2"
        pieces = [
            chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices
        ]
        EXPECTED[response.headers["x-request-id"]] = (200, "good", 2)
    assert "".join(pieces) == text


def test_an_error_after_every_attempt_says_who_failed_and_how_often(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.server.url, timeout=30.0) as client:
        response = client.post(
            CHAT_PATH,
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "all-broken", "messages": user(unique("broken"))},
        )
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert response.headers["x-gandalf-provider"] == "broken"
    assert response.headers["x-gandalf-attempts"] == "2"
    EXPECTED[response.headers["x-request-id"]] = (502, "broken", 2)


def test_a_client_error_does_not_fail_over(gateway: Gateway, mock: MockUpstream) -> None:
    text = unique("bad")
    with pytest.raises(openai.BadRequestError) as info:
        gateway.sdk.chat.completions.create(model="no-failover-400", messages=user(text))
    headers = info.value.response.headers
    assert (headers["x-gandalf-provider"], headers["x-gandalf-attempts"]) == ("broken", "1")
    assert [r.json()["model"] for r in received(mock, text)] == ["status-400"]
    assert info.value.request_id
    EXPECTED[info.value.request_id] = (400, "broken", 1)


def test_identical_deterministic_requests_share_one_upstream_call(
    gateway: Gateway, mock: MockUpstream
) -> None:
    text = unique("coalesce")
    body = json.dumps(
        {"model": "shared", "messages": user(text), "temperature": 0}, separators=(",", ":")
    ).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connections = []
    for _ in range(6):
        # http.client writes the whole request before request() returns.
        conn = http.client.HTTPConnection("127.0.0.1", gateway.server.port, timeout=30)
        conn.request("POST", CHAT_PATH, body=body, headers=headers)
        connections.append(conn)
    # The first one is parked at the mock's gate. A request sent after all six that
    # completes a round trip through the same worker shows they were all read.
    plain = gateway.sdk.chat.completions.create(model="plain", messages=user(unique("marker")))
    assert plain.choices
    wait_until(lambda: len(received(mock, text)) >= 1, 10, "the shared call to reach the mock")
    mock.open_gate()
    replies = []
    for conn in connections:
        response = conn.getresponse()
        replies.append((response.status, dict(response.getheaders()), response.read()))
        conn.close()
    assert {status for status, _, _ in replies} == {200}
    assert len({data for _, _, data in replies}) == 1
    assert json.loads(replies[0][2])["choices"][0]["message"]["content"] == text
    assert len(received(mock, text)) == 1  # six callers, one upstream call
    attempts = sorted(h["x-gandalf-attempts"] for _, h, _ in replies)
    assert attempts == ["0"] * 5 + ["1"]
    assert {h["x-gandalf-provider"] for _, h, _ in replies} == {"good"}
    for _, h, _ in replies:
        EXPECTED[h["x-request-id"]] = (200, "good", int(h["x-gandalf-attempts"]))


def test_usage_rows_name_the_provider_and_the_attempts(gateway: Gateway) -> None:
    assert len(EXPECTED) == 11, "run the whole module: the rows of the tests above are checked"
    rows = stopped_rows(gateway)
    for request_id, (status, provider, attempts) in EXPECTED.items():
        row = rows[request_id]
        assert (row["status"], row["provider"], row["attempts"]) == (status, provider, attempts)
