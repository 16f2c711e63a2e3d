"""What sharing rate limits through Redis costs a chat request (issue 21).

Starts the mock upstream and, one after the other, ``gandalf serve`` (one
worker, ASGI) with the bench key limited to 100M rpm: ``local`` (the
in-process governor), ``redis`` (the same key, ``redis:`` set: one EVALSHA per
request) and ``off`` (no limit at all); each runs wrk at ``--connections``
(64) against non-streamed chat completions, ``--rounds`` times interleaved.
Prints req/s and p50/p99 per run and the median per configuration.

    python bench/redis_limits.py --redis redis://127.0.0.1:6379/0 [--rounds 3] [--duration 10]

Every key the run writes is under a prefix of its own, deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from _procs import (
    BENCH_KEY,
    CHAT_BODY,
    MODEL_ALIAS,
    REPO_DIR,
    ProcGroup,
    Server,
    chat_headers,
    cpu_seconds,
    free_port,
    install_signal_handlers,
    launch_mock,
    stop_process,
    tree_pids,
    wait_http_ok,
)
from _wrk import WrkResult, have_wrk, run_wrk, write_script

CONFIGS = ("off", "local", "redis")


def write_config(tmp: Path, name: str, port: int, mock_port: int, redis: str) -> Path:
    path = tmp / f"{name}.yaml"
    limit = "" if name == "off" else ", rpm: 100000000"
    text = (
        f'server: {{addr: "127.0.0.1:{port}"}}\n'
        f'database: {{dsn: "{tmp / f"{name}.db"}"}}\n'
        "providers:\n"
        f'  - {{name: mock, type: openai, base_url: "http://127.0.0.1:{mock_port}/v1", '
        'api_key: "sk-bench"}\n'
        "routes:\n"
        f"  - {{model_alias: {MODEL_ALIAS}, targets: [{{provider: mock, model: {MODEL_ALIAS}}}]}}\n"
        "keys:\n"
        f'  - {{name: bench, key: "{BENCH_KEY}", role: service_account{limit}}}\n'
    )
    if name == "redis":
        text += f'redis: {{url: "{redis}", prefix: "{tmp.name}:"}}\n'
    path.write_text(text)
    return path


def launch(group: ProcGroup, tmp: Path, name: str, mock_port: int, redis: str) -> Server:
    port = free_port()
    config = write_config(tmp, name, port, mock_port, redis)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")]))
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = group.add(
            subprocess.Popen(
                [sys.executable, "-m", "gandalf", "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                env=env,
                start_new_session=True,
            )
        )
    server = Server(name, proc, port, log_path)
    wait_http_ok(server, "/healthz", 20.0)
    return server


def redis_server_pid(url: str) -> int:
    """The pid of the redis-server behind ``url`` (it must run on this machine)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def drop_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        names = list(client.scan_iter(match=prefix + "*"))
        if names:
            client.delete(*names)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis", required=True, help="redis:// URL of a Redis to use")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if not have_wrk():
        print("wrk is missing (apt-get install wrk)", file=sys.stderr)
        return 2
    install_signal_handlers()
    results: dict[str, list[WrkResult]] = {name: [] for name in CONFIGS}
    cpus: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    redis_pid = redis_server_pid(args.redis)
    with tempfile.TemporaryDirectory(prefix=f"bench-{uuid.uuid4().hex[:8]}-") as name:
        tmp = Path(name)
        script = write_script(tmp / "chat.lua", CHAT_BODY, chat_headers())
        try:
            with ProcGroup() as group:
                mock = launch_mock(group, chunks=20, cpus=None)
                for round_ in range(args.rounds):
                    for config in CONFIGS:
                        server = launch(group, tmp, config, mock.port, args.redis)
                        try:
                            run_wrk(
                                server.url + "/v1/chat/completions",
                                script,
                                connections=args.connections,
                                threads=2,
                                duration_s=2,
                                cpus=None,
                            )  # warm-up
                            pids = tree_pids(server.proc.pid)
                            before = cpu_seconds(pids), cpu_seconds([redis_pid])
                            result = run_wrk(
                                server.url + "/v1/chat/completions",
                                script,
                                connections=args.connections,
                                threads=2,
                                duration_s=args.duration,
                                cpus=None,
                            )
                            gandalf_cpu = cpu_seconds(pids) - before[0]
                            redis_cpu = cpu_seconds([redis_pid]) - before[1]
                        finally:
                            stop_process(server.proc)
                        results[config].append(result)
                        per = 1e6 / max(1, result.requests)
                        cpus[config].append((gandalf_cpu * per, redis_cpu * per))
                        print(
                            f"round {round_ + 1} {config:6} {result.rps:8.0f} req/s  "
                            f"p50 {result.p50_us / 1000:6.2f} ms  "
                            f"p99 {result.p99_us / 1000:6.2f} ms  errors {result.errors}  "
                            f"CPU/request: gandalf {gandalf_cpu * per:5.0f} us, "
                            f"redis-server {redis_cpu * per:4.0f} us",
                            flush=True,
                        )
        finally:
            drop_prefix(args.redis, tmp.name + ":")
    print(f"\nmedian per configuration (c{args.connections}):")
    for config in CONFIGS:
        runs = results[config]
        print(
            f"  {config:6} {statistics.median(r.rps for r in runs):8.0f} req/s  "
            f"p50 {statistics.median(r.p50_us for r in runs) / 1000:6.2f} ms  "
            f"p99 {statistics.median(r.p99_us for r in runs) / 1000:6.2f} ms  "
            f"CPU/request: gandalf {statistics.median(c[0] for c in cpus[config]):5.0f} us, "
            f"redis-server {statistics.median(c[1] for c in cpus[config]):4.0f} us"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
