"""``just profile``: pyinstrument over an in-process run against the mock upstream.

The Gandalf ASGI app (auth on, routing on, usage recording on, the openai
adapter over aiohttp) is driven in-process by ``--concurrency`` request loops
for ``--requests`` requests, while the real mock upstream (a subprocess,
pinned to the other core when there is one) answers. No socket between client
and Gandalf, so the profile shows Gandalf's own work and the upstream client's.

Output: ``bench/results/profile.html`` and ``bench/results/profile.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mock_upstream import start_mock
from test_micro import KEY, Driver

from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry, ServerConfig
from gandalf.domain import ProviderConfig, Route, Target
from gandalf.wiring import create_app

RESULTS = Path(__file__).resolve().parent / "results"
BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"Hello, how are you today?"}]}'
STREAM_BODY = (
    b'{"model":"bench-model","stream":true,'
    b'"messages":[{"role":"user","content":"Hello, how are you today?"}]}'
)


async def drive(
    port: int, db: str, requests: int, concurrency: int, profile: bool, stream: bool = False
) -> float:
    config = GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=db),
        providers=(
            ProviderConfig(
                name="mock", type="openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-x"
            ),
        ),
        routes=(
            Route(
                model_alias="bench-model", targets=(Target(provider="mock", model="bench-model"),)
            ),
        ),
        keys=(KeyEntry(name="bench", key=KEY, role="service_account"),),
    )
    app = create_app(config, access_log=False)
    await app.startup()
    body = STREAM_BODY if stream else BODY
    drivers = [Driver(app, "POST", "/v1/chat/completions", body) for _ in range(concurrency)]
    await asyncio.gather(*(d.run(20) for d in drivers))  # warm the pool and the key cache
    per_driver = max(1, requests // concurrency)
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(d.run(per_driver) for d in drivers))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    if profiler is not None:
        profiler.stop()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "profile.html").write_text(profiler.output_html())
        (RESULTS / "profile.txt").write_text(profiler.output_text(unicode=False, show_all=False))
    await app.shutdown()
    statuses: dict[int, int] = {}
    for d in drivers:
        for status, count in d.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    done = per_driver * concurrency
    print(f"statuses: {statuses}; CPU per request: {cpu / done * 1e6:.1f} us (all threads)")
    return done / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-profile", action="store_true", help="only time the run")
    parser.add_argument("--stream", action="store_true", help="streaming chat completions")
    args = parser.parse_args()
    cpus = "1" if (os.cpu_count() or 1) >= 2 else None
    if cpus:
        os.sched_setaffinity(0, {0})
    import uvloop

    proc, port = start_mock(cpus=cpus)
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rate = uvloop.run(
                drive(
                    port,
                    os.path.join(tmp, "p.db"),
                    args.requests,
                    args.concurrency,
                    not args.no_profile,
                    args.stream,
                )
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    print(f"{rate:,.0f} req/s in-process ({args.concurrency} concurrent)")
    if not args.no_profile:
        print(f"profile: {RESULTS / 'profile.html'} and {RESULTS / 'profile.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
