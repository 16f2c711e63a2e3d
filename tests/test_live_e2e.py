"""Admin changes are live in both workers of ``gandalf serve --workers 2``
within one second: a key revoked with the CLI is refused, a route written to
the shared database is served.

Which worker answers a connection is the kernel's choice, so the test asks
each worker directly whether it applied the change: every worker logs
``worker PID applied admin changes`` (its pid among the server's children),
and the test waits for both pids, bounded by the one-second deadline. Then
many requests on fresh connections all see the change.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx

from gandalf.domain import Route, Target
from gandalf.storage.sqlite import SqliteStore
from tests.serve import GandalfServer, run_cli, wait_until

LIVE_DEADLINE = 1.0  # the contract: every worker within one second
REQUESTS = 30  # fresh connections after the change, spread by the kernel over both workers
_APPLIED = re.compile(r"worker (\d+) applied admin changes: (Pending\([^)]*\))")


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return {int(p) for p in f.read().split()}


def applied(server: GandalfServer, since: int) -> dict[int, str]:
    """Worker pid -> the last change it logged applying, in stderr after offset ``since``."""
    return {int(m[1]): m[2] for m in _APPLIED.finditer(server.stderr()[since:])}


def status(server: GandalfServer, key: str, model: str) -> int:
    """One chat completion on a new connection (so the kernel picks a worker anew)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        reply = client.post(
            "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}", "connection": "close"},
        )
        return reply.status_code


def wait_for_both(server: GandalfServer, workers: set[int], offset: int, start: float) -> float:
    """Seconds from ``start`` until every worker logged applying a change."""
    wait_until(
        lambda: workers <= applied(server, offset).keys(),
        LIVE_DEADLINE * 5,  # a failure then reports how late it was, not just "timed out"
        "both workers to apply the change",
    )
    return time.monotonic() - start


def test_revocation_and_new_routes_are_live_in_both_workers(tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    config = {
        "server": {"workers": 2},
        "database": {"dsn": str(db)},
        "providers": [{"name": "fake", "models": ["fake-model"]}],
        "keys": [],
    }
    server = GandalfServer(tmp_path, config)
    with server:
        process = server.process
        assert process is not None
        wait_until(lambda: len(children(process.pid)) == 2, 10, "two workers")
        workers = children(process.pid)

        created = run_cli("keys", "create", "--name", "live", "--config", str(server.config_path))
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        key_id = re.search(r"created key (\S+)", created.stderr)
        assert key_id is not None, created.stderr
        # A new key: each worker may have it cached as unknown; it works at once anyway.
        wait_until(
            lambda: all(status(server, key, "fake-model") == 200 for _ in range(5)),
            LIVE_DEADLINE * 5,
            "the new key to work",
        )
        assert all(status(server, key, "fake-model") == 200 for _ in range(REQUESTS))

        # ---- revoke with the CLI (another process, the same database file)
        offset = len(server.stderr())
        revoked = run_cli("keys", "revoke", key_id[1], "--config", str(server.config_path))
        start = time.monotonic()  # the revocation is committed when the CLI exits
        assert revoked.returncode == 0, revoked.stderr
        took = wait_for_both(server, workers, offset, start)
        assert took < LIVE_DEADLINE, f"revocation took {took:.3f}s to reach both workers"
        assert all("keys=1" in p for p in applied(server, offset).values())
        assert [status(server, key, "fake-model") for _ in range(REQUESTS)] == [401] * REQUESTS

        # ---- a route written to the store by another process
        admin = server.printed_keys()[0]
        assert status(server, admin, "smart") == 404
        offset = len(server.stderr())

        async def add_route() -> None:
            store = SqliteStore(str(db))
            await store.open()
            try:
                target = Target(provider="fake", model="fake-model")
                await store.upsert_route(
                    Route(model_alias="smart", targets=(target,), source="api")
                )
            finally:
                await store.close()

        asyncio.run(add_route())
        start = time.monotonic()
        took = wait_for_both(server, workers, offset, start)
        assert took < LIVE_DEADLINE, f"the route took {took:.3f}s to reach both workers"
        assert all("routes=True" in p for p in applied(server, offset).values())
        assert [status(server, admin, "smart") for _ in range(REQUESTS)] == [200] * REQUESTS
        for _ in range(10):  # /v1/models reads the swapped table too, in each worker
            with httpx.Client(base_url=server.url, timeout=10.0) as client:
                listed = client.get(
                    "/v1/models",
                    headers={"authorization": f"Bearer {admin}", "connection": "close"},
                )
            assert "smart" in {m["id"] for m in listed.json()["data"]}
        assert server.terminate() == 0


def test_a_cache_purge_reaches_both_workers(tmp_path: Path) -> None:
    config = {
        "server": {"workers": 2},
        "database": {"dsn": str(tmp_path / "live.db")},
        "providers": [{"name": "fake", "models": ["fake-model"]}],
        "cache": {"ttl": "1h"},
        "keys": [],
    }
    server = GandalfServer(tmp_path, config)
    with server:
        process = server.process
        assert process is not None
        wait_until(lambda: len(children(process.pid)) == 2, 10, "two workers")
        workers = children(process.pid)
        admin = server.printed_keys()[0]
        offset = len(server.stderr())
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            purged = client.post(
                "/admin/v1/cache/purge", headers={"authorization": f"Bearer {admin}"}
            )
        start = time.monotonic()
        assert purged.status_code == 200 and purged.json() == {"purged": 0}
        took = wait_for_both(server, workers, offset, start)
        assert took < LIVE_DEADLINE, f"the purge took {took:.3f}s to reach both workers"
        assert all("cache=True" in p for p in applied(server, offset).values())
        assert server.terminate() == 0
