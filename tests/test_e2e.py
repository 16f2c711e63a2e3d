"""End to end: a real ``gandalf serve`` (granian, subprocess) driven by the official SDK.

One gateway process serves most of this module (fixture ``gateway``), in front of one
MockUpstream (fixture ``mock``) whose behaviour is chosen by the target model of each
route. Tests that need their own process (usage rows after shutdown, graceful drain,
restarts, the keys CLI, refused starts) start one with :class:`tests.serve.GandalfServer`.
Nothing sleeps to synchronise: conditions are polled with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from gandalf.auth.apikey import generate_key
from tests.serve import GandalfServer, free_port, route, run_cli, scenario_providers, wait_until
from tests.test_accesslog import FIELDS  # the access line's contract fields, in order
from tests.upstream import MockUpstream, running_upstream

UPSTREAM_SECRET = "sk-upstream-secret"
UNSET_VAR = "UNSET_VAR_FOR_TEST"

ADMIN = generate_key()
MEMBER = generate_key()
VIEWER = generate_key()
LIMITED = generate_key()  # a member allowed only fake-model
EXPIRED = generate_key()
STRANGER = generate_key()  # well formed, never stored

CHAT_PATH = "/v1/chat/completions"
ERROR_FIELDS = {"message", "type", "param", "code"}
UNCHECKED: Any = object()


# ---------------------------------------------------------------------------- config


def bootstrap_keys() -> list[dict[str, Any]]:
    return [
        {"name": "admin", "key": ADMIN, "role": "admin"},
        {"name": "member", "key": MEMBER, "role": "member"},
        {"name": "viewer", "key": VIEWER, "role": "viewer"},
        {"name": "limited", "key": LIMITED, "role": "member", "allowed_models": ["fake-model"]},
        {"name": "expired", "key": EXPIRED, "role": "member", "expires_at": 946684800},
    ]


def gateway_config(mock: MockUpstream, dead_port: int, **server: Any) -> dict[str, Any]:
    """Providers and routes for every scenario of this module (``server`` overrides);
    ``dead_port`` refuses connections."""
    return {
        "server": {"max_body_bytes": 65536, "shutdown_timeout": "20s", **server},
        "providers": scenario_providers(mock.base_url, dead_port, UPSTREAM_SECRET, UNSET_VAR),
        "routes": [
            route("fake-model", "fake", "fake-1"),
            route("up-ok", "up", "ok-model"),
            route("up-gate", "up", "gate"),
            *(route(f"up-{n}", "up", f"status-{n}") for n in (400, 401, 403, 404, 429, 500)),
            route("up-text-400", "up", "text-400"),
            route("up-text-502", "up", "text-502"),
            route("up-badjson", "up", "badjson"),
            route("dead", "dead", "ok-model"),
            route("slow-hang", "slow", "hang"),
            route("slow-ok", "slow", "ok-model"),
            route("nokey", "nokey", "ok-model"),
        ],
        "keys": bootstrap_keys(),
        # These scenarios check how one upstream answer is relayed: one attempt each,
        # and no breaker (the mock's failing models would open the breaker of 'up').
        "resilience": {"max_attempts": 1, "breaker": {"min_samples": 1_000_000}},
    }


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused, and no server
    started by these tests can be given it meanwhile."""
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
    tmp = tmp_path_factory.mktemp(f"gateway-{request.param}")
    config = gateway_config(mock, dead_port, access_log=False, interface=request.param)
    with GandalfServer(tmp, config, unset=[UNSET_VAR]) as server:
        yield server


@pytest.fixture(scope="module")
def sdk(gateway: GandalfServer) -> Iterator[Callable[[str], OpenAI]]:
    """``sdk(key)``: an OpenAI client for the gateway with that key (no retries)."""
    clients: dict[str, OpenAI] = {}

    def make(key: str) -> OpenAI:
        if key not in clients:
            clients[key] = OpenAI(
                base_url=gateway.base_url, api_key=key, max_retries=0, timeout=30.0
            )
        return clients[key]

    yield make
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def http(gateway: GandalfServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30.0) as client:
        yield client


# ---------------------------------------------------------------------------- helpers


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def received_with(mock: MockUpstream, marker: str) -> list[Any]:
    """What the mock received whose body contains ``marker``."""
    return [r for r in list(mock.received) if marker.encode() in r.body]


