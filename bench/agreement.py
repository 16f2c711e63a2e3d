"""Do ``gandalf bench``'s built-in client and wrk agree? Both, through ``gandalf bench
--engine builtin|wrk``, against the same targets at the same concurrency, interleaved:

- ``mock``: the bench mock alone (far faster than any Python client: the built-in
  client must say it is client-bound, and does);
- ``mock+20ms``: the mock answering after 20 ms (a target slower than the client:
  the numbers must agree);
- ``gandalf``: ``gandalf serve`` (one worker, pinned to CPU 0 when there are two)
  in front of the mock: the gateway's own limit;
- ``gandalf→mock+20ms``: the same in front of the 20 ms mock.

Each pair is measured ``--rounds`` times, interleaved, and the round with the median
req/s kept. Prints a Markdown table (req/s and latency of both, the difference,
whether the built-in client flagged itself) and writes ``<out>.json``. Needs wrk.

    python bench/agreement.py [--duration 5] [--rounds 3] [--concurrency 16,64] [--out F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _procs import (
    BENCH_KEY,
    MODEL_ALIAS,
    REPO_DIR,
    ProcGroup,
    Server,
    install_signal_handlers,
    launch_gandalf,
    taskset,
    usable_cpus,
    wait_port,
)
from _wrk import INSTALL_HINT, have_wrk
from mock_upstream import start_mock

SLOW_MS = 20.0  # the slow mock's delay: a target slower than any client


def bench(url: str, engine: str, conns: str, duration: int, out: Path, cpus: str | None) -> Any:
    cmd = [
        *taskset(cpus),
        sys.executable,
        "-m",
        "gandalf",
        "bench",
        url,
        "--model",
        MODEL_ALIAS,
        "--key",
        BENCH_KEY,
        "--concurrency",
        conns,
        "--duration",
        f"{duration}s",
        "--warmup",
        "1s",
        "--engine",
        engine,
        "--json",
        str(out),
    ]
    subprocess.run(cmd, cwd=REPO_DIR, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median req/s of the rounds."""
    return sorted(runs, key=lambda r: float(r["rps"]))[len(runs) // 2]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--rounds", type=int, default=3, help="median of this many rounds")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "agreement"))
    args = parser.parse_args(argv)
    if not have_wrk():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    install_signal_handlers()
    two = usable_cpus() >= 2
    client_cpus = "1" if two else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="agreement-") as tmp, ProcGroup() as group:
        tmpdir = Path(tmp)
        mock_proc, mock_port = start_mock(0, cpus=client_cpus)
        group.add(mock_proc)
        slow_proc, slow_port = start_mock(0, latency_ms=SLOW_MS, cpus=client_cpus)
        group.add(slow_proc)
        for proc, port in ((mock_proc, mock_port), (slow_proc, slow_port)):
            wait_port(Server("mock", proc, port), 10.0)
        gw_cpus = "0" if two else None
        gw = launch_gandalf(group, tmpdir, mock_port, workers=1, cpus=gw_cpus, access_log=False)
        gw_slow = launch_gandalf(
            group, tmpdir, slow_port, workers=1, cpus=gw_cpus, access_log=False, name="slow"
        )
        targets = {
            "mock": f"http://127.0.0.1:{mock_port}/v1",
            f"mock+{SLOW_MS:g}ms": f"http://127.0.0.1:{slow_port}/v1",
            "gandalf": f"{gw.url}/v1",
            f"gandalf→mock+{SLOW_MS:g}ms": f"{gw_slow.url}/v1",
        }
        got: dict[tuple[str, str], list[Any]] = {}
        for _ in range(args.rounds):  # interleaved: drift on a shared machine hits both
            for name, url in targets.items():
                for engine in ("wrk", "builtin"):
                    out = tmpdir / f"{name}-{engine}.json"
                    result = bench(url, engine, args.concurrency, args.duration, out, client_cpus)
                    got.setdefault((name, engine), []).append(result)
        for name in targets:
            wrk_runs = [r["runs"] for r in got[(name, "wrk")]]
            builtin_runs = [r["runs"] for r in got[(name, "builtin")]]
            for i, level in enumerate(wrk_runs[0]):
                w = _median_run([runs[i] for runs in wrk_runs])
                b = _median_run([runs[i] for runs in builtin_runs])
                rows.append(
                    {
                        "target": name,
                        "concurrency": level["concurrency"],
                        "wrk_rps": w["rps"],
                        "builtin_rps": b["rps"],
                        "diff_pct": round((b["rps"] - w["rps"]) / w["rps"] * 100.0, 1),
                        "wrk_p50": w["latency_ms"]["p50"],
                        "builtin_p50": b["latency_ms"]["p50"],
                        "wrk_p99": w["latency_ms"]["p99"],
                        "builtin_p99": b["latency_ms"]["p99"],
                        "client_ceiling": b["client_ceiling_rps"],
                        "client_cpu": b["client_cpu"],
                        "client_bound": b["client_bound"],
                    }
                )
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
    print(
        "| target | c | wrk req/s | builtin req/s | diff | wrk p50 / p99 ms | "
        "builtin p50 / p99 ms | builtin ceiling req/s | client CPU | flagged client-bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['target']} | {r['concurrency']} | {r['wrk_rps']:,.0f} | "
            f"{r['builtin_rps']:,.0f} | {r['diff_pct']:+.1f} % | "
            f"{r['wrk_p50']:.2f} / {r['wrk_p99']:.2f} | "
            f"{r['builtin_p50']:.2f} / {r['builtin_p99']:.2f} | "
            f"{r['client_ceiling'] or 0:,.0f} | {r['client_cpu']:.0%} | "
            f"{'yes' if r['client_bound'] else 'no'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
