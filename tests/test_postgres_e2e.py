"""``gandalf serve`` and ``gandalf keys`` on PostgreSQL, end to end.

A real ``gandalf serve`` (granian, two workers) with ``database.dsn`` a fresh
PostgreSQL database: keys made and revoked by the CLI, chat requests answered,
their usage rows in PostgreSQL; stored Responses continued with
``previous_response_id``, retrieved and deleted from either worker; a JWT
user recorded on first sight and named in usage by key; an unreachable server
is one line at start, without the DSN's password.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai import OpenAI

from gandalf.auth.apikey import generate_key
from gandalf.domain import user_id
from gandalf.storage.postgres import PostgresStore
from tests.serve import GandalfServer, free_port, route, run_cli, wait_until
from tests.stores import postgres_database
from tests.test_jwt import RSA_KEY, _jwk, sign
from tests.upstream import MockUpstream

CHAT_PATH = "/v1/chat/completions"


def chat(server: GandalfServer, key: str, text: str) -> tuple[int, dict[str, Any]]:
    with httpx.Client(timeout=30.0) as client:
        response = client.post(
            f"{server.url}{CHAT_PATH}",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "fake-model", "messages": [{"role": "user", "content": text}]},
        )
    return response.status_code, response.json()


def key_id(config: str, name: str) -> str:
    listed = run_cli("keys", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    for line in listed.stdout.splitlines():
        fields = line.split()
        if name in fields:
            return fields[0]
    raise AssertionError(f"{name} not in keys list:\n{listed.stdout}")


async def stored_usage(dsn: str) -> list[tuple[str | None, str, int]]:
    store = PostgresStore(dsn)
    await store.open()
    try:
        return [(r.key_id, r.model_alias, r.status) for r in await store.list_usage()]
    finally:
        await store.close()


def test_serve_and_keys_on_postgres(tmp_path: Path) -> None:
    with postgres_database() as dsn:
        server = GandalfServer(
            tmp_path,
            {
                "database": {"dsn": dsn},
                "server": {"workers": 2},
                "providers": [{"name": "fake", "type": "fake"}],
                "routes": [route("fake-model", "fake", "fake-1")],
            },
        )
        config = str(server.config_path)
        created = run_cli("keys", "create", "--name", "svc", "--config", config)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert key.startswith("gnd_")
        doomed = run_cli("keys", "create", "--name", "doomed", "--config", config).stdout.strip()
        svc_id, doomed_id = key_id(config, "svc"), key_id(config, "doomed")

        with server:
            assert server.printed_keys() == []  # keys exist in PostgreSQL: no first admin key
            for n in range(6):
                status, body = chat(server, key, f"hello {n}")
                assert status == 200, body
                assert body["choices"][0]["message"]["content"] == f"hello {n}"
            assert chat(server, doomed, "still allowed")[0] == 200
            revoked = run_cli("keys", "revoke", doomed_id, "--config", config)
            assert revoked.returncode == 0, revoked.stderr
            # Every worker reads the revocation from PostgreSQL's change log.
            wait_until(
                lambda: all(chat(server, doomed, "refused?")[0] == 401 for _ in range(4)),
                5.0,
                "the revocation to reach both workers",
            )
            assert server.terminate() == 0, server.diagnostics()

        listed = run_cli("keys", "list", "--config", config)
        [doomed_line] = [line for line in listed.stdout.splitlines() if doomed_id in line]
        assert "revoked" in doomed_line
        rows = asyncio.run(stored_usage(dsn))
        ok = [r for r in rows if r[0] == svc_id]
        assert ok == [(svc_id, "fake-model", 200)] * 6, rows


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path: Path) -> None:
    dsn = f"postgresql://gandalf:hunter2-secret@127.0.0.1:{free_port()}/gandalf"
    path = tmp_path / "g.yaml"
    path.write_text(
        f"database: {{dsn: '{dsn}'}}\nserver: {{addr: '127.0.0.1:{free_port()}'}}\n"
        "providers: [{name: fake, type: fake}]\n",
        encoding="utf-8",
    )
    for command in (("serve",), ("keys", "list")):
        result = run_cli(*command, "--config", str(path))
        assert result.returncode != 0, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"gandalf: error: {path}: database.dsn: cannot connect to ")
        assert f"postgresql://gandalf:***@127.0.0.1:{dsn.rsplit(':', 1)[1]}" in lines[0]
        assert "hunter2" not in result.stderr + result.stdout


# --------------------------------------------------------------------------- Responses API and JWT


@contextlib.contextmanager
def static_idp() -> Iterator[str]:
    """An identity provider's JWKS (the RSA key of tests/test_jwt.py) at
    ``{url}/jwks``, served from a thread: gandalf serve fetches it while the
    test blocks on its requests. Yields the issuer URL."""
    body = json.dumps({"keys": [_jwk(RSA_KEY, "RS256", "rsa-1")]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = 200 if self.path == "/jwks" else 404
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body) if status == 200 else 0))
            self.end_headers()
            if status == 200:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def fetch(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


def test_responses_and_a_jwt_user_on_postgres(tmp_path: Path, upstream: MockUpstream) -> None:
    key, admin = generate_key(), generate_key()
    with postgres_database() as dsn, static_idp() as issuer:
        config = {
            "database": {"dsn": dsn},
            "server": {"workers": 2, "access_log": False},
            "auth": {
                "admin_key": admin,
                "jwt": [{"issuer": issuer, "audience": "gandalf", "jwks_url": issuer + "/jwks"}],
            },
            "providers": [
                {"name": "up", "type": "openai", "base_url": upstream.base_url, "api_key": "sk"},
                {"name": "fake", "type": "fake"},
            ],
            "routes": [route("up-text", "up", "echo-model"), route("fake-model", "fake", "m")],
            "keys": [{"name": "app", "key": key, "role": "member"}],
        }
        with (
            GandalfServer(tmp_path, config) as server,
            OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=30.0) as sdk,
        ):
            # Stored responses: continued, retrieved and deleted (any worker
            # may answer each request: the store is the only thing they share).
            first = sdk.responses.create(model="up-text", input="My name is Gandalf.")
            second = sdk.responses.create(
                model="up-text", input="What is my name?", previous_response_id=first.id
            )
            sent = upstream.received[-1].json()
            assert "previous_response_id" not in sent  # resolved from PostgreSQL
            assert "My name is Gandalf." in json.dumps(sent)
            for _ in range(4):
                assert sdk.responses.retrieve(second.id).output_text == second.output_text
            sdk.responses.delete(first.id)
            for _ in range(4):
                with pytest.raises(openai.NotFoundError):
                    sdk.responses.retrieve(first.id)
            stored = asyncio.run(fetch(dsn, "SELECT id FROM responses"))
            assert stored == [(second.id,)]

            # A JWT user: recorded on first sight, then named in usage by key.
            token = sign(RSA_KEY, "RS256", "rsa-1", iss=issuer, now=time.time(), sub="ada")
            chat_body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
            with httpx.Client(base_url=server.url, timeout=30.0) as client:
                for _ in range(3):
                    reply = client.post(
                        CHAT_PATH, json=chat_body, headers={"authorization": f"Bearer {token}"}
                    )
                    assert reply.status_code == 200, reply.text
                uid = user_id(issuer, "ada")
                users = asyncio.run(fetch(dsn, "SELECT id, subject, first_seen FROM users"))
                assert [u[:2] for u in users] == [(uid, "ada")]
                assert 0 < users[0][2] <= time.time()
                admin_headers = {"authorization": f"Bearer {admin}"}
                listed = client.get("/admin/v1/auth/users", headers=admin_headers)
                assert listed.status_code == 200, listed.text
                assert [u["subject"] for u in listed.json()["data"]] == ["ada"]

                def by_key() -> dict[str | None, tuple[str | None, int]]:
                    page = client.get(
                        "/admin/v1/usage",
                        params={"group_by": "key", "since": "0"},
                        headers=admin_headers,
                    )
                    assert page.status_code == 200, page.text
                    return {r["group"]: (r["name"], r["requests"]) for r in page.json()["data"]}

                wait_until(lambda: by_key().get(uid) == ("ada", 3), 10, "the user's usage")
            assert server.terminate() == 0, server.diagnostics()