def assert_error(
    response: httpx.Response,
    status: int,
    type_: Any,
    code: Any = UNCHECKED,
    param: Any = UNCHECKED,
) -> dict[str, Any]:
    """The contract's error shape, content type and request id; returns ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    assert response.headers.get("x-request-id")
    payload = response.json()
    assert set(payload) == {"error"}, payload
    error: dict[str, Any] = payload["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"], error
    if type_ is not UNCHECKED:
        assert error["type"] == type_, error
    if code is not UNCHECKED:
        assert error["code"] == code, error
    if param is not UNCHECKED:
        assert error["param"] == param, error
    text = response.text
    assert "Traceback" not in text and UPSTREAM_SECRET not in text
    assert not any(k in text for k in (ADMIN, MEMBER, VIEWER, LIMITED, EXPIRED, STRANGER))
    return error


def db_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(sql, params))


def key_count(path: Path) -> int:
    return int(db_rows(path, "SELECT count(*) AS n FROM api_keys")[0]["n"])


def chat_ok(server: GandalfServer, key: str, model: str, text: str) -> str:
    """One chat call that must succeed; returns the reply's content."""
    with OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=30.0) as client:
        completion = client.chat.completions.create(model=model, messages=user(text))
    content = completion.choices[0].message.content
    assert content is not None
    return content


def chat_status(server: GandalfServer, key: str, model: str) -> tuple[int, dict[str, Any]]:
    with httpx.Client(timeout=30.0) as client:
        response = client.post(
            f"{server.url}{CHAT_PATH}",
            headers=auth(key),
            json={"model": model, "messages": user("status?")},
        )
    return response.status_code, response.json()


# ============================================================================ success


def test_health_endpoints(http: httpx.Client) -> None:
    response = http.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert response.headers.get("x-request-id")
    assert http.get("/readyz").status_code == 200


def test_fake_provider_through_the_sdk(sdk: Callable[[str], OpenAI]) -> None:
    text = unique("hello fake")
    completion = sdk(MEMBER).chat.completions.create(model="fake-model", messages=user(text))
    assert completion.object == "chat.completion"
    assert completion.model == "fake-1"
    assert completion.choices[0].message.content == text
    assert completion.choices[0].message.role == "assistant"
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_models_retrieve_through_the_sdk(sdk: Callable[[str], OpenAI]) -> None:
    """``client.models.retrieve`` (GET /v1/models/{id}), on both interfaces."""
    model = sdk(MEMBER).models.retrieve("fake-model")
    assert (model.id, model.object, model.owned_by) == ("fake-model", "model", "fake")
    with pytest.raises(openai.NotFoundError) as hidden:
        sdk(LIMITED).models.retrieve("up-ok")  # exists, but not for this key
    assert hidden.value.code == "model_not_found"


def test_upstream_success_and_what_the_upstream_received(
    sdk: Callable[[str], OpenAI], mock: MockUpstream
) -> None:
    text = unique("hello upstream")
    raw = sdk(MEMBER).chat.completions.with_raw_response.create(
        model="up-ok", messages=user(text), extra_body={"my_custom_field": {"a": 1}}
    )
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    request_id = raw.headers["x-request-id"]
    assert uuid.UUID(request_id).version == 7
    completion = raw.parse()
    assert completion.choices[0].message.content == text
    assert completion.model == "ok-model"
    assert completion.usage is not None and completion.usage.total_tokens > 0

    [seen] = received_with(mock, text)
    assert seen.path == "/v1/chat/completions"
    sent = raw.http_request.content
    expected = {"model": "ok-model", "messages": user(text), "my_custom_field": {"a": 1}}
    assert seen.json() == expected
    assert {**httpx.Response(200, content=sent).json(), "model": "ok-model"} == expected
    headers = {name.lower(): value for name, value in seen.headers.items()}
    assert headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    assert not any("gnd_" in value for value in headers.values()), headers
    assert "x-api-key" not in headers


def test_caller_request_id_is_echoed(sdk: Callable[[str], OpenAI]) -> None:
    raw = sdk(MEMBER).chat.completions.with_raw_response.create(
        model="up-ok", messages=user("trace me"), extra_headers={"x-request-id": "e2e-trace-42"}
    )
    assert raw.headers["x-request-id"] == "e2e-trace-42"
    with pytest.raises(openai.NotFoundError) as info:
        sdk(MEMBER).chat.completions.create(
            model="no-such-model", messages=user("x"), extra_headers={"x-request-id": "e2e-err-7"}
        )
    assert info.value.request_id == "e2e-err-7"


