"""The web UI's pages over a million usage rows: every admin API call each page makes, timed.

Fills a SQLite database (all migrations) with ``--rows`` usage records spread
over 30 days (``--keys`` keys in 20 teams of 5 orgs, 8 models on 4 providers,
2% errors, a daily traffic curve; one ``executemany`` in one transaction),
then the hourly and daily rollups from them (the writer's own upsert
statements, once), plus the keys, teams and orgs (with budgets, so the keys and
tenants pages ask for spend). Then builds the app on that database in process
(the same Starlette admin API, session auth and UI app as ``gandalf serve``,
no sockets) and times each page's calls ``--repeat`` times: the median and
worst per call, and per page the sum of the medians (the page's calls run in
parallel in the browser, so this is an upper bound on one worker)::

    PYTHONPATH=. python bench/ui_pages.py               # 1,000,000 rows
    PYTHONPATH=. python bench/ui_pages.py --rows 100000 --db /tmp/ui.db --keep
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import msgspec

from gandalf.auth.apikey import generate_key
from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import ProviderConfig, Route, Target, UsageRecord
from gandalf.server.asgi import GandalfApp
from gandalf.storage._rollups import ROLLUP_UPSERTS
from gandalf.storage.sqlite import SqliteStore
from gandalf.wiring import create_app

DAY = 86400.0
MODELS = (
    ("gpt-4o", "openai"),
    ("gpt-4o-mini", "openai"),
    ("o3", "openai"),
    ("claude-sonnet-4-5", "anthropic"),
    ("claude-haiku-4-5", "anthropic"),
    ("gemini-2.5-pro", "gemini"),
    ("gemini-2.5-flash", "gemini"),
    ("llama3.1:8b", "ollama"),
)
ADMIN = generate_key()
FIELDS = UsageRecord.__struct_fields__


def _month_start(now: float) -> float:
    t = time.gmtime(now)
    return float(time.mktime((t.tm_year, t.tm_mon, 1, 0, 0, 0, 0, 0, 0)) - time.timezone)


def _day_start(now: float) -> float:
    return now // DAY * DAY


def pages(now: float) -> dict[str, list[str]]:
    """Each page's admin API calls, as the page's script makes them (app.js):
    every page of each (``usageAll``), or the first only (``!``)."""
    month, day = int(_month_start(now)), int(_day_start(now))
    hour = int(now // 3600 * 3600)
    # app.js's aligned(): "24h" from 23 hours before this hour's start, "Nd" from
    # N - 1 days before today's (UTC).
    h24, d7, d30 = hour - 23 * 3600, day - 6 * 86400, day - 29 * 86400
    return {
        "overview 24h": [
            f"/usage?limit=1000&since={h24}&bucket=hour",
            f"/usage?limit=1000&since={h24}&bucket=hour&group_by=route",
            f"/usage?limit=1000&since={h24}&bucket=hour&group_by=provider",
        ],
        "overview 7d": [
            f"/usage?limit=1000&since={d7}&bucket=hour",
            f"/usage?limit=1000&since={d7}&bucket=day&group_by=route",
            f"/usage?limit=1000&since={d7}&bucket=day&group_by=provider",
        ],
        "overview 30d": [
            f"/usage?limit=1000&since={d30}&bucket=day",
            f"/usage?limit=1000&since={d30}&bucket=day&group_by=route",
            f"/usage?limit=1000&since={d30}&bucket=day&group_by=provider",
        ],
        "keys": [
            "/keys?limit=1000",
            f"/usage?limit=1000&group_by=key&since={month}",
            f"/usage?limit=1000&group_by=key&since={day}",
        ],
        "orgs & teams": [
            "/orgs?limit=1000",
            "/teams?limit=1000",
            f"/usage?limit=1000&group_by=org&since={month}",
            f"/usage?limit=1000&group_by=team&since={month}",
        ],
        # The explorer shows one page (1,000 rows); only its CSV export reads them all.
        "usage: by model, 7d": [f"!/usage?limit=1000&group_by=model&since={d7}"],
        "usage: by route per day, 7d": [f"!/usage?limit=1000&group_by=route&since={d7}&bucket=day"],
        "usage: by key per day, 30d": [f"!/usage?limit=1000&group_by=key&since={d30}&bucket=day"],
        "usage: by team per hour, 7d": [f"!/usage?limit=1000&group_by=team&since={d7}&bucket=hour"],
        "providers": [
            "/providers?limit=1000",
            "/providers/health",
            f"/usage?limit=1000&group_by=provider&since={h24}&bucket=hour",
        ],
    }


def _records(rows: int, keys: int, now: float) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(20)
    start = now - 30 * DAY
    weights = [1.0 + 0.8 * math.sin((h - 9) / 24 * math.tau) for h in range(24)]  # a day's curve
    hours = rng.choices(range(24), weights=weights, k=rows)
    for i in range(rows):
        day = rng.randrange(30)
        created = start + day * DAY + hours[i] * 3600 + rng.random() * 3600
        if created >= now:
            created = now - rng.random() * 3600
        k = int(rng.paretovariate(1.2)) % keys  # a few heavy keys, a long tail
        model, provider = MODELS[(k + rng.randrange(3)) % len(MODELS)]
        prompt = rng.randrange(20, 4000)
        completion = rng.randrange(1, 800)
        error = rng.random() < 0.02
        values = {
            "request_id": f"req-{i}",
            "key_id": f"key-{k}",
            "org_id": f"org-{k % 5}",
            "model_alias": model,
            "target_model": model,
            "provider": provider,
            "prompt_tokens": 0 if error else prompt,
            "completion_tokens": 0 if error else completion,
            "total_tokens": 0 if error else prompt + completion,
            "latency_ms": rng.uniform(80, 2500),
            "status": 502 if error else 200,
            "created_at": created,
            "team_id": f"team-{k % 20}",
            "cost_usd": None if error else (prompt * 2.5 + completion * 10.0) / 1e6,
        }
        yield tuple(values.get(f, _DEFAULTS.get(f)) for f in FIELDS)


_DEFAULTS_OF = UsageRecord.__struct_defaults__
_DEFAULTS: dict[str, Any] = dict(
    zip(FIELDS[len(FIELDS) - len(_DEFAULTS_OF) :], _DEFAULTS_OF, strict=True)
)


async def build(path: Path, rows: int, keys: int, now: float) -> None:
    store = SqliteStore(str(path), clock=lambda: now)
    await store.open()  # every migration, empty tables
    await store.close()
    started = time.perf_counter()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        with conn:  # one transaction
            conn.executemany(
                "INSERT INTO organizations (id, name, created_at, budget_usd, budget_period, "
                "source) VALUES (?, ?, ?, ?, 'monthly', 'api')",
                [(f"org-{o}", f"Org {o}", now, 5000.0) for o in range(5)],
            )
            conn.executemany(
                "INSERT INTO teams (id, org_id, name, created_at, budget_usd, budget_period, "
                "source) VALUES (?, ?, ?, ?, ?, 'monthly', 'api')",
                [(f"team-{t}", f"org-{t % 5}", f"Team {t}", now, 1000.0) for t in range(20)],
            )
            conn.executemany(
                "INSERT INTO api_keys (id, name, key_hash, prefix, org_id, team_id, role, "
                "created_at, source, budget_usd, budget_period) "
                "VALUES (?, ?, ?, ?, ?, ?, 'member', ?, 'api', ?, ?)",
                [
                    (
                        f"key-{k}",
                        f"service-{k}",
                        hashlib.sha256(f"bench-{k}".encode()).hexdigest(),
                        "gnd_ben",
                        f"org-{k % 5}",
                        f"team-{k % 20}",
                        now,
                        100.0 if k % 3 else None,
                        "daily" if k % 7 == 0 else "monthly",
                    )
                    for k in range(keys)
                ],
            )
            placeholders = ", ".join("?" * len(FIELDS))
            conn.executemany(
                f"INSERT INTO usage_records ({', '.join(FIELDS)}) VALUES ({placeholders})",
                _records(rows, keys, now),
            )
        filled = time.perf_counter()
        with conn:
            for upsert in ROLLUP_UPSERTS:
                conn.execute(upsert, (0,))
        hourly = conn.execute("SELECT count(*) FROM usage_hourly").fetchone()[0]
        daily = conn.execute("SELECT count(*) FROM usage_daily").fetchone()[0]
    print(
        f"filled {rows:,} usage rows in {filled - started:.1f} s, rollups in "
        f"{time.perf_counter() - filled:.1f} s ({hourly:,} hourly, {daily:,} daily rows)"
    )


async def _pages(app: GandalfApp, path: str, *, all_pages: bool = True) -> tuple[int, int, int]:
    """GET ``path`` and, as app.js's ``usageAll`` does, every further page of
    it (``has_more``, the first page's absolute range): status, bytes, calls."""
    status, body = await _get(app, path)
    size, calls = len(body), 1
    page = msgspec.json.decode(body) if status == 200 else {}
    base = path.split("&since=")[0] if "&since=" in path else path
    while all_pages and isinstance(page, dict) and page.get("has_more") and calls < 20:
        more = (
            f"{base}&offset={page['offset'] + page['limit']}"
            f"&since={page['since']}&until={page['until']}"
        )
        if "bucket=" in path:
            more += "&bucket=" + path.split("bucket=")[1].split("&")[0]
        if "group_by=" in path:
            more += "&group_by=" + path.split("group_by=")[1].split("&")[0]
        status, body = await _get(app, more)
        size += len(body)
        calls += 1
        page = msgspec.json.decode(body)
    return status, size, calls


async def _get(app: GandalfApp, path: str) -> tuple[int, bytes]:
    """GET ``path`` through the whole app (ASGI, in process): status, body."""
    route, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": route,
        "raw_path": route.encode(),
        "query_string": query.encode(),
        "headers": [(b"authorization", f"Bearer {ADMIN}".encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }
    status = 0
    chunks: list[bytes] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # never: the answer is whole before this matters
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def measure(path: Path, now: float, repeat: int) -> None:
    config = GandalfConfig(
        server=ServerConfig(access_log=False, metrics=False),
        database=DatabaseConfig(dsn=str(path), usage_retention=0),
        providers=tuple(ProviderConfig(name=p, type="fake") for p in {p for _, p in MODELS}),
        routes=(Route(model_alias="m", targets=(Target(provider="openai", model="gpt-4o"),)),),
        keys=(KeyEntry(name="admin", key=ADMIN, role="admin"),),
    )
    app = create_app(config, access_log=False)
    await app.startup()
    try:
        worst_page = 0.0
        for page, calls in pages(now).items():
            medians = []
            for call in calls:
                took = []
                status = size = calls_made = 0
                for _ in range(repeat):
                    start = time.perf_counter()
                    status, size, calls_made = await _pages(
                        app, "/admin/v1" + call.lstrip("!"), all_pages=not call.startswith("!")
                    )
                    took.append((time.perf_counter() - start) * 1000)
                assert status == 200, (call, status)
                medians.append(statistics.median(took))
                print(
                    f"  {call:<62} median {medians[-1]:6.1f} ms  worst {max(took):6.1f} ms"
                    f"  {size / 1024:6.1f} KiB in {calls_made} page(s)"
                )
            worst_page = max(worst_page, sum(medians))
            print(f"{page:<30} {len(calls)} calls, {sum(medians):6.1f} ms (sum of medians)")
        for asset in ("/ui/login", "/ui/static/app.js", "/ui/static/app.css"):
            took = []
            for _ in range(repeat):
                start = time.perf_counter()
                status, _body = await _get(app, asset)
                took.append((time.perf_counter() - start) * 1000)
            assert status == 200, (asset, status)
            print(f"  {asset:<62} median {statistics.median(took):6.2f} ms")
        print(f"slowest page: {worst_page:.1f} ms (budget: 100 ms)")
    finally:
        await app.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--db", type=Path, default=None, help="database file (default: a temp one)")
    parser.add_argument("--keep", action="store_true", help="keep --db and reuse it if filled")
    args = parser.parse_args()
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "ui.db"
        if not (args.keep and path.exists()):
            path.unlink(missing_ok=True)
            asyncio.run(build(path, args.rows, args.keys, now))
        asyncio.run(measure(path, now, args.repeat))
        if not args.keep and args.db is not None:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
