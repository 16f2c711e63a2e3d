"""``gandalf bench``: the runs, what is printed and written (options.py: the arguments).

Exit codes: 0 done (some requests answered), 1 no request of the bench was
answered successfully (target down, wrong key or model), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from gandalf.benchkit import engine, report, trivial, wrk
from gandalf.benchkit.engine import Scenario

CEILING_NEAR = 0.8  # a rate at 80 % or more of the client's own ceiling is flagged
CPU_BUSY = 0.85  # ... and so is a client that kept 85 % of a core busy
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_T = TypeVar("_T")


class UsageError(Exception):
    """A bad option: printed as ``gandalf: error: ...``, exit 2."""


def duration(text: str, option: str) -> float:
    """Seconds from ``10s``, ``500ms``, ``2m`` or a plain number of seconds."""
    m = _DURATION.match(text)
    if not m:
        raise UsageError(f"{option} must look like 10s, 500ms or 2m, got {text!r}")
    value = float(m.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]


def _numbers(text: str, option: str, kind: type[int] | type[float]) -> list[float]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} must be a comma list of numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{option} must be numbers > 0, got {text!r}")
    return [float(v) for v in values]


def _run_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)


def main(args: argparse.Namespace) -> int:
    try:
        if args.compare:
            return _compare(args)
        return _bench(args)
    except UsageError as exc:
        print(f"gandalf: error: {exc}", file=sys.stderr)
        return 2


def _compare(args: argparse.Namespace) -> int:
    loaded = []
    for path in args.compare:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--compare: cannot read {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise UsageError(f"--compare: {path} is not a gandalf bench JSON file")
        loaded.append(data)
    print(report.compare_text(loaded[0], loaded[1], args.compare))
    if args.html_out:
        with open(args.html_out, "w", encoding="utf-8") as f:
            f.write(report.compare_html(loaded[0], loaded[1], args.compare))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os

    if not args.url or not args.model:
        raise UsageError("bench needs a URL and --model (or --compare A.json B.json)")
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"URL must start with http:// or https://, got {args.url!r}")
    if args.prompt_tokens < 1 or args.max_tokens < 1 or args.max_in_flight < 1:
        raise UsageError("--prompt-tokens, --max-tokens and --max-in-flight must be >= 1")
    scenario = Scenario(
        url=engine.chat_url(args.url),
        model=args.model,
        key=args.key if args.key is not None else os.environ.get("OPENAI_API_KEY"),
        stream=args.stream,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        duration=duration(args.duration, "--duration"),
        warmup=duration(args.warmup, "--warmup"),
        timeout=duration(args.timeout, "--timeout"),
        max_in_flight=args.max_in_flight,
    )
    if scenario.duration <= 0 or scenario.timeout <= 0:
        raise UsageError("--duration and --timeout must be > 0")
    ceiling_s = duration(args.ceiling, "--ceiling")
    rates = _numbers(args.rate, "--rate", float) if args.rate else []
    levels = [] if rates else [int(c) for c in _numbers(args.concurrency, "--concurrency", int)]
    use_wrk = args.engine == "wrk" or (args.engine == "auto" and wrk.available())
    if args.engine == "wrk" and (scenario.stream or rates or not wrk.available()):
        raise UsageError(
            "--engine wrk needs wrk installed and a closed loop without --stream "
            "(the built-in client measures streams and open loops)"
        )
    use_wrk = use_wrk and not scenario.stream and not rates
    plan: list[dict[str, Any]] = [
        {"mode": "open", "rate": r, "concurrency": None} for r in rates
    ] or [{"mode": "closed", "concurrency": c, "rate": None} for c in levels]
    out: dict[str, Any] = {
        "tool": "gandalf bench",
        "version": 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": scenario.url,
        "settings": {
            "model": scenario.model,
            "stream": scenario.stream,
            "prompt_tokens": scenario.prompt_tokens,
            "max_tokens": scenario.max_tokens,
            "duration_s": scenario.duration,
            "warmup_s": scenario.warmup,
            "timeout_s": scenario.timeout,
            "engine": args.engine,
            "concurrency": levels or None,
            "rate": rates or None,
        },
        "runs": [],
    }
    print(
        f"gandalf bench {scenario.url} model {scenario.model} "
        f"({'streamed' if scenario.stream else 'not streamed'}): "
        f"{len(plan)} run(s) of {scenario.warmup:g}s warm-up + {scenario.duration:g}s",
        file=sys.stderr,
    )
    for step in plan:
        run = _run_loop(_one_run(scenario, step, use_wrk, ceiling_s))
        out["runs"].append(run)
        print(
            f"{report.run_label(run)}: {run['rps']:,.1f} req/s, "
            f"p50 {(run['latency_ms'] or {}).get('p50', 0):.1f} ms, "
            f"errors {run['error_count']}",
            file=sys.stderr,
        )
    print(report.table(out))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    if args.html_out:
        with open(args.html_out, "w", encoding="utf-8") as f:
            f.write(report.html_report(out))
    return 0 if any(run["ok"] for run in out["runs"]) else 1


async def _one_run(
    scenario: Scenario, step: dict[str, Any], use_wrk: bool, ceiling_s: float
) -> dict[str, Any]:
    label = report.run_label(step)
    notes: list[str] = []
    if use_wrk:
        probe = engine.Recorder(w0=0.0, w1=float("inf"))
        pool = engine.Pool(scenario.url, scenario.body(), scenario.headers())
        await engine.one_request(pool, False, scenario.timeout, probe)
        await pool.aclose()
        per_answer = probe.tokens if probe.ok else 0
        concurrency = int(step["concurrency"])
        run = await asyncio.to_thread(wrk.run, scenario, concurrency, per_answer)
        notes.append("measured with wrk; tokens/s = req/s x the completion tokens of one probe")
    else:
        total = scenario.warmup + scenario.duration
        show = engine.progress_printer(label, total)
        if step["mode"] == "open":
            rec = await engine.run_open(scenario, float(step["rate"]), show)
        else:
            rec = await engine.run_closed(scenario, int(step["concurrency"]), show)
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[2K")
        run = engine.results(rec, scenario)
        if rec.missed or (rec.lateness and run["open_loop"]["late"] > 0.05 * rec.sent):
            notes.append(
                f"the client could not keep the schedule: {rec.missed} request(s) not sent "
                f"(--max-in-flight reached), {run['open_loop']['late']} sent late; "
                "the target was offered less than the rate"
            )
        ceiling = None
        if ceiling_s > 0:
            ceiling = await _ceiling(scenario, max(rec.peak_in_flight, 1), ceiling_s)
            run["client_ceiling_rps"] = ceiling
        near = bool(ceiling) and run["rps"] >= CEILING_NEAR * (ceiling or 0.0)
        if near or rec.cpu >= CPU_BUSY:
            run["client_bound"] = True
            why = []
            if rec.cpu >= CPU_BUSY:
                why.append(f"the client kept {rec.cpu:.0%} of a core busy")
            if near and ceiling:
                why.append(
                    f"{run['rps']:,.0f} req/s is {run['rps'] / ceiling:.0%} of the client's own "
                    f"ceiling ({ceiling:,.0f} req/s against a trivial local server)"
                )
            notes.append(
                "client-bound: "
                + "; ".join(why)
                + ". The target may be faster than shown: use wrk (not streamed), "
                "or several clients"
            )
    run.setdefault("client_ceiling_rps", None)
    run.setdefault("client_bound", False)
    run.update(mode=step["mode"], concurrency=step["concurrency"], rate=step["rate"])
    run["notes"] = notes
    if run["ok"] == 0 and run["error_count"]:
        notes.append("no request succeeded: check the URL, --model and --key")
    return run


async def _ceiling(scenario: Scenario, concurrency: int, seconds: float) -> float | None:
    """The built-in client's requests/s against a trivial server in another process,
    at the same concurrency and for the same kind of answer."""
    try:
        proc, port = await asyncio.to_thread(trivial.start_process)
    except (OSError, RuntimeError):
        return None
    try:
        probe = Scenario(
            url=f"http://127.0.0.1:{port}/v1/chat/completions",
            model=scenario.model,
            stream=scenario.stream,
            prompt_tokens=scenario.prompt_tokens,
            max_tokens=scenario.max_tokens,
            duration=seconds,
            warmup=min(0.3, seconds),
            timeout=10.0,
        )
        rec = await engine.run_closed(probe, min(concurrency, 1024))
        return round(rec.ok / seconds, 1) if rec.ok else None
    finally:
        await asyncio.to_thread(trivial.stop_process, proc)