def test_unknown_fields_are_forwarded_byte_for_byte(http: httpx.Client, mock: MockUpstream) -> None:
    marker = unique("exact")
    body = (
        b'{"model":"up-ok","messages":[{"role":"user","content":"' + marker.encode() + b'"}],'
        b'"temperature":1.50,"my_custom_field":{"a":1,"b":[1.0e2,"\\u00e9",null]},"n":1}'
    )
    response = http.post(
        CHAT_PATH, headers={**auth(MEMBER), "content-type": "application/json"}, content=body
    )
    assert response.status_code == 200, response.text
    [seen] = received_with(mock, marker)
    assert b'"temperature":1.50' in seen.body
    assert b'"my_custom_field":{"a":1,"b":[1.0e2,"\\u00e9",null]}' in seen.body
    assert seen.json()["model"] == "ok-model"


def test_x_api_key_header_also_authenticates(http: httpx.Client) -> None:
    response = http.post(
        CHAT_PATH,
        headers={"x-api-key": MEMBER},
        json={"model": "fake-model", "messages": user("via x-api-key")},
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "via x-api-key"


# ============================================================================ errors: raw HTTP


@pytest.mark.parametrize(
    ("headers", "label"),
    [
        ({}, "no key"),
        ({"authorization": "Bearer nope"}, "malformed key"),
        ({"authorization": "Bearer sk-live-abcdef"}, "foreign key"),
        ({"authorization": f"Basic {MEMBER}"}, "wrong scheme"),
        (auth(STRANGER), "unknown key"),
        (auth(EXPIRED), "expired key"),
    ],
)
def test_bad_credentials_are_401(http: httpx.Client, headers: dict[str, str], label: str) -> None:
    response = http.post(
        CHAT_PATH, headers=headers, json={"model": "fake-model", "messages": user(label)}
    )
    assert_error(response, 401, "invalid_request_error", "invalid_api_key")


def test_revoked_key_is_401(gateway: GandalfServer, http: httpx.Client) -> None:
    config = str(gateway.config_path)
    created = run_cli(
        "keys", "create", "--name", "to-revoke", "--role", "member", "--config", config
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = key_id_from_list(config, "to-revoke", key)
    revoked = run_cli("keys", "revoke", key_id, "--config", config)
    assert revoked.returncode == 0, revoked.stderr
    response = http.post(
        CHAT_PATH, headers=auth(key), json={"model": "fake-model", "messages": user("revoked")}
    )
    assert_error(response, 401, "invalid_request_error", "invalid_api_key")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{this is not json", None),
        (b'{"messages":[{"role":"user","content":"x"}]}', "model"),
        (b'{"model":"fake-model","messages":"hi"}', "messages"),
        (b'{"model":"fake-model"}', "messages"),
        (b'{"model":42,"messages":[{"role":"user","content":"x"}]}', "model"),
    ],
)
def test_invalid_bodies_are_400_naming_the_field(
    http: httpx.Client, body: bytes, param: str | None
) -> None:
    response = http.post(
        CHAT_PATH, headers={**auth(MEMBER), "content-type": "application/json"}, content=body
    )
    error = assert_error(response, 400, "invalid_request_error", param=param)
    if param is not None:
        assert param in error["message"]


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    big = {"model": "fake-model", "messages": user("x" * 100_000)}
    response = http.post(CHAT_PATH, headers=auth(MEMBER), json=big)
    error = assert_error(response, 413, "invalid_request_error")
    assert "65536" in error["message"]
    # chunked (no content-length): the limit holds while reading
    chunks = iter([b'{"model":"fake-model","messages":"', b"z" * 40_000, b"z" * 40_000, b'"}'])
    response = http.post(
        CHAT_PATH, headers={**auth(MEMBER), "content-type": "application/json"}, content=chunks
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "invalid_request_error")


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on ``sock`` and read its answer (which
    carries a content-length): (status, body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-answer"
        body += chunk
    return int(lines[0].split()[1]), body


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_read_before_the_413_and_the_connection_stays_usable(
    gateway: GandalfServer, chunked: bool
) -> None:
    # Answered with the body unread, the connection would be closed after the
    # 413, and a pooled client's next request could race into it ("server
    # disconnected": test_body_over_the_limit_is_413 failed that way once under
    # load). A body up to four times the limit (65536 here) is read and dropped
    # first: the 413 arrives, and the same connection serves the next request.
    body = b'{"model":"fake-model","messages":"' + b"x" * 150_000 + b'"}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gandalf\r\n"
        b"authorization: Bearer " + MEMBER.encode() + b"\r\ncontent-type: application/json\r\n"
    )
    if chunked:
        request = (
            head + b"transfer-encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%b\r\n" % (len(body[i : i + 8192]), body[i : i + 8192])
                       for i in range(0, len(body), 8192))
            + b"0\r\n\r\n"
        )  # fmt: skip
    else:
        request = head + b"content-length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10.0) as sock:
        status, answer = _exchange(sock, request)
        assert status == 413 and b"65536" in answer
        status, answer = _exchange(sock, b"GET /healthz HTTP/1.1\r\nhost: gandalf\r\n\r\n")
        assert status == 200, answer


