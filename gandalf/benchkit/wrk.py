"""wrk as the load generator, when it is installed and the scenario allows it:
closed loop, not streamed (wrk measures a response, not the chunks of a stream).

A generated Lua script sets the POST body and headers and prints one JSON line
from ``done()``: requests, latency percentiles (µs) and errors, split into
non-2xx statuses and socket errors (connect, read, write, timeout). wrk cannot
read the answers cheaply, so tokens/s is the requests/s times the completion
tokens of one probe answer (``tokens_source: probe``).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from gandalf.benchkit import stats
from gandalf.benchkit.engine import Scenario

_DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  local points = {}
  for _, p in ipairs({%s}) do
    table.insert(points, string.format('[%%g,%%.0f]', p, latency:percentile(p)))
  end
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"mean_us":%%.1f,"max_us":%%.0f,' ..
    '"status":%%d,"connect":%%d,"read":%%d,"write":%%d,"timeout":%%d,"cdf":[%%s]}\n',
    summary.requests, summary.duration, latency.mean, latency.max, e.status,
    e.connect, e.read, e.write, e.timeout, table.concat(points, ",")))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(text: str) -> str:
    level = "="
    while f"]{level}]" in text:
        level += "="
    return f"[{level}[{text}]{level}]"


def script(scenario: Scenario) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(scenario.body().decode())}"]
    for name, value in scenario.headers().items():
        # The spaces matter: "[[" would open a Lua long string.
        lines.append(f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}")
    points = ",".join(f"{p:g}" for p in sorted({*stats.CDF_POINTS, 90.0}))
    return "\n".join(lines) + "\n" + _DONE_LUA % points


def _run(scenario: Scenario, path: Path, concurrency: int, seconds: int) -> dict[str, Any]:
    threads = 1 if concurrency == 1 else 2
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{seconds}s",
        f"--timeout={max(1, math.ceil(scenario.timeout))}s",
        "-s",
        str(path),
        scenario.url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
            return data
    raise RuntimeError(f"wrk gave no result (exit {proc.returncode}): {proc.stderr.strip()}")


def run(scenario: Scenario, concurrency: int, tokens_per_answer: int) -> dict[str, Any]:
    """Warm up, then measure, with wrk; the run's numbers as the JSON report holds
    them. wrk's durations are whole seconds: the measured window is the
    duration rounded up."""
    seconds = max(1, math.ceil(scenario.duration - 1e-9))
    with tempfile.TemporaryDirectory(prefix="gandalf-bench-") as tmp:
        path = Path(tmp) / "bench.lua"
        path.write_text(script(scenario))
        if scenario.warmup > 0:
            _run(scenario, path, concurrency, max(1, math.ceil(scenario.warmup - 1e-9)))
        data = _run(scenario, path, concurrency, seconds)
    window = data["duration_us"] / 1e6 or seconds
    errors = {
        name: int(data[key])
        for name, key in (
            ("non-2xx", "status"),
            ("connect", "connect"),
            ("read", "read"),
            ("write", "write"),
            ("timeout", "timeout"),
        )
        if data[key]
    }
    requests = int(data["requests"])
    ok = max(requests - int(data["status"]), 0)
    cdf = [[float(p), round(us / 1000.0, 3)] for p, us in data["cdf"]]
    at = dict((p, ms) for p, ms in cdf)
    return {
        "engine": "wrk",
        "duration_s": round(window, 3),
        "requests": requests + sum(v for k, v in errors.items() if k != "non-2xx"),
        "ok": ok,
        "errors": errors,
        "error_count": sum(errors.values()),
        "rps": round(ok / window, 2),
        "tokens": ok * tokens_per_answer,
        "tokens_per_s": round(ok * tokens_per_answer / window, 2),
        "tokens_source": "probe",
        "latency_ms": {
            "p50": at.get(50.0, 0.0),
            "p90": at.get(90.0, 0.0),
            "p99": at.get(99.0, 0.0),
            "mean": round(data["mean_us"] / 1000.0, 3),
            "max": round(data["max_us"] / 1000.0, 3),
        },
        "ttft_ms": None,
        "itl_ms": None,
        "cdf_ms": [pair for pair in cdf if pair[0] in stats.CDF_POINTS],
        "histogram": None,
        "ttft_histogram": None,
        "over_time": None,
        "peak_in_flight": concurrency,
    }
