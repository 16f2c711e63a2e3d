"""Soak: many requests through ``gandalf serve``, watching the workers' memory for leaks.

Drives ``--requests`` (default 500,000) non-streaming chat completions through Gandalf (with
the mock upstream behind it) using ``wrk`` in segments: each segment's length is computed from
the rate measured so far to land near the next sampling point, and its request count is read
from wrk's output. After each ``--sample-every`` requests (default 50,000) the resident set
(VmRSS) of every worker process is sampled. The verdict compares the first sample taken after
``--warmup-requests`` (default 100,000) with the last one: growth must stay within
``--max-growth-mb`` (default 5 MB). Writes ``bench/results/soak.json``.

wrk rather than a Python client: on the shared 2-core box an aiohttp client tops out below
what one granian worker serves (measured 6.6k vs 9.1k req/s through the baseline), so it
would measure itself.

    python bench/soak.py
    python bench/soak.py --requests 200000 --sample-every 20000
    python bench/soak.py --target baseline      # the same soak against the baseline
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _procs import (
    CHAT_BODY,
    RESULTS_DIR,
    STREAM_BODY,
    ProcGroup,
    Server,
    chat_headers,
    http_request,
    install_signal_handlers,
    launch_baseline,
    launch_gandalf,
    launch_mock,
    peak_rss_mb,
    rss_mb,
    usable_cpus,
    worker_pids,
)
from _wrk import INSTALL_HINT, have_wrk, run_wrk, write_script


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=500_000)
    parser.add_argument("--sample-every", type=int, default=50_000)
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=100_000,
        help="growth is measured from the first sample at or after this",
    )
    parser.add_argument("--max-growth-mb", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="abort (and fail) when the soak runs longer than this",
    )
    parser.add_argument("--target", choices=("gandalf", "baseline"), default="gandalf")
    parser.add_argument(
        "--stream", action="store_true", help="streaming requests (20-chunk SSE answers)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json")
    return parser.parse_args(argv)


def _sample(server: Server, total: int, started: float) -> dict[str, Any]:
    pids = worker_pids(server.proc.pid)
    per_worker = rss_mb(pids)
    return {
        "requests": total,
        "elapsed_s": round(time.monotonic() - started, 1),
        "rss_mb": [round(x, 2) for x in per_worker],
        "max_rss_mb": round(max(per_worker, default=0.0), 2),
        "peak_rss_mb": round(peak_rss_mb(pids), 2),
    }


def soak(args: argparse.Namespace) -> dict[str, Any]:
    two_cores = usable_cpus() >= 2
    server_cpus = "0" if two_cores and args.workers == 1 else None
    client_cpus = "1" if two_cores else None
    samples: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    aborted = ""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gandalf-soak-") as tmp, ProcGroup() as group:
        tmpdir = Path(tmp)
        mock = launch_mock(group, chunks=20, cpus=client_cpus)
        if args.target == "gandalf":
            server = launch_gandalf(
                group, tmpdir, mock.port, workers=args.workers, cpus=server_cpus
            )
        else:
            server = launch_baseline(
                group, mock.url, tmpdir, workers=args.workers, cpus=server_cpus
            )
        body = STREAM_BODY if args.stream else CHAT_BODY
        status, data, _ = http_request(
            server.port, "POST", "/v1/chat/completions", body, chat_headers()
        )
        if status != 200:
            raise RuntimeError(
                f"{server.name}: probe answered {status}: {data[:500]!r}\n{server.log_tail()}"
            )
        script = write_script(tmpdir / "chat.lua", body, chat_headers())
        url = server.url + "/v1/chat/completions"
        total, errors, rate, wall = 0, 0, 0.0, 0.0
        samples.append(_sample(server, total, started))
        next_sample = args.sample_every
        while total < args.requests:
            if time.monotonic() - started > args.max_seconds:
                aborted = (
                    f"aborted after {time.monotonic() - started:.0f} s "
                    f"(--max-seconds {args.max_seconds:.0f}) at {total:,} requests"
                )
                break
            goal = min(next_sample, args.requests)
            # The first segment measures the rate; later ones aim at the next sample point.
            duration = 2 if rate == 0 else max(1, math.floor((goal - total) / rate + 0.5))
            res = run_wrk(
                url,
                script,
                connections=args.connections,
                threads=2,
                duration_s=duration,
                cpus=client_cpus,
            )
            total += res.requests
            errors += res.errors
            wall += res.duration_s
            rate = total / wall if wall else rate
            segments.append(
                {
                    "duration_s": round(res.duration_s, 3),
                    "requests": res.requests,
                    "rps": round(res.rps, 1),
                    "errors": res.errors,
                    "p99_ms": round(res.p99_us / 1000, 3),
                }
            )
            if total >= next_sample or total >= args.requests:
                sample = _sample(server, total, started)
                samples.append(sample)
                print(
                    f"  {total:>9,} requests  {res.rps:>8,.0f} req/s  RSS "
                    f"{sample['max_rss_mb']:.1f} MB  errors {errors}",
                    flush=True,
                )
                while next_sample <= total:
                    next_sample += args.sample_every
    warm = [s for s in samples if s["requests"] >= args.warmup_requests]
    growth = None
    if len(warm) >= 2:
        first, last = warm[0], warm[-1]
        growth = round(max(b - a for a, b in zip(first["rss_mb"], last["rss_mb"], strict=False)), 2)
    verdict = "SKIP" if growth is None else ("PASS" if growth <= args.max_growth_mb else "FAIL")
    if aborted or errors:
        verdict = "FAIL"  # an aborted or erroring soak proves nothing about memory
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "target": args.target,
        "stream": args.stream,
        "workers": args.workers,
        "connections": args.connections,
        "requests": total,
        "errors": errors,
        "elapsed_s": round(time.monotonic() - started, 1),
        "aborted": aborted or None,
        "warmup_requests": args.warmup_requests,
        "samples": samples,
        "segments": segments,
        "growth_after_warmup_mb": growth,
        "max_growth_mb": args.max_growth_mb,
        "verdict": verdict,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not have_wrk():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    install_signal_handlers()
    print(
        f"soak: {args.requests:,} requests through {args.target}, RSS every {args.sample_every:,}",
        flush=True,
    )
    try:
        report = soak(args)
    except RuntimeError as exc:
        print(f"soak failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| requests | RSS MB per worker |\n|---|---|")
    for s in report["samples"]:
        print(f"| {s['requests']:,} | {', '.join(f'{x:.1f}' for x in s['rss_mb'])} |")
    if report["aborted"]:
        print(f"\n{report['aborted']}")
    growth = report["growth_after_warmup_mb"]
    print(
        f"\ngrowth after {args.warmup_requests:,} requests: "
        f"{'-' if growth is None else f'{growth:.2f} MB'} (budget <= {args.max_growth_mb} MB)"
        f"  {report['verdict']};  {report['errors']} errors, {report['elapsed_s']} s"
    )
    print(f"wrote {out}")
    return 0 if report["verdict"] in ("PASS", "SKIP") else 1


if __name__ == "__main__":
    sys.exit(main())