def test_unknown_path_is_404_and_wrong_method_405(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nope", headers=auth(MEMBER)), 404, "invalid_request_error")
    assert_error(
        http.post("/v1/completions", headers=auth(MEMBER), json={}), 404, "invalid_request_error"
    )
    response = http.get(CHAT_PATH, headers=auth(MEMBER))
    assert_error(response, 405, "invalid_request_error")
    assert response.headers["allow"] == "POST"
    assert_error(http.delete("/healthz"), 405, "invalid_request_error")


# ============================================================================ errors: the SDK


@pytest.mark.parametrize(
    ("key", "model", "exc_type", "status", "type_", "code"),
    [
        pytest.param(
            STRANGER,
            "fake-model",
            openai.AuthenticationError,
            401,
            "invalid_request_error",
            "invalid_api_key",
            id="unknown-key",
        ),
        pytest.param(
            "gnd_short",
            "fake-model",
            openai.AuthenticationError,
            401,
            "invalid_request_error",
            "invalid_api_key",
            id="malformed-key",
        ),
        pytest.param(
            VIEWER,
            "fake-model",
            openai.PermissionDeniedError,
            403,
            "permission_denied",
            "permission_denied",
            id="viewer",
        ),
        pytest.param(
            LIMITED,
            "up-ok",
            openai.PermissionDeniedError,
            403,
            "permission_denied",
            UNCHECKED,
            id="model-not-allowed",
        ),
        pytest.param(
            MEMBER,
            "no-such-model",
            openai.NotFoundError,
            404,
            "invalid_request_error",
            "model_not_found",
            id="unknown-model",
        ),
        pytest.param(
            MEMBER,
            "up-400",
            openai.BadRequestError,
            400,
            "mock_error",
            "mock_400",
            id="upstream-400",
        ),
        pytest.param(
            MEMBER, "up-404", openai.NotFoundError, 404, "mock_error", "mock_404", id="upstream-404"
        ),
        pytest.param(
            MEMBER,
            "up-429",
            openai.RateLimitError,
            429,
            "mock_error",
            "mock_429",
            id="upstream-429",
        ),
        pytest.param(
            MEMBER,
            "up-text-400",
            openai.BadRequestError,
            400,
            "invalid_request_error",
            UNCHECKED,
            id="upstream-400-plain-text",
        ),
        pytest.param(
            MEMBER,
            "up-401",
            openai.InternalServerError,
            502,
            "upstream_error",
            "upstream_auth_error",
            id="upstream-401",
        ),
        pytest.param(
            MEMBER,
            "up-403",
            openai.InternalServerError,
            502,
            "upstream_error",
            "upstream_auth_error",
            id="upstream-403",
        ),
        pytest.param(
            MEMBER,
            "up-500",
            openai.InternalServerError,
            502,
            "upstream_error",
            "upstream_error",
            id="upstream-500",
        ),
        pytest.param(
            MEMBER,
            "up-text-502",
            openai.InternalServerError,
            502,
            "upstream_error",
            "upstream_error",
            id="upstream-502-plain-text",
        ),
        pytest.param(
            MEMBER,
            "dead",
            openai.InternalServerError,
            502,
            "upstream_error",
            "upstream_error",
            id="connection-refused",
        ),
        pytest.param(
            MEMBER,
            "slow-hang",
            openai.InternalServerError,
            504,
            UNCHECKED,
            "upstream_timeout",
            id="upstream-timeout",
        ),
        pytest.param(
            MEMBER,
            "nokey",
            openai.InternalServerError,
            503,
            "provider_unavailable",
            "provider_unavailable",
            id="all-targets-disabled",
        ),
    ],
)
def test_errors_map_to_sdk_exceptions(
    sdk: Callable[[str], OpenAI],
    key: str,
    model: str,
    exc_type: type[openai.APIStatusError],
    status: int,
    type_: Any,
    code: Any,
) -> None:
    with pytest.raises(exc_type) as info:
        sdk(key).chat.completions.create(model=model, messages=user(f"error case {model}"))
    exc = info.value
    assert exc.status_code == status
    response = httpx.Response(
        exc.status_code, headers=dict(exc.response.headers), content=exc.response.content
    )
    error = assert_error(response, status, type_, code)
    assert exc.code == error["code"] and exc.type == error["type"]
    if model.startswith("up-") and model[3:].isdigit() and int(model[3:]) < 500:
        upstream_status = int(model[3:])
        if upstream_status in (401, 403):
            assert "credentials" in error["message"]
            assert "api_key" in error["message"]
        else:
            assert error["message"] == f"mock says {upstream_status}"
    if model == "up-429":
        assert exc.response.headers["retry-after"] == "7"
    if model == "up-text-400":
        assert "plain failure" in error["message"]
    if model == "nokey":
        assert UNSET_VAR in error["message"]
    if model == "no-such-model":
        assert error["param"] == "model"


def test_wrong_message_type_and_size_through_the_sdk(sdk: Callable[[str], OpenAI]) -> None:
    client = sdk(MEMBER)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="fake-model", messages="hi")  # type: ignore[arg-type]
    assert bad.value.param == "messages" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as big:
        client.chat.completions.create(model="fake-model", messages=user("y" * 100_000))
    assert big.value.status_code == 413 and big.value.type == "invalid_request_error"


