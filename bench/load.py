"""Load bench: the mock alone, the thinnest passthrough (baseline) and ``gandalf serve``.

Starts the mock upstream, the baseline and Gandalf (each on granian's ASGI and RSGI
interfaces: ``baseline``, ``baseline-rsgi``, ``gandalf``, ``gandalf-rsgi``), drives each with
``wrk`` through the same scenarios (targets interleaved per scenario so drift hits all alike),
measures req/s, latency, errors, CPU per request and peak RSS, checks the speed budgets for
three pairs (gandalf vs baseline, gandalf-rsgi vs baseline, gandalf-rsgi vs baseline-rsgi),
prints a markdown table and writes ``bench/results/latest.json`` and ``latest.md``.

    python bench/load.py                 # full run, < 5 minutes
    python bench/load.py --quick         # < 1 minute
    python bench/load.py --targets mock,baseline --duration 5

Exit status: 0 when gandalf or gandalf-rsgi meets every budget it could be checked on against
the ASGI baseline (or nothing could be checked), 1 otherwise, 2 when ``wrk`` is missing or a
server failed to start. The like-for-like RSGI pair is reported but does not decide the exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
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
    cpu_seconds,
    http_request,
    install_signal_handlers,
    launch_baseline,
    launch_gandalf,
    launch_mock,
    peak_rss_mb,
    tree_pids,
    usable_cpus,
    worker_pids,
)
from _wrk import INSTALL_HINT, have_wrk, run_wrk, write_script

ALL_TARGETS = ("mock", "baseline", "baseline-rsgi", "gandalf", "gandalf-rsgi")
FULL_SCENARIOS = (("chat", 1), ("chat", 16), ("chat", 64), ("stream", 16), ("stream", 64))
QUICK_SCENARIOS = (("chat", 1), ("chat", 64), ("stream", 64))
CHAT_PATH = "/v1/chat/completions"
NOT_SUPPORTED = "n/a (not supported)"

# The budgets (see bench/README.md).
MIN_RPS_RATIO = 0.90
MAX_P99_RATIO = 1.3
MAX_P50_OVERHEAD_MS = 1.0
MAX_RSS_MB = 110.0

# Budget sets: (gandalf target, baseline target, label, decides the exit status).
BUDGET_SETS = (
    ("gandalf", "baseline", "gandalf vs baseline (ASGI vs ASGI, portable)", True),
    ("gandalf-rsgi", "baseline", "gandalf-rsgi vs baseline (RSGI vs ASGI reference)", True),
    ("gandalf-rsgi", "baseline-rsgi", "gandalf-rsgi vs baseline-rsgi (like for like, info)", False),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer scenarios, 2 s each (< 1 minute)"
    )
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per measurement (default 6, quick 2)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per run")
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="comma-separated subset of " + ",".join(ALL_TARGETS),
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="granian workers for gandalf and the baseline"
    )
    parser.add_argument("--chunks", type=int, default=20, help="mock content chunks per stream")
    parser.add_argument(
        "--access-log",
        choices=("on", "off"),
        default="on",
        help="gandalf's access log (default on: the shipped default)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / "latest",
        help="results path without suffix (writes .json and .md)",
    )
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown or not targets:
        parser.error(f"--targets: unknown {sorted(unknown)}; choose from {ALL_TARGETS}")
    args.target_list = [t for t in ALL_TARGETS if t in targets]
    if args.duration is None:
        args.duration = 2 if args.quick else 6
    return args


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info(workers: int, pinning: dict[str, str | None]) -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "none"
    try:
        wrk_version = subprocess.run(
            ["wrk", "-v"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        wrk_version = "unknown"
    versions: dict[str, str] = {}
    for name in ("granian", "aiohttp", "uvloop", "orjson", "msgspec"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "missing"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "git_commit": commit,
        "wrk": wrk_version,
        "versions": versions,
        "gandalf_workers": workers,
        "pinning": pinning,
    }


def probe(server: Server, body: bytes) -> tuple[int, str, bytes]:
    status, data, ctype = http_request(server.port, "POST", CHAT_PATH, body, chat_headers())
    return status, ctype, data


def measure(
    server: Server,
    mock: Server,
    script: Path,
    *,
    mode: str,
    connections: int,
    duration: int,
    warmup: int,
    cpus: str | None,
    chunks: int,
) -> dict[str, Any]:
    threads = 1 if connections == 1 else 2
    url = server.url + CHAT_PATH
    if warmup > 0:
        run_wrk(url, script, connections=connections, threads=threads, duration_s=warmup, cpus=cpus)
    pids = tree_pids(server.proc.pid)
    mock_pids = tree_pids(mock.proc.pid)
    cpu0, mock0 = cpu_seconds(pids), cpu_seconds(mock_pids)
    res = run_wrk(
        url, script, connections=connections, threads=threads, duration_s=duration, cpus=cpus
    )
    cpu_s, mock_s = cpu_seconds(pids) - cpu0, cpu_seconds(mock_pids) - mock0
    reqs = max(res.requests, 1)
    return {
        "target": server.name,
        "mode": mode,
        "connections": connections,
        "threads": threads,
        "status": "ok",
        "duration_s": round(res.duration_s, 3),
        "requests": res.requests,
        "rps": round(res.rps, 1),
        "p50_ms": round(res.p50_us / 1000, 3),
        "p90_ms": round(res.p90_us / 1000, 3),
        "p99_ms": round(res.p99_us / 1000, 3),
        "max_ms": round(res.max_us / 1000, 3),
        "errors": res.errors,
        "status_errors": res.status_errors,
        "socket_errors": res.socket_errors,
        "cpu_ms_per_req": round(cpu_s * 1000 / reqs, 4),
        "cpu_pct": round(100 * cpu_s / res.duration_s, 1) if res.duration_s else 0.0,
        "mock_cpu_pct": round(100 * mock_s / res.duration_s, 1) if res.duration_s else 0.0,
        "peak_rss_mb": round(peak_rss_mb(worker_pids(server.proc.pid)), 1),
        "bytes_per_resp": round(res.bytes / reqs, 1),
        "chunks_per_s": round(res.rps * chunks, 1) if mode == "stream" else None,
    }


def _find(rows: list[dict[str, Any]], target: str, mode: str, conns: int) -> dict[str, Any] | None:
    for row in rows:
        if (row["target"], row["mode"], row["connections"], row["status"]) == (
            target,
            mode,
            conns,
            "ok",
        ):
            return row
    return None


def _key(target: str) -> str:
    return target.replace("-", "_")


def _check(pair: str, name: str, value: float | None, op: str, limit: float) -> dict[str, Any]:
    """One budget row: ``value op limit`` (op ``>=`` or ``<=``); SKIP when value is missing."""
    if value is None:
        verdict = "SKIP"
    else:
        ok = value >= limit if op == ">=" else value <= limit
        verdict = "PASS" if ok else "FAIL"
    return {
        "set": pair,
        "budget": name,
        "value": value,
        "limit": f"{op} {limit:g}",
        "verdict": verdict,
    }


def evaluate(
    rows: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Ratios, budget rows and one verdict per budget set (see BUDGET_SETS).

    A budget whose inputs are missing is SKIP; a set is FAIL with any FAIL, PASS with at
    least one PASS and no FAIL, SKIP when nothing could be checked.
    """
    ratios: dict[str, Any] = {}
    m1 = _find(rows, "mock", "chat", 1)
    for target in ALL_TARGETS[1:]:
        t1 = _find(rows, target, "chat", 1)
        ratios[f"chat_c1_p50_{_key(target)}_minus_mock_ms"] = (
            round(t1["p50_ms"] - m1["p50_ms"], 3) if t1 and m1 else None
        )
    budgets: list[dict[str, Any]] = []
    sets: list[dict[str, Any]] = []
    for gname, bname, label, gates in BUDGET_SETS:
        checks: list[dict[str, Any]] = []
        pair = f"{gname}/{bname}"
        for mode in ("chat", "stream"):
            g, b = _find(rows, gname, mode, 64), _find(rows, bname, mode, 64)
            rps = round(g["rps"] / b["rps"], 3) if g and b and b["rps"] else None
            p99 = round(g["p99_ms"] / b["p99_ms"], 3) if g and b and b["p99_ms"] else None
            ratios[f"{mode}_c64_rps_{_key(gname)}_over_{_key(bname)}"] = rps
            ratios[f"{mode}_c64_p99_{_key(gname)}_over_{_key(bname)}"] = p99
            checks.append(
                _check(label, f"{mode} 64 clients: {pair} req/s", rps, ">=", MIN_RPS_RATIO)
            )
            if mode == "chat":
                checks.append(
                    _check(label, f"chat 64 clients: {pair} p99", p99, "<=", MAX_P99_RATIO)
                )
        if gates:  # the baseline-independent budgets, once per gandalf interface
            overhead = ratios[f"chat_c1_p50_{_key(gname)}_minus_mock_ms"]
            name = f"chat 1 client: {gname} p50 - mock p50 (ms)"
            checks.append(_check(label, name, overhead, "<=", MAX_P50_OVERHEAD_MS))
            rss = [r["peak_rss_mb"] for r in rows if r["target"] == gname and r["status"] == "ok"]
            name = f"{gname} peak RSS per worker (MB)"
            checks.append(_check(label, name, max(rss) if rss else None, "<=", MAX_RSS_MB))
        counts = {v: sum(c["verdict"] == v for c in checks) for v in ("PASS", "FAIL", "SKIP")}
        verdict = "FAIL" if counts["FAIL"] else ("PASS" if counts["PASS"] else "SKIP")
        sets.append(
            {
                "set": label,
                "gandalf": gname,
                "baseline": bname,
                "gates_exit": gates,
                "verdict": verdict,
                "counts": counts,
            }
        )
        budgets.extend(checks)
    return ratios, budgets, sets


