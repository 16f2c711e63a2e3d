"""Process and measurement helpers shared by ``load.py`` and ``soak.py``.

Every server is started in its own session (process group), so stopping it takes its
granian worker children along. :class:`ProcGroup` remembers what was started and stops all
of it on exit, including on Ctrl-C. CPU and memory come from ``/proc``: utime+stime of a
process and all its descendants (granian workers are child processes), and VmHWM/VmRSS.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from mock_upstream import read_listen_line, start_mock

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# A fixed bench-only key (gnd_ + base64url of 32 random bytes); it guards nothing real.
BENCH_KEY = "gnd_IY49Wh5N3sQuzxfZ6uvP2Q3pT9aDl96ojR-2hEmU9qU"
MODEL_ALIAS = "bench-model"
CHAT_BODY = (
    b'{"model":"bench-model","messages":[{"role":"user","content":"Hello, how are you today?"}]}'
)
STREAM_BODY = (
    b'{"model":"bench-model","messages":[{"role":"user",'
    b'"content":"Hello, how are you today?"}],"stream":true}'
)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A started server: its process (a session leader), port and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, limit: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-limit:].decode(errors="replace")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL whatever is left of it."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # orphaned workers, if any
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(2.0)


@dataclass
class ProcGroup:
    """Context manager: every process added is stopped on exit, newest first."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.procs.append(proc)
        return proc

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A second Ctrl-C (or a SIGTERM) while cleaning up must not leave servers behind.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                stop_process(proc)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)


def install_signal_handlers() -> None:
    """SIGTERM raises SystemExit and SIGINT KeyboardInterrupt, so ProcGroup always cleans up.

    SIGINT is set explicitly because a shell starts background jobs with it ignored.
    """

    def _handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- pinning -------------------------------------------------------------------------------


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus is not None else []


# -- /proc measurements --------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its living descendants."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        out.append(cur)
        todo.extend(children.get(cur, ()))
    return out


def worker_pids(pid: int) -> list[int]:
    """The processes doing the serving: the descendants of ``pid``, else ``pid`` itself.

    Skips ``taskset`` wrappers (they exec, so none survive) and granian's master process.
    """
    tree = tree_pids(pid)
    return tree[1:] or tree


def cpu_seconds(pids: list[int]) -> float:
    """Sum of utime+stime of ``pids`` (processes that vanished count as zero)."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / _CLK_TCK


def thread_times(pids: list[int]) -> tuple[dict[int, int], int]:
    """Each thread's time on a CPU so far, in nanoseconds (the scheduler's
    own count, ``/proc/<pid>/task/<tid>/schedstat``: exact, where
    :func:`cpu_seconds` counts 10 ms ticks), by thread id, and the context
    switches of all of them (voluntary and not). Threads that vanished are
    left out."""
    times: dict[int, int] = {}
    switches = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}/"
            try:
                with open(base + "schedstat", "rb") as fh:
                    ns = int(fh.read().split()[0])
                with open(base + "status", "rb") as fh:
                    for line in fh:
                        if line.startswith((b"voluntary_ctxt", b"nonvoluntary_ctxt")):
                            switches += int(line.split()[1])
            except (OSError, ValueError, IndexError):
                continue
            times[int(tid)] = ns
    return times, switches


def thread_delta(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds the threads spent between two :func:`thread_times` (a
    thread born in between counts from zero)."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


def _status_kb(pid: int, key: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb(pids: list[int]) -> float:
    """Max VmHWM (peak resident set) over ``pids``, in MB."""
    return max((_status_kb(p, b"VmHWM:") for p in pids), default=0) / 1024.0


def rss_mb(pids: list[int]) -> list[float]:
    """Current VmRSS of each of ``pids``, in MB."""
    return [_status_kb(p, b"VmRSS:") / 1024.0 for p in pids]


# -- HTTP helpers (stdlib only; off the measured path) -------------------------------------


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes, str]:
    """One request on a fresh connection; returns (status, body, content-type)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("content-type", "")
    finally:
        conn.close()


def chat_headers() -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}"}


