"""Driving ``wrk``: a generated Lua script (POST body, headers, a JSON ``done()``) and a runner.

wrk's ``done()`` prints one line, ``WRKJSON {...}``, with the request count, latency
percentiles in microseconds, bytes read, and errors split into non-2xx/3xx statuses and socket
errors (connect, read, write, timeout).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from _procs import taskset

INSTALL_HINT = (
    "wrk is not installed. Install it with `apt-get install -y wrk` "
    "(Debian/Ubuntu) or `brew install wrk` (macOS), then run again."
)

_DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%.0f,"p90_us":%.0f,' ..
    '"p99_us":%.0f,"max_us":%.0f,"mean_us":%.1f,"status_errors":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    mean_us: float
    status_errors: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.status_errors + self.socket_errors

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(data: bytes) -> str:
    text = data.decode()
    if "]==]" in text:
        raise ValueError("body contains the Lua long-bracket terminator")
    return f"[==[{text}]==]"


def write_script(path: Path, body: bytes, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    for name, value in headers.items():
        lines.append(f"wrk.headers[ {_lua_string(name.encode())} ] = {_lua_string(value.encode())}")
    path.write_text("\n".join(lines) + "\n" + _DONE_LUA)
    return path


def run_wrk(
    url: str,
    script: Path,
    *,
    connections: int,
    threads: int,
    duration_s: int,
    cpus: str | None,
    timeout_s: int = 5,
) -> WrkResult:
    """Run wrk once and parse its ``WRKJSON`` line; raise with wrk's output if missing."""
    cmd = [
        *taskset(cpus),
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON ") :])
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=int(data["duration_us"]) / 1e6,
                bytes=int(data["bytes"]),
                p50_us=float(data["p50_us"]),
                p90_us=float(data["p90_us"]),
                p99_us=float(data["p99_us"]),
                max_us=float(data["max_us"]),
                mean_us=float(data["mean_us"]),
                status_errors=int(data["status_errors"]),
                socket_errors=int(data["socket_errors"]),
            )
    raise RuntimeError(
        f"wrk gave no result (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