def overall(sets: list[dict[str, Any]]) -> tuple[int, str]:
    """Exit status and a one-line explanation: 0 when a gating set passed or none was checked."""
    gating = [x for x in sets if x["gates_exit"]]
    passed = [x["gandalf"] for x in gating if x["verdict"] == "PASS"]
    if passed:
        verb = "meets" if len(passed) == 1 else "meet"
        return (
            0,
            f"PASS: {' and '.join(passed)} {verb} every budget checked against the ASGI baseline",
        )
    if all(x["verdict"] == "SKIP" for x in gating):
        return 0, "SKIP: no budget could be checked (gandalf, gandalf-rsgi or baseline not run)"
    return 1, "FAIL: neither gandalf nor gandalf-rsgi meets every budget against the ASGI baseline"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def results_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | target | req/s | p50 ms | p99 ms | errors | CPU ms/req | CPU % "
        "| mock CPU % | peak RSS MB | chunks/s |"
    )
    out = [head, "|---" * 11 + "|"]
    for r in rows:
        scen = f"{r['mode']} c={r['connections']}"
        if r["status"] != "ok":
            out.append(f"| {scen} | {r['target']} | {r['status']} |" + " |" * 8)
            continue
        out.append(
            f"| {scen} | {r['target']} | {_fmt(r['rps'], 0)} | {_fmt(r['p50_ms'])} | "
            f"{_fmt(r['p99_ms'])} | {_fmt(r['errors'])} | {_fmt(r['cpu_ms_per_req'], 3)} | "
            f"{_fmt(r['cpu_pct'], 0)} | {_fmt(r['mock_cpu_pct'], 0)} | "
            f"{_fmt(r['peak_rss_mb'], 1)} | {_fmt(r['chunks_per_s'], 0)} |"
        )
    return "\n".join(out)


