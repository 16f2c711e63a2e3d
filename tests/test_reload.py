"""``gandalf serve`` operations end to end: SIGHUP reloads, crashed workers come back.

A real granian server runs as a subprocess (tests/serve.py); every wait polls an
observable condition (an HTTP answer, a log line, the process table) until a deadline.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from gandalf.auth.apikey import generate_key
from tests.serve import GandalfServer, render_config, route, wait_until

ADMIN_X = generate_key()
ADMIN_Y = generate_key()
KEY_A = generate_key()
DEADLINE = 30.0


def config(admin: str, aliases: list[str], keys: list[dict[str, str]], **server: Any) -> Any:
    return {
        "server": {"access_log": False, **server},
        "auth": {"admin_key": admin},
        "providers": [{"name": "fake", "type": "fake"}],
        "routes": [route(alias, "fake", "fake-1") for alias in aliases],
        "keys": keys,
    }


def status(client: httpx.Client, key: str, model: str) -> int:
    """The status of one chat completion on a new connection, or 0 when it failed.

    No keep-alive: a kept connection would belong to one worker, and these tests
    replace workers under it."""
    try:
        reply = client.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}", "connection": "close"},
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        )
    except httpx.TransportError:
        return 0
    return reply.status_code


def test_sighup_refuses_a_broken_config_and_applies_a_good_one(tmp_path: Path) -> None:
    first = config(ADMIN_X, ["old"], [{"name": "a", "key": KEY_A}])
    with (
        GandalfServer(tmp_path, first) as server,
        httpx.Client(base_url=server.url, timeout=10.0) as client,
    ):
        assert server.process is not None
        assert status(client, ADMIN_X, "old") == 200
        assert status(client, KEY_A, "old") == 200

        # 1. A broken file: refused with one "file: key.path: problem" line, nothing changes.
        broken = config(ADMIN_X, ["old"], [])
        broken["routes"][0]["targets"][0]["provider"] = "nosuch"
        server.config_path.write_text(render_config(broken, server.port, tmp_path))
        server.process.send_signal(signal.SIGHUP)
        problem = f"{server.config_path}: routes[0].targets[0].provider: unknown provider 'nosuch'"

        def refused() -> list[str]:
            return [line for line in server.stderr().splitlines() if "reload refused" in line]

        wait_until(lambda: bool(refused()), DEADLINE, "the refusal to be logged")
        assert len(refused()) == 1 and refused()[0].endswith(problem), server.diagnostics()
        assert server.running, server.diagnostics()
        assert status(client, ADMIN_X, "old") == 200
        assert status(client, KEY_A, "old") == 200

        # 2. A good file with a changed route, key a removed and the admin key replaced.
        second = config(ADMIN_Y, ["new"], [])
        server.config_path.write_text(render_config(second, server.port, tmp_path))
        main = server.process.pid
        old_workers = children(main)
        assert old_workers
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: status(client, ADMIN_Y, "new") == 200, DEADLINE, "the new route")
        # granian stops the old worker after its respawn interval; then only the new one answers.
        wait_until(lambda: not old_workers & children(main), DEADLINE, "the old worker")
        assert status(client, ADMIN_Y, "old") == 404
        assert status(client, ADMIN_X, "new") == 401
        assert status(client, KEY_A, "new") == 401
        assert server.running, server.diagnostics()
        assert "Traceback" not in server.stderr()


def children(pid: int) -> set[int]:
    """The direct child processes of ``pid`` (granian's workers), from /proc."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                found.update(int(p) for p in f.read().split())
        except FileNotFoundError:  # the thread ended while we looked
            continue
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_a_killed_worker_is_respawned_and_the_gateway_keeps_serving(tmp_path: Path) -> None:
    with (
        GandalfServer(tmp_path, config(ADMIN_X, ["m"], [], workers=2)) as server,
        httpx.Client(base_url=server.url, timeout=10.0) as client,
    ):
        assert server.process is not None
        main = server.process.pid
        wait_until(lambda: len(children(main)) == 2, DEADLINE, "two workers")
        before = children(main)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        # The other worker keeps answering while granian replaces the dead one (a
        # connection the victim took as it died may fail: hence a bounded poll).
        wait_until(lambda: status(client, ADMIN_X, "m") == 200, DEADLINE, "an answer")
        wait_until(
            lambda: len(children(main) - before) == 1 and victim not in children(main),
            DEADLINE,
            "a new worker",
        )
        assert server.running, server.diagnostics()
        for _ in range(10):
            assert status(client, ADMIN_X, "m") == 200
        assert children(main) - before - {victim}