def test_upstream_200_with_a_body_that_is_not_json_is_502(http: httpx.Client) -> None:
    """A 200 whose body is not JSON is a broken upstream, not a completion to relay."""
    response = http.post(
        CHAT_PATH,
        headers=auth(MEMBER),
        json={"model": "up-badjson", "messages": user("bad json please")},
    )
    assert_error(response, 502, "upstream_error", "upstream_error")


def test_the_client_key_never_reaches_the_upstream(
    sdk: Callable[[str], OpenAI], mock: MockUpstream
) -> None:
    """No upstream request of this module (this one included) carried a gnd_ key anywhere."""
    sdk(ADMIN).chat.completions.create(model="up-ok", messages=user("admin via upstream"))
    with pytest.raises(openai.APIStatusError):
        sdk(MEMBER).chat.completions.create(model="up-400", messages=user("error via upstream"))
    for seen in list(mock.received):
        assert not any("gnd_" in v for v in seen.headers.values()), seen.headers
        assert b"gnd_" not in seen.body


# ============================================================================ concurrency


def test_300_concurrent_requests_without_cross_talk(
    gateway: GandalfServer, mock: MockUpstream
) -> None:
    count = 300
    contents = [unique(f"concurrent-{i}") for i in range(count)]

    async def main() -> list[tuple[int, str, str | None]]:
        async with AsyncOpenAI(
            base_url=gateway.base_url, api_key=MEMBER, max_retries=0, timeout=60.0
        ) as client:

            async def one(text: str) -> tuple[int, str, str | None]:
                raw = await client.chat.completions.with_raw_response.create(
                    model="up-ok", messages=user(text)
                )
                completion = raw.parse()
                return (
                    raw.status_code,
                    raw.headers["x-request-id"],
                    completion.choices[0].message.content,
                )

            return await asyncio.gather(*(one(text) for text in contents))

    results = asyncio.run(main())
    assert [status for status, _, _ in results] == [200] * count
    assert [content for _, _, content in results] == contents
    assert len({request_id for _, request_id, _ in results}) == count
    for text in contents:
        assert len(received_with(mock, text)) == 1