def wait_http_ok(server: Server, path: str, timeout: float) -> None:
    """Poll ``GET path`` until 200; raise with the server's log tail on timeout or exit."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode} before "
                f"it was ready.\n--- its output ---\n{server.log_tail()}"
            )
        try:
            status, _, _ = http_request(server.port, "GET", path, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(
        f"{server.name} not ready on {server.url}{path} after {timeout:.0f}s "
        f"({last}).\n--- its output ---\n{server.log_tail()}"
    )


def wait_port(server: Server, timeout: float) -> None:
    """Poll until a POST to an unknown-to-us state answers at all (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited early.\n{server.log_tail()}")
        try:
            http_request(server.port, "GET", "/healthz", timeout=1.0)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not accept connections.\n{server.log_tail()}")


# -- starting things -----------------------------------------------------------------------


def add_upstream_headers(parser: argparse.ArgumentParser) -> None:
    """``--upstream-headers none|openai`` (what :func:`launch_mock` is given)."""
    parser.add_argument(
        "--upstream-headers",
        choices=("none", "openai"),
        default="none",
        help="openai: the mock's chat answers carry OpenAI's own headers (its x-ratelimit-*, "
        "x-request-id, openai-*), relayed by the gateway, as in production (default none)",
    )


def launch_mock(
    group: ProcGroup, *, chunks: int, cpus: str | None, openai_headers: bool = False
) -> Server:
    """The mock upstream (``openai_headers``: its chat answers carry OpenAI's headers)."""
    proc, port = start_mock(0, chunks=chunks, cpus=cpus, openai_headers=openai_headers)
    group.add(proc)
    server = Server("mock", proc, port)
    wait_port(server, 10.0)
    return server


def launch_baseline(
    group: ProcGroup,
    upstream: str,
    log_dir: Path,
    *,
    workers: int,
    cpus: str | None,
    interface: str = "asgi",
) -> Server:
    """``bench/baseline.py --interface asgi|rsgi``; named ``baseline`` / ``baseline-rsgi``."""
    name = "baseline" if interface == "asgi" else f"baseline-{interface}"
    log_path = log_dir / f"{name}.log"
    cmd = [
        *taskset(cpus),
        sys.executable,
        str(BENCH_DIR / "baseline.py"),
        "--port",
        "0",
        "--upstream",
        upstream,
        "--workers",
        str(workers),
        "--interface",
        interface,
    ]
    with open(log_path, "wb") as log:
        proc = group.add(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        )
    port = read_listen_line(proc, 15.0, name)
    server = Server(name, proc, port, log_path)
    wait_port(server, 15.0)
    return server


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ``governance``: "on": the bench key in a team of an org, every level with an
# RPM and TPM limit and a budget far above what a bench can spend, and a price
# for the mock's model: each request is admitted, priced and settled at three
# levels. "rates": the same three levels with their RPM and TPM limits only
# (no budget, no price); "budgets": their budgets and the price only (no
# rate limit). "key": the key's own RPM limit only (the common case); "key-tpm":
# its TPM limit only; "key-budget": its budget and the price only. "price": the
# price alone, no limit (every record priced: what "key-budget" adds to it is
# the budget). "off": none.
_RATES = "rpm: 100000000, tpm: 1000000000000"
_BUDGET = "budget: {usd: 1000000000, period: monthly}"
_PRICING = "pricing: [{provider: mock, model: %s, input: 1.0, output: 2.0}]\n"
GOVERNANCE = ("on", "rates", "budgets", "key", "key-tpm", "key-budget", "price", "off")
# The choices that limit the bench key alone (no team, no org), or nothing.
KEY_ONLY = ("key", "key-tpm", "key-budget", "price", "off")


def _levels(governance: str) -> str:
    """What each of the three levels sets under ``governance`` ("on",
    "rates" or "budgets")."""
    parts = {"on": (_RATES, _BUDGET), "rates": (_RATES,), "budgets": (_BUDGET,)}[governance]
    return ", ".join(parts)


def _tenancy(governance: str, model: str) -> str:
    """The orgs:, teams: (and pricing:) lines of a three-level ``governance``."""
    levels = _levels(governance)
    return (
        f"orgs: [{{id: bench-org, {levels}}}]\n"
        f"teams: [{{id: bench-team, org: bench-org, {levels}}}]\n"
        + (_PRICING % model if governance != "rates" else "")
    )


def _key_limits(governance: str) -> str:
    """What the bench key's entry adds under ``governance``."""
    if governance == "key":
        return ", rpm: 100000000"
    if governance == "key-tpm":
        return ", tpm: 1000000000000"
    if governance == "key-budget":
        return ", " + _BUDGET
    if governance in ("off", "price"):
        return ""
    return ", team: bench-team, " + _levels(governance)


def write_gandalf_config(
    tmpdir: Path,
    port: int,
    mock_port: int,
    name: str = "gandalf",
    *,
    access_log: bool = True,
    governance: str = "off",
    metrics: bool = True,
    dsn: str | None = None,
) -> Path:
    """The bench config: one openai-type provider pointing at the mock, one route, one key.

    Written to ``<tmpdir>/<name>.yaml`` with its own SQLite file ``<tmpdir>/<name>.db``
    (``dsn``: that database instead, e.g. a ``postgresql://`` URL).
    ``access_log``: the server's access log, on as shipped (the benches measure what
    users run; ``--access-log off`` measures the gateway without it). ``metrics``
    False writes ``server.metrics: false`` (True leaves the key out: the default is
    on, and an older revision does not know it).
    """
    path = tmpdir / f"{name}.yaml"
    log = "true" if access_log else "false"
    path.write_text(
        f'server: {{addr: "127.0.0.1:{port}", access_log: {log}'
        + ("" if metrics else ", metrics: false")
        + "}\n"
        f'database: {{dsn: "{dsn or tmpdir / f"{name}.db"}"}}\n'
        "providers:\n"
        f'  - {{name: mock, type: openai, base_url: "http://127.0.0.1:{mock_port}/v1", '
        'api_key: "sk-bench"}\n'
        "routes:\n"
        f"  - {{model_alias: {MODEL_ALIAS}, targets: [{{provider: mock, model: {MODEL_ALIAS}}}]}}\n"
        + (_tenancy(governance, MODEL_ALIAS) if governance not in KEY_ONLY else "")
        + (_PRICING % MODEL_ALIAS if governance in ("key-budget", "price") else "")
        + "keys:\n"
        f'  - {{name: bench, key: "{BENCH_KEY}", role: service_account'
        + _key_limits(governance)
        + "}\n"
    )
    return path


def serve_command(config: Path, workers: int, interface: str) -> list[str]:
    """``python -m gandalf serve`` on ``config`` (run it with :func:`repo_env`)."""
    return [
        sys.executable,
        "-m",
        "gandalf",
        "serve",
        "--config",
        str(config),
        "--workers",
        str(workers),
        "--interface",
        interface,
    ]


def repo_env(repo: Path) -> dict[str, str]:
    """This environment, importing the ``gandalf`` package from ``repo``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    return env


def launch_gandalf(
    group: ProcGroup,
    tmpdir: Path,
    mock_port: int,
    *,
    workers: int,
    cpus: str | None,
    interface: str = "asgi",
    ready_timeout: float = 20.0,
    repo: Path = REPO_DIR,
    name: str | None = None,
    access_log: bool = True,
    governance: str = "off",
    metrics: bool = True,
    dsn: str | None = None,
) -> Server:
    """``python -m gandalf serve --config <tmpdir>/<name>.yaml --interface I``, the
    ``gandalf`` package imported from ``repo``; waits for /healthz. Named ``gandalf``
    for ASGI, ``gandalf-rsgi`` for RSGI, unless ``name`` says otherwise."""
    if name is None:
        name = "gandalf" if interface == "asgi" else f"gandalf-{interface}"
    port = free_port()
    config = write_gandalf_config(
        tmpdir,
        port,
        mock_port,
        name,
        access_log=access_log,
        governance=governance,
        metrics=metrics,
        dsn=dsn,
    )
    log_path = tmpdir / f"{name}.log"
    cmd = [*taskset(cpus), *serve_command(config, workers, interface)]
    env = repo_env(repo)
    with open(log_path, "wb") as log:
        proc = group.add(
            subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmpdir,
                env=env,
                start_new_session=True,
            )
        )
    server = Server(name, proc, port, log_path)
    wait_http_ok(server, "/healthz", ready_timeout)
    return server
