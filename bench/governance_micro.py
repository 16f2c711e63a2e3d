"""In-process cost of governance per chat request: the ASGI app driven directly
(``test_micro.Driver``, the fake provider), with the young-generation GC threshold
a server worker uses, interleaved over rounds.

Configurations: ``off`` (no limits, no prices), ``price`` (a price for the model:
every record's cost computed), ``key`` (the key's own rpm), ``tenant`` (the key in
a team of an org, nothing limited), ``rates3`` (rpm and tpm at the three levels),
``budgets3`` (a budget at the three levels, priced), ``all`` (the key in a team of
an org, rpm, tpm and a budget at every level, priced).

    python bench/governance_micro.py [--rounds 5] [--requests 3000]

Prints microseconds per request per configuration (best and median round).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_micro import CHAT_BODY, KEY, Driver

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import (
    Budget,
    ModelPrice,
    Organization,
    ProviderConfig,
    Route,
    Target,
    Team,
)
from gandalf.server.asgi import GandalfApp
from gandalf.wiring import create_app

CONFIGS = ("off", "price", "key", "tenant", "rates3", "budgets3", "all")
# One piece at one level each (bench/governance_cg.py counts them too): the
# key's tpm, the key's budget (priced), the team's rpm, the org's budget (priced).
SINGLES = ("ktpm", "kbudget", "trpm", "obudget")
_BIG = Budget(usd=1e9, period="monthly")
_PRICE = (ModelPrice(provider="fake", model="fake-1", input=1.0, output=2.0),)


def config(name: str) -> GandalfConfig:
    key = KeyEntry(name="bench", key=KEY, role="service_account")
    orgs: tuple[Organization, ...] = ()
    teams: tuple[Team, ...] = ()
    priced = ("price", "budgets3", "all", "kbudget", "obudget")
    pricing: tuple[ModelPrice, ...] = _PRICE if name in priced else ()
    if name == "key":
        key = KeyEntry(name="bench", key=KEY, role="service_account", rpm=10**8)
    elif name == "ktpm":
        key = KeyEntry(name="bench", key=KEY, role="service_account", tpm=10**12)
    elif name == "kbudget":
        key = KeyEntry(name="bench", key=KEY, role="service_account", budget=_BIG)
    elif name in ("trpm", "obudget"):
        team_rpm = 10**8 if name == "trpm" else 0
        org_budget = _BIG if name == "obudget" else None
        orgs = (Organization(id="o", name="o", budget=org_budget),)
        teams = (Team(id="t", org_id="o", name="t", rpm=team_rpm),)
        key = KeyEntry(name="bench", key=KEY, role="service_account", org_id="o", team_id="t")
    elif name in ("tenant", "rates3", "budgets3"):
        rates = name == "rates3"
        budget = _BIG if name == "budgets3" else None
        rpm, tpm = (10**8, 10**12) if rates else (0, 0)
        orgs = (Organization(id="o", name="o", rpm=rpm, tpm=tpm, budget=budget),)
        teams = (Team(id="t", org_id="o", name="t", rpm=rpm, tpm=tpm, budget=budget),)
        key = KeyEntry(
            name="bench",
            key=KEY,
            role="service_account",
            org_id="o",
            team_id="t",
            rpm=rpm,
            tpm=tpm,
            budget=budget,
        )
    elif name == "all":
        orgs = (Organization(id="o", name="o", rpm=10**8, tpm=10**12, budget=_BIG),)
        teams = (Team(id="t", org_id="o", name="t", rpm=10**8, tpm=10**12, budget=_BIG),)
        key = KeyEntry(
            name="bench",
            key=KEY,
            role="service_account",
            org_id="o",
            team_id="t",
            rpm=10**8,
            tpm=10**12,
            budget=_BIG,
        )
    return GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=":memory:"),
        providers=(ProviderConfig(name="fake", type="fake"),),
        routes=(
            Route(model_alias="bench-model", targets=(Target(provider="fake", model="fake-1"),)),
        ),
        keys=(key,),
        orgs=orgs,
        teams=teams,
        pricing=pricing,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    gc.set_threshold(20_000, 10, 10)  # as Lifecycle.worker_ready sets it
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    apps: dict[str, GandalfApp] = {}
    for name in CONFIGS:
        app = create_app(config(name), access_log=False)
        loop.run_until_complete(app.startup())
        apps[name] = app
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    try:
        for _ in range(args.rounds):
            for name in CONFIGS:
                driver = Driver(apps[name], "POST", "/v1/chat/completions", CHAT_BODY)
                loop.run_until_complete(driver.run(200))  # warm: key cache, plans, buckets
                started = time.perf_counter()
                loop.run_until_complete(driver.run(args.requests))
                times[name].append((time.perf_counter() - started) / args.requests * 1e6)
                if set(driver.statuses) != {200}:
                    raise SystemExit(f"{name}: statuses {driver.statuses}")
    finally:
        for app in apps.values():
            loop.run_until_complete(app.shutdown())
        loop.close()
    base = min(times["off"])
    for name in CONFIGS:
        best = min(times[name])
        print(
            f"{name:6} best {best:6.1f} us  median {statistics.median(times[name]):6.1f} us"
            f"  (+{best - base:.1f} us over off)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