# ============================================================================ own processes


def test_usage_rows_are_written_by_shutdown(
    mock: MockUpstream, dead_port: int, tmp_path: Path
) -> None:
    db = tmp_path / "usage.db"
    config = gateway_config(mock, dead_port)
    config["database"] = {"dsn": str(db)}
    expected: dict[str, tuple[int, str, str | None, str | None]] = {}
    successes: list[tuple[str, str | None, str | None]] = [
        ("up-ok", "ok-model", "up"),
        ("up-ok", "ok-model", "up"),
        ("up-ok", "ok-model", "up"),
        ("fake-model", "fake-1", "fake"),
        ("fake-model", "fake-1", "fake"),
    ]
    failures: list[tuple[str, int, str | None, str | None]] = [
        ("no-such-model", 404, None, None),
        ("up-500", 502, "status-500", "up"),
        ("up-400", 400, "status-400", "up"),
        ("dead", 502, "ok-model", "dead"),
    ]
    with (
        GandalfServer(tmp_path, config, unset=[UNSET_VAR]) as server,
        OpenAI(base_url=server.base_url, api_key=MEMBER, max_retries=0) as client,
    ):
        for model, target, provider in successes:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=user(unique("usage"))
            )
            expected[raw.headers["x-request-id"]] = (200, model, target, provider)
        for model, status, target, provider in failures:
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model=model, messages=user("usage error"))
            assert info.value.status_code == status
            assert info.value.request_id
            expected[info.value.request_id] = (status, model, target, provider)
        code = server.terminate()
    assert code == 0, server.diagnostics()

    [member] = db_rows(db, "SELECT id FROM api_keys WHERE name = 'member'")
    rows = db_rows(db, "SELECT * FROM usage_records")
    assert len(rows) == len(expected) == 9
    for row in rows:
        want = expected[row["request_id"]]
        got = (row["status"], row["model_alias"], row["target_model"], row["provider"])
        assert got == want, dict(row)
        status = want[0]
        assert row["key_id"] == member["id"] and row["org_id"] == "default"
        assert row["latency_ms"] >= 0
        if status == 200:
            assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
            assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        else:
            assert row["total_tokens"] == 0


@pytest.mark.parametrize("interface", ["asgi", "rsgi"])
def test_sigterm_drains_in_flight_requests(dead_port: int, tmp_path: Path, interface: str) -> None:
    parked = 20
    with running_upstream() as gate_mock:
        db = tmp_path / "drain.db"
        config = gateway_config(gate_mock, dead_port, interface=interface)
        config["database"] = {"dsn": str(db)}
        server = GandalfServer(tmp_path, config, unset=[UNSET_VAR])
        with (
            server,
            OpenAI(base_url=server.base_url, api_key=MEMBER, max_retries=0, timeout=60.0) as client,
            ThreadPoolExecutor(parked) as pool,
        ):

            def call(text: str) -> str | None:
                completion = client.chat.completions.create(model="up-gate", messages=user(text))
                return completion.choices[0].message.content

            texts = [unique(f"drain-{i}") for i in range(parked)]
            futures = [pool.submit(call, text) for text in texts]
            try:
                wait_until(
                    lambda: gate_mock.waiting == parked, 15, f"{parked} requests at the gate"
                )
                server.send_sigterm()
                wait_until(
                    lambda: refuses_connections(server.port),
                    15,
                    "the listener to close after SIGTERM",
                )
                assert server.running, "exited before its in-flight requests finished"
                assert not any(f.done() for f in futures)
            finally:
                gate_mock.open_gate()  # never leave the pool waiting on a failed test
            replies = [f.result(timeout=30) for f in futures]
            code = server.wait()
        assert replies == texts
        assert code == 0, server.diagnostics()
        # The access log lost no line in the drain: one plain JSON line per request.
        access = [orjson.loads(line) for line in server.stderr().splitlines() if line[:1] == "{"]
        chats = [e for e in access if e["path"] == "/v1/chat/completions"]
        assert [(e["method"], e["status"]) for e in chats] == [("POST", 200)] * parked
        assert all(list(e) == FIELDS for e in access)
        assert len({e["request_id"] for e in chats}) == parked
        assert all(e["route"] == "up-gate" and e["model"] == "gate" for e in chats)
    rows = db_rows(db, "SELECT status, model_alias, target_model FROM usage_records")
    assert [tuple(r) for r in rows] == [(200, "up-gate", "gate")] * parked


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def test_restarts_are_idempotent_and_follow_config_edits(tmp_path: Path) -> None:
    db = tmp_path / "restart.db"

    def config(*aliases: str) -> dict[str, Any]:
        return {
            "database": {"dsn": str(db)},
            "providers": [{"name": "fake", "type": "fake"}],
            "routes": [route(alias, "fake", f"fake-{alias}") for alias in aliases],
        }

    with GandalfServer(tmp_path, config("alpha", "beta"), name="first") as first:
        [admin] = first.printed_keys()
        assert "only this once" in first.stdout()
        assert chat_ok(first, admin, "alpha", "first run") == "first run"
        assert first.terminate() == 0, first.diagnostics()
    assert key_count(db) == 1

    with GandalfServer(tmp_path, config("alpha", "beta"), name="second") as second:
        assert second.printed_keys() == []
        assert chat_ok(second, admin, "beta", "second run") == "second run"
        assert second.terminate() == 0, second.diagnostics()
    assert key_count(db) == 1

    with GandalfServer(tmp_path, config("beta", "gamma"), name="third") as third:
        assert third.printed_keys() == []
        status, body = chat_status(third, admin, "alpha")
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert chat_ok(third, admin, "gamma", "third run") == "third run"
        assert chat_ok(third, admin, "beta", "still here") == "still here"
        assert third.terminate() == 0, third.diagnostics()
    assert key_count(db) == 1
    aliases = {r["model_alias"] for r in db_rows(db, "SELECT model_alias FROM routes")}
    assert aliases == {"beta", "gamma"}


