"""The usage writer's cost per record: ``_commit_usage`` alone, on SQLite.

Opens a fresh database file (every migration), then commits ``--batches``
batches of ``--size`` records each straight through the store's
``_commit_usage`` (the transaction the writer runs per batch: the multi-row
inserts, the rollups, the commit), timed per round. Records look like served
traffic: ``--keys`` keys (100; 1 is what the served benches send) in up to 20
teams of up to 5 orgs, one of 6 models on 3 providers per key, priced; a
batch a second (so within one hour, as under load). Reported per record,
median over ``--rounds`` rounds (each on a new file):

- ``writer us``: CPU of the writer connection's thread (aiosqlite's, where
  SQLite runs: the figure a served worker pays on its writer thread);
- ``process us``: CPU of the whole process (adds the event loop's share:
  the rows built from the records, the hand-offs);
- ``wall us``.

Run it with ``PYTHONPATH`` pointing at another checkout for a before/after::

    PYTHONPATH=. python bench/usage_writer.py
    PYTHONPATH=. python bench/usage_writer.py --keys 1 --batches 200 --size 256 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from gandalf.domain import UsageRecord
from gandalf.storage.sqlite import SqliteStore

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
MODELS = (
    ("gpt-4o", "openai"),
    ("gpt-4o-mini", "openai"),
    ("claude-sonnet-4-5", "anthropic"),
    ("claude-haiku-4-5", "anthropic"),
    ("gemini-2.5-pro", "gemini"),
    ("gemini-2.5-flash", "gemini"),
)


def _batch(n: int, size: int, keys: int) -> list[UsageRecord]:
    records = []
    for i in range(size):
        k = (n * size + i) * 7919 % keys
        alias, provider = MODELS[k % len(MODELS)]
        records.append(
            UsageRecord(
                request_id=f"req-{n}-{i}",
                key_id=f"key-{k:03d}",
                org_id=f"org-{k % 5}",
                model_alias=alias,
                target_model=alias,
                provider=provider,
                prompt_tokens=120 + k,
                completion_tokens=40 + k % 17,
                total_tokens=160 + k + k % 17,
                latency_ms=12.5 + k % 9,
                status=200 if k % 50 else 502,
                created_at=T0 + n + i / size,
                team_id=f"team-{k % 20:02d}",
                cost_usd=0.0001 * (1 + k % 7),
            )
        )
    return records


def _thread_cpu(tid: int) -> float:
    """CPU seconds (user + system) of thread ``tid`` of this process."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round(path: str, batches: list[list[UsageRecord]]) -> tuple[float, float, float]:
    store = SqliteStore(path, readers=1)
    await store.open()
    try:
        conn = store._writer_conn
        assert conn is not None
        thread = conn._thread  # aiosqlite's worker thread: where SQLite runs
        assert isinstance(thread, threading.Thread) and thread.native_id is not None
        tid = thread.native_id
        writer0, process0, wall0 = _thread_cpu(tid), time.process_time(), time.perf_counter()
        for batch in batches:
            await store._commit_usage(conn, batch)
        writer1, process1, wall1 = _thread_cpu(tid), time.process_time(), time.perf_counter()
    finally:
        await store.close()
    n = sum(map(len, batches))
    return (
        (writer1 - writer0) / n * 1e6,
        (process1 - process0) / n * 1e6,
        (wall1 - wall0) / n * 1e6,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200, help="batches per round")
    parser.add_argument("--size", type=int, default=256, help="records per batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--keys", type=int, default=100, help="keys the records spread over (1: the served bench)"
    )
    args = parser.parse_args()
    batches = [_batch(n, args.size, args.keys) for n in range(args.batches)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            results.append(await _round(str(Path(tmp) / f"usage-{r}.db"), batches))
    print(
        f"{args.batches} batches x {args.size} records of {args.keys} key(s), {args.rounds} rounds "
        "(median [min-max], us per record)"
    )
    for name, values in zip(("writer", "process", "wall"), zip(*results, strict=True), strict=True):
        print(
            f"  {name:<8} {statistics.median(values):6.2f}  [{min(values):.2f}-{max(values):.2f}]"
        )


if __name__ == "__main__":
    asyncio.run(main())
