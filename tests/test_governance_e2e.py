"""Governance end to end: a real ``gandalf serve`` with limits, budgets and prices,
driven by the official OpenAI SDK and raw HTTP (CONTRACT.md, "Tenancy, limits,
budgets, cost").

Prices come from ``pricing:`` overrides (USD per million tokens) so every figure is
known here: 1,000 USD per million tokens is $0.001 a token.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gandalf.auth.apikey import generate_key
from tests.serve import GandalfServer, route, run_cli, wait_until
from tests.upstream import MockUpstream, running_upstream

KEY_RPM = generate_key()  # rpm 2
TEAM_A = generate_key()  # team backend (shared rpm 3)
TEAM_B = generate_key()
KEY_TPM = generate_key()  # tpm 400
KEY_BUDGET = generate_key()  # $0.20 a day
KEY_FREE = generate_key()  # no limit at all
KEY_BUSY = generate_key()  # rpm 100, for an upstream that answers 429
CHAT = "/v1/chat/completions"
PER_TOKEN = 0.001  # USD: 1,000 per million


def _config(mock: MockUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "providers": [
            {"name": "fake", "type": "fake", "models": ["fake-model"]},
            {"name": "up", "type": "openai", "base_url": mock.base_url, "api_key": "sk-up"},
        ],
        "routes": [
            route("up-ok", "up", "ok-model"),
            route("up-gate", "up", "gate"),
            route("up-busy", "up", "busy"),
        ],
        "orgs": [{"id": "acme", "name": "Acme"}],
        "teams": [{"id": "backend", "org": "acme", "rpm": 3}],
        "keys": [
            {"name": "rpm", "key": KEY_RPM, "role": "member", "rpm": 2},
            {"name": "team-a", "key": TEAM_A, "role": "member", "org": "acme", "team": "backend"},
            {"name": "team-b", "key": TEAM_B, "role": "member", "team": "backend"},
            {"name": "tpm", "key": KEY_TPM, "role": "member", "tpm": 400},
            {
                "name": "budget",
                "key": KEY_BUDGET,
                "role": "member",
                "budget": {"usd": 0.2, "period": "daily"},
            },
            {"name": "free", "key": KEY_FREE, "role": "member"},
            {"name": "busy", "key": KEY_BUSY, "role": "member", "rpm": 100},
        ],
        "pricing": [
            {"provider": "fake", "model": "fake-model", "input": 1000, "output": 1000},
            {"provider": "up", "model": "ok-model", "input": 1000, "output": 1000},
            {"provider": "up", "model": "gate", "input": 1000, "output": 1000},
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def upstream_mock() -> Iterator[MockUpstream]:
    with running_upstream() as mock:
        yield mock


@pytest.fixture(scope="module")
def gateway(
    upstream_mock: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GandalfServer]:
    tmp = tmp_path_factory.mktemp("governance")
    with GandalfServer(tmp, _config(upstream_mock)) as server:
        yield server


def _client(server: GandalfServer, key: str) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=30.0)


def _ask(client: OpenAI, model: str = "fake-model", text: str = "hi", **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **extra
    )


def _spend(db: Path, key_name: str) -> tuple[int, float]:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(u.cost_usd), 0) FROM usage_records u "
            "JOIN api_keys k ON k.id = u.key_id WHERE k.name = ? AND u.status = 200",
            (key_name,),
        ).fetchone()
    return int(row[0]), float(row[1])


# --------------------------------------------------------------------------- rate limits


def test_key_rpm_limit_with_openai_sdk(gateway: GandalfServer) -> None:
    with _client(gateway, KEY_RPM) as client:
        first = _ask(client)
        second = _ask(client)
        with pytest.raises(openai.RateLimitError) as refused:
            _ask(client)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    reset = second.headers["x-ratelimit-reset-requests"]
    assert reset.endswith(("ms", "s")) and reset[0].isdigit()
    error = refused.value
    assert error.status_code == 429
    body = error.response.json()["error"]
    assert body["type"] == "requests" and body["code"] == "rate_limit_exceeded"
    assert "2" in body["message"] and "key 'rpm'" in body["message"]  # the key's name
    assert int(error.response.headers["retry-after"]) >= 1
    # The SDK's own retry advice is not "never": a rate limit passes.
    assert error.response.headers.get("x-should-retry") != "false"
    # The refusal is a model call's answer too: it says where the limit stands.
    assert error.response.headers["x-ratelimit-limit-requests"] == "2"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_an_upstream_429_to_a_limited_caller_carries_the_gateways_limits_only(
    gateway: GandalfServer,
) -> None:
    # The upstream's own x-ratelimit-* (its account with the gateway) would
    # otherwise come next to the caller's: two values for one header.
    with _client(gateway, KEY_BUSY) as client, pytest.raises(openai.RateLimitError) as refused:
        _ask(client, model="up-busy")
    headers = refused.value.response.headers
    limits = [(n, v) for n, v in headers.multi_items() if n.startswith("x-ratelimit-")]
    assert sorted(n for n, _ in limits) == [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ]
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert headers["x-ratelimit-remaining-requests"] == "99"


def test_team_limit_is_shared_by_its_keys(gateway: GandalfServer) -> None:
    with _client(gateway, TEAM_A) as a, _client(gateway, TEAM_B) as b:
        served = [_ask(a).http_response.status_code, _ask(b).http_response.status_code]
        served.append(_ask(a).http_response.status_code)
        with pytest.raises(openai.RateLimitError) as refused:
            _ask(b)
    assert served == [200, 200, 200]
    message = refused.value.response.json()["error"]["message"]
    assert "backend" in message and "3" in message


def test_tpm_limit_refuses_with_type_tokens(gateway: GandalfServer) -> None:
    statuses: list[int] = []
    error: openai.RateLimitError | None = None
    with _client(gateway, KEY_TPM) as client:
        for _ in range(20):
            try:
                reply = _ask(client, text="x" * 400)  # ~100 tokens in, ~100 out
            except openai.RateLimitError as exc:
                error = exc
                break
            statuses.append(reply.http_response.status_code)
            assert reply.headers["x-ratelimit-limit-tokens"] == "400"
    assert statuses and set(statuses) == {200}
    assert error is not None, "20 requests of ~200 tokens fit a 400 TPM bucket"
    assert error.response.json()["error"]["type"] == "tokens"


def test_unlimited_key_gets_no_ratelimit_headers(gateway: GandalfServer) -> None:
    with _client(gateway, KEY_FREE) as client:
        reply = _ask(client)
    assert reply.http_response.status_code == 200
    assert not [h for h in reply.headers if h.lower().startswith("x-ratelimit-")]


# --------------------------------------------------------------------------- budgets


def test_budget_exhausted_is_final_and_never_overshot(
    gateway: GandalfServer, upstream_mock: MockUpstream
) -> None:
    refused: openai.RateLimitError | None = None
    answered = 0
    with _client(gateway, KEY_BUDGET) as client:
        for _ in range(60):
            try:
                _ask(client, model="up-ok", max_tokens=5)
            except openai.RateLimitError as exc:
                refused = exc
                break
            answered += 1
    assert refused is not None, "60 requests at ~$0.01 each fit a $0.20 budget"
    body = refused.response.json()["error"]
    assert body["type"] == body["code"] == "insufficient_quota"
    assert refused.response.headers["x-should-retry"] == "false"
    db = gateway.tmp / "gandalf.db"
    # The writer batches: wait for every answered request's row, not just the first.
    wait_until(lambda: _spend(db, "budget")[0] >= answered, 10, "usage rows written")
    served, spent = _spend(db, "budget")
    assert served == answered >= 5 and 0 < spent <= 0.2


def test_usage_records_carry_cost(gateway: GandalfServer) -> None:
    with _client(gateway, KEY_FREE) as client:
        reply = _ask(client, model="up-ok")
    usage = json.loads(reply.http_response.content)["usage"]
    expected = (usage["prompt_tokens"] + usage["completion_tokens"]) * PER_TOKEN
    request_id = reply.headers["x-request-id"]
    db = gateway.tmp / "gandalf.db"

    def cost() -> float | None:
        with sqlite3.connect(db) as conn:
            row = conn.execute(
                "SELECT cost_usd FROM usage_records WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else row[0]

    wait_until(lambda: cost() is not None, 10, "the usage row")
    assert cost() == pytest.approx(expected)


def test_usage_cli_reports_cost_by_key(gateway: GandalfServer) -> None:
    with _client(gateway, KEY_FREE) as client:
        _ask(client, model="up-ok")
    db = gateway.tmp / "gandalf.db"
    wait_until(lambda: _spend(db, "free")[0] > 0, 10, "usage rows written")
    result = run_cli("usage", "--config", str(gateway.config_path), "--by", "key", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and rows
    text = json.dumps(rows)
    assert "free" in text


# --------------------------------------------------------------------------- the proof


async def _race(base: str, key: str, count: int, mock: MockUpstream) -> list[httpx.Response]:
    """``count`` concurrent requests on the gated model; the gate opens once every
    request either reached the upstream or was refused."""
    payload = {
        "model": "up-gate",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=base, timeout=60.0, limits=limits) as client:
        tasks = [
            asyncio.create_task(client.post(CHAT, json=payload, headers=headers))
            for _ in range(count)
        ]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        while sum(t.done() for t in tasks) + mock.waiting < count:
            assert loop.time() < deadline, "requests neither refused nor at the upstream"
            await asyncio.wait(tasks, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
        mock.open_gate()
        return list(await asyncio.gather(*tasks))


def test_fifty_concurrent_requests_against_a_budget_that_fits_ten(tmp_path: Path) -> None:
    """The worst case of one request: ~(prompt estimate + 1,000 max tokens) x $0.001,
    just over $1.00; a $10.50 budget fits 10 of them, not 11."""
    key = generate_key()
    with running_upstream() as mock:
        config = _config(mock)
        config["keys"] = [
            {
                "name": "racer",
                "key": key,
                "role": "member",
                "budget": {"usd": 10.5, "period": "total"},
            }
        ]
        with GandalfServer(tmp_path, config) as server:
            replies = asyncio.run(_race(server.url, key, 50, mock))
            served = [r for r in replies if r.status_code == 200]
            refused = [r for r in replies if r.status_code == 429]
            assert len(served) + len(refused) == 50, [r.status_code for r in replies]
            assert 1 <= len(served) <= 10
            assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
            db = tmp_path / "gandalf.db"
            wait_until(lambda: _spend(db, "racer")[0] == len(served), 10, "usage rows")
            assert _spend(db, "racer")[1] <= 10.5


def test_spend_survives_a_restart(tmp_path: Path) -> None:
    key = generate_key()
    with running_upstream() as mock:
        config = _config(mock)
        config["keys"] = [
            {
                "name": "saver",
                "key": key,
                "role": "member",
                "budget": {"usd": 0.05, "period": "monthly"},
            }
        ]
        with (
            GandalfServer(tmp_path, config) as server,
            _client(server, key) as client,
            pytest.raises(openai.RateLimitError),
        ):
            for _ in range(40):
                _ask(client, model="up-ok", max_tokens=5)
        with (
            GandalfServer(tmp_path, config, name="again") as server,
            _client(server, key) as client,
            pytest.raises(openai.RateLimitError) as refused,
        ):
            _ask(client, model="up-ok", max_tokens=5)
    assert refused.value.response.json()["error"]["code"] == "insufficient_quota"


# --------------------------------------------------------------------------- native APIs


def test_native_calls_are_limited_and_refused_in_their_own_shape(tmp_path: Path) -> None:
    """Limits apply to native passthrough: an Ollama client gets Ollama's error
    shape, with the same headers as an OpenAI client."""
    key = generate_key()
    with running_upstream() as mock:
        config = _config(mock)
        root = mock.base_url.removesuffix("/v1")
        config["providers"].append({"name": "ol", "type": "ollama", "base_url": root})
        config["routes"].append(route("ol-echo", "ol", "echo"))
        config["keys"] = [{"name": "native", "key": key, "role": "member", "rpm": 1}]
        with (
            GandalfServer(tmp_path, config) as server,
            httpx.Client(base_url=server.url, timeout=30.0) as client,
        ):
            ask = {"model": "ol-echo", "messages": [{"role": "user", "content": "x"}]}
            auth = {"authorization": f"Bearer {key}"}
            first = client.post("/api/chat", json={**ask, "stream": False}, headers=auth)
            second = client.post("/api/chat", json={**ask, "stream": False}, headers=auth)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert second.status_code == 429
    assert set(second.json()) == {"error"} and "Rate limit" in second.json()["error"]
    assert int(second.headers["retry-after"]) >= 1


# --------------------------------------------------------------------------- workers


def test_two_workers_never_exceed_the_limit_together(tmp_path: Path) -> None:
    key = generate_key()
    with running_upstream() as mock:
        config = _config(mock, server={"workers": 2})
        config["keys"] = [{"name": "pair", "key": key, "role": "member", "rpm": 4}]
        with GandalfServer(tmp_path, config) as server:
            statuses = []
            for _ in range(24):  # a new connection each: both workers get some
                with httpx.Client(base_url=server.url, timeout=30.0) as client:
                    reply = client.post(
                        CHAT,
                        json={
                            "model": "fake-model",
                            "messages": [{"role": "user", "content": "x"}],
                        },
                        headers={"authorization": f"Bearer {key}"},
                    )
                statuses.append(reply.status_code)
    assert set(statuses) <= {200, 429}
    assert 1 <= statuses.count(200) <= 4