# ============================================================================ keys CLI


def key_id_from_list(config: str, name: str, key: str) -> str:
    """The id of key ``name`` from ``gandalf keys list`` (which must not show the secret)."""
    listed = run_cli("keys", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    assert key not in listed.stdout + listed.stderr
    assert key[8:16] not in listed.stdout
    for line in listed.stdout.splitlines():
        fields = line.split()
        if name in fields and key[:8] in fields:
            return fields[0]
    raise AssertionError(f"{name} ({key[:8]}) not in keys list:\n{listed.stdout}")


def test_keys_cli(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    server = GandalfServer(
        tmp_path,
        {
            "database": {"dsn": str(db)},
            "providers": [{"name": "fake", "type": "fake"}],
            "routes": [route("fake-model", "fake", "fake-1")],
        },
    )
    config = str(server.config_path)

    created = run_cli("keys", "create", "--name", "ci-bot", "--role", "member", "--config", config)
    assert created.returncode == 0, created.stderr
    [key] = created.stdout.split()
    assert key.startswith("gnd_") and created.stdout == key + "\n"
    bot_id = key_id_from_list(config, "ci-bot", key)
    assert bot_id.startswith("key_")

    other = run_cli("keys", "create", "--name", "doomed", "--config", config)
    assert other.returncode == 0, other.stderr
    doomed = other.stdout.strip()
    doomed_id = key_id_from_list(config, "doomed", doomed)
    revoked = run_cli("keys", "revoke", doomed_id, "--config", config)
    assert revoked.returncode == 0, revoked.stderr
    listed = run_cli("keys", "list", env={"GANDALF_CONFIG": config})  # config from the env
    assert listed.returncode == 0, listed.stderr
    [doomed_line] = [line for line in listed.stdout.splitlines() if doomed_id in line]
    assert "revoked" in doomed_line

    missing = run_cli("keys", "revoke", "key_does_not_exist", "--config", config)
    assert missing.returncode == 3
    assert len(missing.stderr.strip().splitlines()) == 1 and "key_does_not_exist" in missing.stderr

    bad = run_cli("keys", "create", "--name", "x", "--expires-in", "1x", "--config", config)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "--expires-in" in bad.stderr and "gnd_" not in bad.stderr

    with server:
        assert server.printed_keys() == []  # keys exist, so no first admin key
        assert chat_ok(server, key, "fake-model", "made by the CLI") == "made by the CLI"
        status, body = chat_status(server, doomed, "fake-model")
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body
        assert server.terminate() == 0, server.diagnostics()
    assert key_count(db) == 2


# ============================================================================ refused starts


GOOD_PROVIDERS = """\
providers:
  - {name: fake, type: fake}
  - {name: up, type: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-do-not-print}
"""
GOOD_ROUTES = """\
routes:
  - {model_alias: fake-model, targets: [{provider: fake, model: fake-1}]}
"""


@pytest.mark.parametrize(
    ("text", "where"),
    [
        pytest.param(
            'server: {addr: "127.0.0.1:__PORT__", colour: blue}\n' + GOOD_PROVIDERS + GOOD_ROUTES,
            "server.colour",
            id="unknown-key",
        ),
        pytest.param(
            'server: {addr: "127.0.0.1:__PORT__", read_timeout: soonish}\n'
            + GOOD_PROVIDERS
            + GOOD_ROUTES,
            "server.read_timeout",
            id="bad-duration",
        ),
        pytest.param(
            'server: {addr: "127.0.0.1:__PORT__", max_body_bytes: lots}\n'
            + GOOD_PROVIDERS
            + GOOD_ROUTES,
            "server.max_body_bytes",
            id="wrong-type",
        ),
        pytest.param(
            'server: {addr: "127.0.0.1:__PORT__"}\n'
            + GOOD_PROVIDERS
            + "routes:\n  - {model_alias: m, targets: [{provider: ghost, model: x}]}\n",
            "routes[0].targets[0].provider",
            id="missing-provider",
        ),
        pytest.param(
            'server: {addr: "127.0.0.1:__PORT__"}\n'
            + GOOD_PROVIDERS
            + "  - {name: up2, type: openai, api_key: sk-do-not-print, timeout_ms: -1}\n"
            + GOOD_ROUTES,
            "providers[2].timeout_ms",
            id="bad-provider-field",
        ),
        pytest.param(
            'server: {addr: "127.0.0.1:__PORT__"\nproviders: [\n', "line", id="invalid-yaml"
        ),
    ],
)
def test_bad_configs_refuse_to_start(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("__PORT__", str(free_port())), encoding="utf-8")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and where in lines[0], lines[0]
    assert "sk-do-not-print" not in result.stderr + result.stdout
    assert "gnd_" not in result.stdout
    assert not (tmp_path / "gandalf.db").exists()


def test_port_in_use_is_exit_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        db = tmp_path / "port.db"
        path = tmp_path / "port.yaml"
        path.write_text(
            f'server: {{addr: "127.0.0.1:{port}"}}\ndatabase: {{dsn: "{db}"}}\n'
            + GOOD_PROVIDERS
            + GOOD_ROUTES,
            encoding="utf-8",
        )
        result = run_cli("serve", "--config", str(path))
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0].lower(), lines[0]
    assert "gnd_" not in result.stdout  # no first admin key made and lost
    assert not db.exists()


# ============================================================================ workers


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # pragma: no cover - not Linux
        return []


def test_two_workers_share_the_database(dead_port: int, tmp_path: Path) -> None:
    """--workers 2: each worker builds its own store, writer task and key cache on the
    same WAL database; every request is answered and every usage record lands."""
    with running_upstream() as own_mock:
        config = gateway_config(own_mock, dead_port, workers=2)
        config["keys"] = []  # the first start must create exactly one admin key
        db = tmp_path / "workers.db"
        config["database"] = {"dsn": str(db)}
        server = GandalfServer(tmp_path, config, unset=[UNSET_VAR])
        with server:
            process = server.process
            assert process is not None
            wait_until(lambda: len(_children(process.pid)) == 2, 10, "two workers")
            keys = server.printed_keys()
            assert len(keys) == 1, server.stdout()
            texts = [unique("w") for _ in range(200)]

            async def many() -> list[str]:
                async with AsyncOpenAI(
                    base_url=server.base_url, api_key=keys[0], max_retries=0, timeout=30.0
                ) as client:
                    replies = await asyncio.gather(
                        *(
                            client.chat.completions.create(model="up-ok", messages=user(text))
                            for text in texts
                        )
                    )
                return [r.choices[0].message.content or "" for r in replies]

            assert asyncio.run(many()) == texts
            assert server.terminate() == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM usage_records WHERE status = 200").fetchone()
        (key_count,) = conn.execute("SELECT count(*) FROM api_keys").fetchone()
    assert rows == 200
    assert key_count == 1
