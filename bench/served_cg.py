"""Served instructions: what one chat request costs the whole gateway process
(granian, Python, aiohttp, SQLite, libc; not the kernel), counted by
callgrind while the server answers exactly N requests (64 concurrent
connections by default).

``bench/ab.py`` measures CPU time, which on this shared 2-core machine moves
by 2 % between identical runs: a 2 % budget cannot be told from noise that
way. Instructions per served request at ``--connections 1`` repeat within
~0.2 % between runs (at 64 the loop's turns vary with timing: ~1 %), and they
include what in-process counts (``governance_cg.py``) miss: granian turning
each response header into Rust, the ASGI messages, the event loop.

    python bench/served_cg.py                           # governance off and key
    python bench/served_cg.py --governance off key key-tpm key-budget rates budgets on
    python bench/served_cg.py --base HEAD~1 --governance off key   # both revisions
    python bench/served_cg.py --interface rsgi
    python bench/served_cg.py --connections 1 --runs 2 --governance off price key
    python bench/served_cg.py --simulate --governance off key-tpm --upstream-headers openai

``--simulate`` turns on callgrind's cache and branch simulation (about twice
as slow) and adds, per request, the simulated first-level instruction and
data cache misses and the mispredicted conditional and indirect branches.
The simulated predictor is simpler than a real core's, but where the CPU of
two configurations differs more than their instructions do (a bytecode costs
the interpreter an indirect jump, however few instructions it runs), these
counts show it on a machine without hardware counters.

Each configuration starts its own server under ``valgrind --tool=callgrind``
(pinned to CPU 0 with two cores; the mock upstream on CPU 1),
sends ``--warmup`` requests, zeroes the counters, sends ``--requests``
requests, waits a second for the usage writer's batch and the access log's
flush, and dumps the counters (``callgrind_control``). Shipped defaults
(access log and metrics on) unless said otherwise. Each line gives the
instructions per request, their difference from the first configuration,
and where the difference is (the shared objects: ``libpython`` is Python
code and the C API calls granian makes through PyO3, ``_granian`` the
server's Rust side).

Exit status: 0, or 2 when valgrind is missing or a server did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from _procs import (
    BENCH_KEY,
    CHAT_BODY,
    GOVERNANCE,
    REPO_DIR,
    ProcGroup,
    Server,
    add_upstream_headers,
    free_port,
    install_signal_handlers,
    launch_mock,
    repo_env,
    serve_command,
    taskset,
    tree_pids,
    usable_cpus,
    wait_http_ok,
    write_gandalf_config,
)

CHAT_PATH = "/v1/chat/completions"
# A name per shared object, the rest summed as "other".
_OBJECTS = (
    ("libpython", "python"),
    ("_granian", "granian"),
    ("libsqlite3", "sqlite"),
    ("libc.so", "libc"),
    ("_multidict", "multidict"),
    ("_http_parser", "aiohttp-parser"),
    ("loop.cpython", "uvloop"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--governance",
        nargs="+",
        choices=GOVERNANCE,
        default=["off", "key"],
        help="configurations, in order; the first is the reference (default: off key); "
        "see bench/ab.py --help for what each limits",
    )
    parser.add_argument("--requests", type=int, default=3000, help="counted requests per run")
    parser.add_argument(
        "--connections",
        type=int,
        default=64,
        help="concurrent connections (1 repeats best: the loop's turns are the same each run)",
    )
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--runs", type=int, default=1, help="runs per configuration")
    parser.add_argument("--base", help="also count this git revision (in a worktree)")
    parser.add_argument("--interface", choices=("asgi", "rsgi"), default="asgi")
    parser.add_argument("--access-log", choices=("on", "off"), default="on")
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="callgrind's cache and branch simulation: misses and mispredictions per request",
    )
    add_upstream_headers(parser)
    return parser.parse_args(argv)


async def _send(port: int, count: int, connections: int = 64) -> int:
    """``count`` chat requests over ``connections`` connections; the number
    that did not get a 200."""
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}"}
    left = count
    failed = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_connection() -> None:
            nonlocal left, failed
            while left > 0:
                left -= 1
                async with session.post(url, data=CHAT_BODY, headers=headers) as resp:
                    await resp.read()
                    failed += resp.status != 200

        await asyncio.gather(*(one_connection() for _ in range(connections)))
    return failed


def _control(pids: list[int], arg: str) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", arg, str(pid)], capture_output=True, timeout=300)


def by_object(path: Path) -> Counter[str]:
    """Self instructions per shared object in one callgrind output file
    (costs of ``calls=`` lines are inclusive and skipped)."""
    names: dict[str, str] = {}
    out: Counter[str] = Counter()
    current = "?"
    after_call = False
    spec = re.compile(r"^(ob|cob)=\((\d+)\)(?: (.*))?$")
    with open(path) as fh:
        for line in fh:
            match = spec.match(line)
            if match:
                kind, number, name = match.groups()
                if name:
                    names[number] = name.strip()
                if kind == "ob":
                    current = names.get(number, "?")
                continue
            if line.startswith("calls="):
                after_call = True
                continue
            if line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    out[_object_name(current)] += int(parts[1])
    return out


def _object_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for needle, name in _OBJECTS:
        if needle in base:
            return name
    return "other"


def totals(path: Path) -> int:
    """The ``totals:`` line of a callgrind output file (its first event: instructions)."""
    return events(path)["Ir"]


def events(path: Path) -> Counter[str]:
    """Every event of the ``totals:`` line by its name in the ``events:`` line
    (Ir alone, or with ``--simulate`` the misses and mispredictions too)."""
    names: list[str] = ["Ir"]
    with open(path) as fh:
        for line in fh:
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith("totals:"):
                values = [int(v) for v in line.split()[1:]]
                return Counter(dict(zip(names, values, strict=True)))
    raise ValueError(f"{path}: no totals line")


# The simulated events worth a line, and what to call them.
_SIMULATED = (
    ("I1mr", "I1 misses"),
    ("D1mr", "D1 read misses"),
    ("D1mw", "D1 write misses"),
    ("Bcm", "conditional mispredicted"),
    ("Bim", "indirect mispredicted"),
)


def count(
    repo: Path, governance: str, args: argparse.Namespace, server_cpus: str | None
) -> tuple[float, Counter[str], dict[str, float]]:
    """Instructions per request of one run, per shared object, and the
    simulated events per request (empty without ``--simulate``)."""
    with tempfile.TemporaryDirectory(prefix="gandalf-scg-") as tmp, ProcGroup() as group:
        tmpdir = Path(tmp)
        client_cpus = "1" if server_cpus else None
        mock = launch_mock(
            group, chunks=20, cpus=client_cpus, openai_headers=args.upstream_headers == "openai"
        )
        port = free_port()
        config = write_gandalf_config(
            tmpdir, port, mock.port, "g", access_log=args.access_log == "on", governance=governance
        )
        env = repo_env(repo)
        out = tmpdir / "cg"
        out.mkdir()
        cmd = [
            *taskset(server_cpus),
            "valgrind",
            "--tool=callgrind",
            *(("--cache-sim=yes", "--branch-sim=yes") if args.simulate else ()),
            "--trace-children=yes",
            f"--callgrind-out-file={out}/cg.%p",
            *serve_command(config, 1, args.interface),
        ]
        log_path = tmpdir / "server.log"
        with open(log_path, "wb") as log:
            proc = group.add(
                subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmpdir, env=env,
                    start_new_session=True,
                )
            )  # fmt: skip
        wait_http_ok(Server("gandalf", proc, port, log_path), "/healthz", 600.0)
        failed = asyncio.run(_send(port, args.warmup, args.connections))
        time.sleep(1.0)  # the warm-up's usage batch and log flush land before zeroing
        pids = tree_pids(proc.pid)
        _control(pids, "-z")
        failed += asyncio.run(_send(port, args.requests, args.connections))
        time.sleep(1.0)  # this run's usage batch and log flush are counted
        _control(pids, "--dump=counted")
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
        if failed:
            raise RuntimeError(f"{failed} requests did not get a 200 ({governance})")
        dumps = sorted(out.glob("cg.*.1"))
        if not dumps:
            raise RuntimeError(f"no callgrind dump in {out}: see {log_path}")
        objects: Counter[str] = Counter()
        counted: Counter[str] = Counter()
        for dump in dumps:
            counted.update(events(dump))
            objects.update(by_object(dump))
        n = args.requests
        simulated = {k: counted[k] / n for k, _ in _SIMULATED if k in counted}
        return counted["Ir"] / n, Counter({k: round(v / n) for k, v in objects.items()}), simulated


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("served_cg.py needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    install_signal_handlers()
    server_cpus = "0" if usable_cpus() >= 2 else None
    revisions: list[tuple[str, Path]] = [("this checkout", REPO_DIR)]
    with tempfile.TemporaryDirectory(prefix="gandalf-scg-base-") as tmp:
        if args.base:
            base_dir = Path(tmp) / "base"
            subprocess.run(
                ["git", "-C", str(REPO_DIR), "worktree", "add", "--detach", str(base_dir),
                 args.base],
                check=True, capture_output=True,
            )  # fmt: skip
            revisions.append((args.base, base_dir))
        try:
            return _report(args, revisions, server_cpus)
        finally:
            if args.base:
                subprocess.run(
                    ["git", "-C", str(REPO_DIR), "worktree", "remove", "--force",
                     str(Path(tmp) / "base")],
                    check=False, capture_output=True,
                )  # fmt: skip


def _report(
    args: argparse.Namespace, revisions: list[tuple[str, Path]], server_cpus: str | None
) -> int:
    print(
        f"instructions per served chat request, {args.requests} requests at "
        f"c{args.connections} after "
        f"{args.warmup}, {args.interface}, access log {args.access_log}, "
        f"upstream headers {args.upstream_headers}"
    )
    for label, repo in revisions:
        reference: tuple[float, Counter[str]] | None = None
        simulated_reference: dict[str, float] | None = None
        for governance in args.governance:
            runs = [count(repo, governance, args, server_cpus) for _ in range(args.runs)]
            per_request = sum(r[0] for r in runs) / len(runs)
            objects: Counter[str] = Counter()
            simulated: dict[str, float] = {}
            for _, by, sim in runs:
                objects.update(by)
                for k, v in sim.items():
                    simulated[k] = simulated.get(k, 0.0) + v / len(runs)
            objects = Counter({k: round(v / len(runs)) for k, v in objects.items()})
            spread = max(r[0] for r in runs) / min(r[0] for r in runs) - 1
            line = f"{label}, governance {governance}: {per_request:,.0f}"
            if len(runs) > 1:
                line += f" (runs {', '.join(f'{r[0]:,.0f}' for r in runs)}; spread {spread:.2%})"
            if reference is None:
                reference = (per_request, objects)
            else:
                delta = per_request - reference[0]
                where = sorted(
                    ((objects[k] - reference[1][k], k) for k in set(objects) | set(reference[1])),
                    key=lambda item: -abs(item[0]),
                )
                parts = ", ".join(f"{name} {d:+,}" for d, name in where[:4] if abs(d) >= 100)
                line += f"; {delta:+,.0f} ({delta / reference[0]:+.2%}): {parts}"
            print(line, flush=True)
            if simulated:
                print("  simulated per request: " + _simulated_line(simulated, simulated_reference))
                if simulated_reference is None:
                    simulated_reference = simulated
    return 0


def _simulated_line(simulated: dict[str, float], reference: dict[str, float] | None) -> str:
    """The simulated events of one configuration (and their difference from
    the reference's, when there is one)."""
    parts = []
    for key, name in _SIMULATED:
        if key not in simulated:
            continue
        part = f"{name} {simulated[key]:,.0f}"
        if reference is not None and reference.get(key):
            delta = simulated[key] - reference[key]
            part += f" ({delta:+,.0f}, {delta / reference[key]:+.1%})"
        parts.append(part)
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