def budgets_table(budgets: list[dict[str, Any]], sets: list[dict[str, Any]], summary: str) -> str:
    out = ["| pair | budget | value | limit | verdict |", "|---|---|---|---|---|"]
    for b in budgets:
        out.append(
            f"| {b['set']} | {b['budget']} | {_fmt(b['value'], 3)} | {b['limit']} "
            f"| {b['verdict']} |"
        )
    out.append("")
    for x in sets:
        role = "decides the exit status" if x["gates_exit"] else "information only"
        n = x["counts"]
        out.append(
            f"- {x['set']}: **{x['verdict']}** ({n['PASS']} passed, {n['FAIL']} failed, "
            f"{n['SKIP']} skipped; {role})"
        )
    out.append(f"- overall (exit 0 if either gandalf interface passes): **{summary}**")
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    return "\n".join(
        [
            f"# Gandalf load bench ({report['mode']})",
            "",
            f"- date: {m['date']}",
            f"- machine: {m['nproc']} CPUs ({m['usable_cpus']} usable), {m['cpu_model']}",
            f"- python {m['python']}, git commit {m['git_commit']}, {m['wrk']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
            f"- gandalf workers: {m['gandalf_workers']}; pinning: {m['pinning']}",
            f"- gandalf config: {report['gandalf_config']}",
            f"- {report['duration_s']} s per measurement after {report['warmup_s']} s warm-up; "
            f"targets: {', '.join(report['targets'])}",
            "",
            results_table(report["results"]),
            "",
            budgets_table(report["budgets"], report["budget_sets"], report["overall"]),
            "",
        ]
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    two_cores = usable_cpus() >= 2
    server_cpus = "0" if two_cores and args.workers == 1 else None
    client_cpus = "1" if two_cores else None
    pinning = {"server_under_test": server_cpus, "wrk_and_mock": client_cpus}
    scenarios = QUICK_SCENARIOS if args.quick else FULL_SCENARIOS
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gandalf-bench-") as tmp, ProcGroup() as group:
        tmpdir = Path(tmp)
        mock = launch_mock(group, chunks=args.chunks, cpus=client_cpus)
        servers: dict[str, Server] = {"mock": mock}
        for name in args.target_list:
            interface = "rsgi" if name.endswith("-rsgi") else "asgi"
            if name.startswith("baseline"):
                servers[name] = launch_baseline(
                    group,
                    mock.url,
                    tmpdir,
                    workers=args.workers,
                    cpus=server_cpus,
                    interface=interface,
                )
            elif name.startswith("gandalf"):
                servers[name] = launch_gandalf(
                    group,
                    tmpdir,
                    mock.port,
                    workers=args.workers,
                    cpus=server_cpus,
                    interface=interface,
                    access_log=args.access_log == "on",
                )
        streaming: dict[str, bool] = {}
        for name in args.target_list:
            server = servers[name]
            status, ctype, data = probe(server, CHAT_BODY)
            if status != 200:
                raise RuntimeError(
                    f"{name}: probe request answered {status}: {data[:500]!r}\n{server.log_tail()}"
                )
            status, ctype, data = probe(server, STREAM_BODY)
            streaming[name] = status == 200 and ctype.startswith("text/event-stream")
            if not streaming[name] and status != 400:
                raise RuntimeError(
                    f"{name}: streaming probe answered {status} {ctype}: {data[:500]!r}"
                )
        scripts = {
            "chat": write_script(tmpdir / "chat.lua", CHAT_BODY, chat_headers()),
            "stream": write_script(tmpdir / "stream.lua", STREAM_BODY, chat_headers()),
        }
        for mode, conns in scenarios:
            for name in args.target_list:
                if mode == "stream" and not streaming[name]:
                    rows.append(
                        {
                            "target": name,
                            "mode": mode,
                            "connections": conns,
                            "status": NOT_SUPPORTED,
                        }
                    )
                    print(f"  {mode:6} c={conns:<3} {name:13} {NOT_SUPPORTED}", flush=True)
                    continue
                row = measure(
                    servers[name],
                    mock,
                    scripts[mode],
                    mode=mode,
                    connections=conns,
                    duration=args.duration,
                    warmup=args.warmup,
                    cpus=client_cpus,
                    chunks=args.chunks,
                )
                rows.append(row)
                print(
                    f"  {mode:6} c={conns:<3} {name:13} {row['rps']:>9,.0f} req/s  "
                    f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                    f"errors {row['errors']}  cpu {row['cpu_ms_per_req']:.3f} ms/req",
                    flush=True,
                )
    ratios, budgets, sets = evaluate(rows)
    exit_code, summary = overall(sets)
    return {
        "mode": "quick" if args.quick else "full",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "targets": args.target_list,
        "chunks_per_stream": args.chunks,
        "gandalf_config": "shipped defaults (access log on)"
        if args.access_log == "on"
        else "access_log: false",
        "machine": machine_info(args.workers, pinning),
        "results": rows,
        "ratios": ratios,
        "budgets": budgets,
        "budget_sets": sets,
        "overall": summary,
        "exit_code": exit_code,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not have_wrk():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    install_signal_handlers()
    started = time.monotonic()
    print(
        f"load bench ({'quick' if args.quick else 'full'}): targets "
        f"{', '.join(args.target_list)}, {args.duration} s per run",
        flush=True,
    )
    try:
        report = run(args)
    except RuntimeError as exc:
        print(f"load bench failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    markdown = render_markdown(report)
    print()
    print(markdown)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(
        f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {report['elapsed_s']} s"
    )
    code: int = report["exit_code"]
    return code


if __name__ == "__main__":
    sys.exit(main())
