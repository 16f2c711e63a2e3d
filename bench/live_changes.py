"""How long an admin change takes to reach every worker of ``gandalf serve --workers 2``.

Starts the server (the built-in fake provider, a temporary database), then
``--trials`` times: creates a key and checks it works, revokes it through a
store opened on the same database file (as the CLI or the admin API would)
and measures, from the moment the revocation committed,

- per worker, when it applied the change (its ``worker PID applied admin
  changes`` log line, stamped to the millisecond);
- when requests on fresh connections began to be refused for good (the first
  of ``--streak`` consecutive 401s).

Prints each trial and the distribution (min, median, p90, max)::

    PYTHONPATH=. python bench/live_changes.py --trials 20
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from gandalf.auth.apikey import display_prefix, generate_key, hash_key
from gandalf.domain import ApiKey
from gandalf.storage.sqlite import SqliteStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.serve import GandalfServer, wait_until

_APPLIED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO gandalf.live: worker (\d+) applied admin "
    r"changes: Pending\(keys=1,",
    re.MULTILINE,
)
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def status(url: str, key: str) -> int:
    with httpx.Client(base_url=url, timeout=10.0) as client:
        reply = client.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"authorization": f"Bearer {key}", "connection": "close"},
        )
        return reply.status_code


def applied_at(stderr: str) -> dict[int, float]:
    """Worker pid -> unix time it applied a one-key change (the last such line)."""
    return {
        int(m[2]): datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for m in _APPLIED.finditer(stderr)
    }


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return {int(p) for p in f.read().split()}


async def write(db: Path, action: str, key: ApiKey) -> float:
    """Create or revoke ``key`` through a store of our own; the commit's wall time."""
    store = SqliteStore(str(db))
    await store.open()
    try:
        if action == "create":
            await store.create_key(key)
        else:
            await store.revoke_key(key.id)
        return time.time()
    finally:
        await store.close()


def percentiles(label: str, values: list[float]) -> None:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    print(
        f"{label:<36} min {ordered[0] * 1000:6.0f} ms  median "
        f"{statistics.median(ordered) * 1000:6.0f} ms  p90 {p90 * 1000:6.0f} ms  "
        f"max {ordered[-1] * 1000:6.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--streak", type=int, default=20, help="consecutive 401s that count")
    args = parser.parse_args()
    worker_lag: list[float] = []
    last_worker: list[float] = []
    refused: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "live.db"
        config = {
            "server": {"workers": 2, "access_log": False},
            "database": {"dsn": str(db)},
            "providers": [{"name": "fake", "models": ["fake-model"]}],
            "keys": [],
        }
        with GandalfServer(Path(tmp), config) as server:
            process = server.process
            assert process is not None
            wait_until(lambda: len(children(process.pid)) == 2, 10, "two workers")
            workers = children(process.pid)
            for trial in range(args.trials):
                secret = generate_key()
                key = ApiKey(
                    id=f"bench-{trial}",
                    name="bench",
                    key_hash=hash_key(secret),
                    prefix=display_prefix(secret),
                )
                asyncio.run(write(db, "create", key))
                wait_until(
                    lambda s=secret: all(status(server.url, s) == 200 for _ in range(4)),  # type: ignore[misc]
                    5,
                    "the new key",
                )
                offset = len(server.stderr())
                committed = asyncio.run(write(db, "revoke", key))
                streak, first = 0, 0.0
                deadline = time.monotonic() + 10
                while streak < args.streak and time.monotonic() < deadline:
                    if status(server.url, secret) == 401:
                        if streak == 0:
                            first = time.time()
                        streak += 1
                    else:
                        streak = 0
                wait_until(
                    lambda o=offset: workers <= applied_at(server.stderr()[o:]).keys(),  # type: ignore[misc]
                    5,
                    "both workers' log lines",
                )
                times = applied_at(server.stderr()[offset:])
                lags = [times[pid] - committed for pid in workers]
                worker_lag.extend(lags)
                last_worker.append(max(lags))
                refused.append(first - committed)
                print(
                    f"trial {trial + 1:>2}: workers applied after "
                    + ", ".join(f"{lag * 1000:4.0f} ms" for lag in sorted(lags))
                    + f"; refused for good after {(first - committed) * 1000:4.0f} ms"
                )
            server.terminate()
    percentiles("a worker applied the revocation", worker_lag)
    percentiles("both workers applied it", last_worker)
    percentiles(f"{args.streak} fresh requests in a row refused", refused)


if __name__ == "__main__":
    main()
