"""``gandalf serve`` and ``gandalf keys`` on PostgreSQL, end to end.

A real ``gandalf serve`` (granian, two workers) with ``database.dsn`` a fresh
PostgreSQL database: keys made and revoked by the CLI, chat requests answered,
their usage rows in PostgreSQL; an unreachable server is one line at start,
without the DSN's password.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from gandalf.storage.postgres import PostgresStore
from tests.serve import GandalfServer, free_port, route, run_cli, wait_until
from tests.stores import postgres_database

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
