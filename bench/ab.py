"""A/B load: this checkout of Gandalf against another revision, interleaved.

Answers "did this change cost anything measurable?" the only way a shared
2-core machine allows: both versions run in the same session, round after
round (A, B, A, B, ...), against the same mock, with the same wrk scenario, one
worker pinned to its own core; the verdict compares medians, and the spread
between rounds of one version is the noise to compare against.

    python bench/ab.py --base 1a2b3c4               # chat at 64 connections, 4 rounds
    python bench/ab.py --base HEAD~3 --mode stream --rounds 6
    python bench/ab.py --base HEAD~3 --access-log off  # with the access log off
    python bench/ab.py --base HEAD --access-log on --base-access-log off   # its cost
    python bench/ab.py --base HEAD --dsn postgresql://127.0.0.1/bench  # PostgreSQL vs SQLite

``--together`` serves A and B at the same time instead, both pinned to the
same core and each loaded by its own wrk at ``--connections``: whatever else
the machine does then slows both alike, so their CPU per request, compared
within each round, moves far less than between back-to-back runs (their
req/s only say how they shared the core). Use it for differences of a few
percent, such as a feature's budget:

    python bench/ab.py --base HEAD --together --governance key-tpm --base-governance off

The other revision is checked out with ``git worktree`` into a temporary
directory (removed afterwards); both import their own ``gandalf`` package.
Exit status: 0, or 2 when wrk is missing or a server did not start.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _procs import (
    CHAT_BODY,
    GOVERNANCE,
    REPO_DIR,
    STREAM_BODY,
    ProcGroup,
    Server,
    add_upstream_headers,
    chat_headers,
    cpu_seconds,
    install_signal_handlers,
    launch_gandalf,
    launch_mock,
    stop_process,
    thread_delta,
    thread_times,
    tree_pids,
    usable_cpus,
)
from _wrk import INSTALL_HINT, WrkResult, have_wrk, run_wrk, write_script

CHAT_PATH = "/v1/chat/completions"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", required=True, help="git revision to compare against (B)")
    parser.add_argument("--mode", choices=("chat", "stream"), default="chat")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=6, help="seconds per measurement")
    parser.add_argument("--interface", choices=("asgi", "rsgi"), default="asgi")
    parser.add_argument(
        "--access-log",
        choices=("on", "off"),
        default="on",
        help="this checkout's access log (default on: the shipped default)",
    )
    parser.add_argument(
        "--base-access-log",
        choices=("on", "off"),
        help="the base's access log (default: as --access-log); --base HEAD "
        "--access-log on --base-access-log off measures what the log costs",
    )
    parser.add_argument(
        "--governance",
        choices=GOVERNANCE,
        default="off",
        help="on: this checkout's bench key limited and budgeted at key, team and org level, "
        "with a priced model (every request admitted, priced and settled three times); "
        "rates: the three levels' rpm and tpm only; budgets: their budgets and the price "
        "only; key: the key's own rpm only; key-tpm: its tpm only; key-budget: its budget "
        "and the price only; price: the model priced, nothing limited",
    )
    parser.add_argument(
        "--base-governance",
        choices=GOVERNANCE,
        help="the base's (default: as --governance; on needs a base that knows orgs:); "
        "--base HEAD --governance on --base-governance off measures what limits cost",
    )
    parser.add_argument(
        "--metrics",
        choices=("on", "off"),
        default="on",
        help="this checkout's server.metrics (default on: the shipped default)",
    )
    parser.add_argument(
        "--base-metrics",
        choices=("on", "off"),
        help="the base's (default: as --metrics; off needs a base that knows server.metrics); "
        "--base HEAD --metrics on --base-metrics off measures what metrics cost",
    )
    parser.add_argument(
        "--dsn",
        help="this checkout's database.dsn (default: an SQLite file of its own), e.g. "
        "postgresql://host/db; the base keeps SQLite unless --base-dsn says otherwise",
    )
    parser.add_argument("--base-dsn", help="the base's database.dsn (default: SQLite)")
    parser.add_argument(
        "--together",
        action="store_true",
        help="serve A and B at the same time on one core, each under its own wrk "
        "(compares CPU per request with the machine's drift shared; see above)",
    )
    add_upstream_headers(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not have_wrk():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    install_signal_handlers()
    two_cores = usable_cpus() >= 2
    server_cpus = "0" if two_cores else None
    client_cpus = "1" if two_cores else None
    with tempfile.TemporaryDirectory(prefix="gandalf-ab-") as tmp:
        tmpdir = Path(tmp)
        base_dir = tmpdir / "base"
        subprocess.run(
            ["git", "-C", str(REPO_DIR), "worktree", "add", "--detach", str(base_dir), args.base],
            check=True,
            capture_output=True,
        )
        try:
            return compare(args, tmpdir, base_dir, server_cpus, client_cpus)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO_DIR), "worktree", "remove", "--force", str(base_dir)],
                check=False,
                capture_output=True,
            )


def compare(
    args: argparse.Namespace,
    tmpdir: Path,
    base_dir: Path,
    server_cpus: str | None,
    client_cpus: str | None,
) -> int:
    body = STREAM_BODY if args.mode == "stream" else CHAT_BODY
    script = write_script(tmpdir / "ab.lua", body, chat_headers())
    threads = 1 if args.connections == 1 else 2
    base_log = args.base_access_log or args.access_log
    base_gov = args.base_governance or args.governance
    base_metrics = args.base_metrics or args.metrics
    db_a = "PostgreSQL" if args.dsn else "SQLite"
    db_b = "PostgreSQL" if args.base_dsn else "SQLite"
    results: dict[str, list[float]] = {
        f"A (this checkout, log {args.access_log}, limits {args.governance}, "
        f"metrics {args.metrics}, {db_a})": [],
        f"B ({args.base}, log {base_log}, limits {base_gov}, metrics {base_metrics}, {db_b})": [],
    }
    # CPU per request from the scheduler's nanoseconds (the 10 ms ticks of
    # utime/stime quantise a 4 s round to ~0.3 %), and the context switches
    # per request: the server's threads share one core, and a switch costs
    # CPU (and cache) that no instruction count shows.
    cpu_ms: dict[str, list[float]] = {label: [] for label in results}
    switch_counts: dict[str, list[float]] = {label: [] for label in results}

    def record(
        label: str,
        round_no: int,
        rps: float,
        per_request: float,
        switches: float,
        ticked: float | None,
    ) -> None:
        results[label].append(rps)
        cpu_ms[label].append(per_request)
        switch_counts[label].append(switches)
        ticks = "" if ticked is None else f" ({ticked:.3f} in ticks)"
        print(
            f"round {round_no + 1} {label}: {rps:,.0f} req/s, "
            f"{per_request:.4f} CPU ms/req{ticks}, {switches:.2f} context switches/req",
            flush=True,
        )

    with ProcGroup() as group:
        mock = launch_mock(
            group, chunks=20, cpus=client_cpus, openai_headers=args.upstream_headers == "openai"
        )
        versions = ((next(iter(results)), REPO_DIR), (list(results)[1], base_dir))

        def launch(round_no: int, repo: Path) -> Server:
            return launch_gandalf(
                group,
                tmpdir,
                mock.port,
                workers=1,
                cpus=server_cpus,
                interface=args.interface,
                repo=repo,
                name=f"ab-{round_no}-{'a' if repo == REPO_DIR else 'b'}",
                access_log=(args.access_log if repo == REPO_DIR else base_log) == "on",
                governance=args.governance if repo == REPO_DIR else base_gov,
                metrics=(args.metrics if repo == REPO_DIR else base_metrics) == "on",
                dsn=args.dsn if repo == REPO_DIR else args.base_dsn,
            )

        def load(server: Server, duration_s: int) -> WrkResult:
            return run_wrk(
                server.url + CHAT_PATH,
                script,
                connections=args.connections,
                threads=threads,
                duration_s=duration_s,
                cpus=client_cpus,
            )

        for round_no in range(args.rounds):
            order = versions if round_no % 2 == 0 else versions[::-1]
            if args.together:
                servers = [(label, launch(round_no, repo)) for label, repo in order]
                for _, server in servers:
                    load(server, 1)
                trees = [tree_pids(server.proc.pid) for _, server in servers]
                before = [thread_times(p) for p in trees]
                with ThreadPoolExecutor(len(servers)) as pool:
                    loads = [pool.submit(load, server, args.duration) for _, server in servers]
                    done = [f.result() for f in loads]
                after = [thread_times(p) for p in trees]
                for (label, server), res, (t0, s0), (t1, s1) in zip(
                    servers, done, before, after, strict=True
                ):
                    stop_process(server.proc)
                    served = max(res.requests, 1)
                    record(label, round_no, res.rps, thread_delta(t0, t1) * 1000 / served,
                           (s1 - s0) / served, None)  # fmt: skip
                continue
            for label, repo in order:
                server = launch(round_no, repo)
                load(server, 1)
                pids = tree_pids(server.proc.pid)
                cpu0 = cpu_seconds(pids)
                times0, switches0 = thread_times(pids)
                res = load(server, args.duration)
                ticks = cpu_seconds(pids) - cpu0
                times1, switches1 = thread_times(pids)
                served = max(res.requests, 1)
                stop_process(server.proc)
                record(label, round_no, res.rps, thread_delta(times0, times1) * 1000 / served,
                       (switches1 - switches0) / served, ticks * 1000 / served)  # fmt: skip
    a, b = (statistics.median(v) for v in results.values())
    print()
    print(
        f"| {args.mode} c={args.connections} {args.interface}, upstream headers "
        f"{args.upstream_headers}{', together' if args.together else ''} | median req/s "
        "| median CPU ms/req | context switches/req | rounds (req/s) |"
    )
    print("|---|---|---|---|---|")
    for label, values in results.items():
        rounds = ", ".join(f"{v:,.0f}" for v in values)
        cpu = statistics.median(cpu_ms[label])
        switched = statistics.median(switch_counts[label])
        print(
            f"| {label} | {statistics.median(values):,.0f} | {cpu:.4f} | {switched:.2f} "
            f"| {rounds} |"
        )
    cpu_a, cpu_b = (statistics.median(v) for v in cpu_ms.values())
    spread = (
        max((max(v) - min(v)) / statistics.median(v) for v in results.values() if len(v) > 1)
        if args.rounds > 1
        else 0.0
    )
    print(
        f"\nA/B = {a / b:.3f} (req/s), {cpu_a / cpu_b:.3f} (CPU per request); "
        f"spread between rounds of one version up to {spread:.1%}"
    )
    # Each round measures A and B back to back: their ratio within a round
    # drops the drift between rounds (the machine's load, its clock), so
    # the median of the rounds' ratios and their middle half are the
    # tighter statement of a small difference.
    paired = sorted(x / y for x, y in zip(*cpu_ms.values(), strict=True))
    if len(paired) > 1:
        low, high = paired[(len(paired) - 1) // 4], paired[len(paired) * 3 // 4]
        print(
            f"CPU per request A/B within each round: median {statistics.median(paired):.3f}, "
            f"middle half {low:.3f}..{high:.3f} ({len(paired)} rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
