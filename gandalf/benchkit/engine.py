"""The built-in load generator: keep-alive HTTP/1.1 connections, closed or open loop.

- **Closed loop** (``concurrency``): that many workers, each sending its next
  request when the previous one is answered (as wrk does).
- **Open loop** (``rate``): request *i* is due at ``start + i / rate`` whatever
  the answers; each is sent at its time (the lateness, actual minus due, is
  recorded), or, when ``max_in_flight`` requests are already waiting, not sent
  at all and counted as *missed*: a generator that cannot keep the schedule says
  so instead of quietly sending fewer.

The first ``warmup`` seconds are run but not measured. A request belongs to the
measurement when it started (open loop: was due) inside the window
``[warmup, warmup + duration)``; requests still in flight when the window
closes are waited for (at most ``drain`` seconds) and then cancelled.

Per request: status (or ``connect``/``timeout``/``disconnected``/``client_error``),
latency (request sent to answer read whole, the whole stream for a stream), and
for a stream the time to the first content chunk and the gaps between content
chunks; completion tokens from ``usage`` when the answer has it, else the
content chunks counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

import orjson

from gandalf.benchkit import stats

DRAIN = 10.0  # seconds the in-flight requests get once the window closes
LATE_MS = 10.0  # open loop: a request sent this much after its time is "late"
_PROMPT_WORD = "hello "  # about one token in common tokenizers


@dataclass(frozen=True)
class Scenario:
    """What to send and for how long."""

    url: str  # the full chat completions URL
    model: str
    key: str | None = None
    stream: bool = False
    prompt_tokens: int = 32
    max_tokens: int = 64
    duration: float = 10.0
    warmup: float = 2.0
    timeout: float = 60.0
    max_in_flight: int = 1024

    def body(self) -> bytes:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": (_PROMPT_WORD * self.prompt_tokens).strip()}],
            "max_tokens": self.max_tokens,
        }
        if self.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return orjson.dumps(payload)

    def headers(self) -> dict[str, str]:
        out = {"content-type": "application/json"}
        if self.key:
            out["authorization"] = f"Bearer {self.key}"
        return out


def chat_url(base: str) -> str:
    """The chat completions URL for a base URL: ``http://h:p`` and ``http://h:p/v1``
    both give ``http://h:p/v1/chat/completions``; a URL already ending in
    ``/chat/completions`` is kept."""
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    path = base.split("://", 1)[-1].partition("/")[2]
    return f"{base}/chat/completions" if path else f"{base}/v1/chat/completions"


@dataclass
class Recorder:
    """Samples of the measurement window, plus live counters for the progress line."""

    w0: float = 0.0  # perf_counter at which the window opens
    w1: float = 0.0  # ... and closes
    starts: list[float] = field(default_factory=list)  # seconds since w0
    latencies: list[float] = field(default_factory=list)  # ms, successes only
    ttfts: list[float] = field(default_factory=list)  # ms
    itls: list[float] = field(default_factory=list)  # ms
    tokens: int = 0
    tokens_from_usage: int = 0  # answers whose tokens came from usage
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    # open loop
    scheduled: int = 0
    sent: int = 0
    missed: int = 0
    lateness: list[float] = field(default_factory=list)  # ms
    peak_in_flight: int = 0
    cpu: float = 0.0  # this process's CPU time / wall time over the run (1.0: one core busy)
    # live, warm-up included
    done: int = 0
    failed: int = 0

    def add(
        self,
        t0: float,
        t1: float,
        outcome: str,
        ttft: float | None,
        itls: list[float] | None,
        tokens: int,
        from_usage: bool,
    ) -> None:
        self.done += 1
        if outcome != "200":
            self.failed += 1
        if not self.w0 <= t0 < self.w1:
            return
        if outcome != "200":
            self.errors[outcome] += 1
            return
        self.ok += 1
        self.starts.append(t0 - self.w0)
        self.latencies.append((t1 - t0) * 1000.0)
        if ttft is not None:
            self.ttfts.append(ttft * 1000.0)
        if itls:
            self.itls.extend(g * 1000.0 for g in itls)
        self.tokens += tokens
        self.tokens_from_usage += from_usage


class Pool:
    """Keep-alive HTTP/1.1 connections to one URL, and the request bytes, built once.

    A minimal client on asyncio streams, not aiohttp: a response costs a few
    tens of microseconds, so the client adds little to what it measures (with
    aiohttp, 16 answers arriving together waited ~4 ms for each other's
    parsing). It speaks what chat completions need: one POST at a time per
    connection, answers framed by Content-Length, chunked encoding or the
    connection's end; https through the ssl module.
    """

    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {target} HTTP/1.1", f"host: {parts.netloc}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"content-length: {len(body)}")
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.tls else None

    async def acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A connection, and whether it was used before (it may have been closed)."""
        if self._idle:
            reader, writer = self._idle.pop()
            return reader, writer, True
        try:
            reader, writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self.tls else None,
                limit=1 << 20,
            )
        except OSError as exc:
            raise _ConnectFailed from exc
        return reader, writer, False

    def release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._idle.append((reader, writer))

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _ConnectFailed(Exception):
    pass


class _Answer:
    """What one response carried: status, and for a stream its token timings."""

    __slots__ = ("from_usage", "gaps", "last", "rest", "start", "status", "tokens", "ttft")

    def __init__(self, start: float) -> None:
        self.start = start
        self.status = 0
        self.ttft: float | None = None
        self.gaps: list[float] = []
        self.last = 0.0
        self.tokens = 0
        self.from_usage = False
        self.rest = b""  # a line cut between two reads

    def events(self, data: bytes) -> None:
        """Server-sent events as they arrive: content chunks timed, usage read."""
        now = time.perf_counter()
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            if b'"content":"' in line and b'"content":""' not in line:
                self.tokens += 1
                if self.ttft is None:
                    self.ttft = now - self.start
                else:
                    self.gaps.append(now - self.last)
                self.last = now
            if b'"usage":{' in line:
                counted = _usage_tokens(line[6:])
                if counted is not None:
                    self.tokens, self.from_usage = counted, True


async def _exchange(
    pool: Pool,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    answer: _Answer,
    stream: bool,
) -> bool:
    """Send the request, read the whole answer; True when the connection can be reused."""
    writer.write(pool.request)
    head = await reader.readuntil(b"\r\n\r\n")
    answer.status = int(head[9:12])
    fields = head.lower()
    keep = b"\nconnection: close" not in fields
    events = stream and answer.status == 200
    at = fields.find(b"\ncontent-length:")
    if b"\ntransfer-encoding: chunked" in fields:
        pieces = []
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readline()  # the empty line after the last chunk (no trailers)
                break
            piece = (await reader.readexactly(size + 2))[:-2]
            if events:
                answer.events(piece)
            else:
                pieces.append(piece)
        data = b"".join(pieces)
    elif at >= 0:
        length = int(fields[at + 16 : fields.index(b"\r", at + 1)])
        data = await reader.readexactly(length)
        if events:
            answer.events(data + b"\n")
    else:
        data = await reader.read()
        keep = False
        if events:
            answer.events(data + b"\n")
    if answer.status == 200 and not stream:
        answer.tokens, answer.from_usage = _plain_tokens(data)
    return keep


async def one_request(
    pool: Pool, stream: bool, seconds: float, rec: Recorder, at: float | None = None
) -> None:
    """Send one request and record it; ``at`` is when it was due (open loop)."""
    t0 = time.perf_counter()
    answer = _Answer(t0)
    outcome = "client_error"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(seconds):
            for _ in range(2):  # once more on a fresh connection if a reused one was closed
                reader, writer, reused = await pool.acquire()
                try:
                    keep = await _exchange(pool, reader, writer, answer, stream)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    writer.close()
                    writer = None
                    partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                    if reused and not partial and not answer.status:
                        continue
                    raise
                if keep:
                    pool.release(reader, writer)
                else:
                    writer.close()
                writer = None
                outcome = str(answer.status)
                break
    except TimeoutError:
        outcome = "timeout"
    except _ConnectFailed:
        outcome = "connect"
    except (asyncio.IncompleteReadError, ConnectionError):
        outcome = "disconnected"
    except (ValueError, asyncio.LimitOverrunError, OSError):
        outcome = "client_error"  # not HTTP as this client reads it
    finally:
        if writer is not None:  # cancelled or failed mid-answer: never reused
            writer.close()
    gaps = answer.gaps if stream else None
    rec.add(
        t0 if at is None else at, time.perf_counter(), outcome, answer.ttft, gaps,
        answer.tokens, answer.from_usage,
    )  # fmt: skip


def _usage_tokens(data: bytes) -> int | None:
    try:
        usage = orjson.loads(data).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"])
    return None


def _plain_tokens(data: bytes) -> tuple[int, bool]:
    counted = _usage_tokens(data)
    if counted is not None:
        return counted, True
    try:  # no usage: about four characters a token
        content = orjson.loads(data)["choices"][0]["message"]["content"] or ""
    except (orjson.JSONDecodeError, LookupError, TypeError):
        return 0, False
    return (len(content) + 3) // 4, False


Progress = Callable[[Recorder, float], None]


async def _ticker(rec: Recorder, start: float, progress: Progress | None, every: float) -> None:
    if progress is None:
        return
    while True:
        await asyncio.sleep(every)
        progress(rec, time.perf_counter() - start)


async def run_closed(
    scenario: Scenario, concurrency: int, progress: Progress | None = None, every: float = 0.5
) -> Recorder:
    """``concurrency`` workers, back to back, for warm-up plus duration."""
    rec = Recorder()
    pool = Pool(scenario.url, scenario.body(), scenario.headers())
    try:
        start = time.perf_counter()
        rec.w0 = start + scenario.warmup
        rec.w1 = rec.w0 + scenario.duration

        async def worker() -> None:
            while time.perf_counter() < rec.w1:
                await one_request(pool, scenario.stream, scenario.timeout, rec)

        ticker = asyncio.create_task(_ticker(rec, start, progress, every))
        cpu0 = time.process_time()
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        rec.peak_in_flight = concurrency
        await _finish(tasks, rec.w1 + min(DRAIN, scenario.timeout) - time.perf_counter())
        rec.cpu = (time.process_time() - cpu0) / (time.perf_counter() - start)
        ticker.cancel()
    finally:
        await pool.aclose()
    return rec


async def sleep_until(due: float) -> None:
    """Return at ``due`` (``time.perf_counter()``) or after it, never before.
    uvloop rounds a timer to whole milliseconds of its cached clock, so one
    sleep can end up to a millisecond early: sleep again for what is left
    (bounded: every turn ends later, and ``due`` is fixed)."""
    now = time.perf_counter()
    while due > now:
        await asyncio.sleep(due - now)
        now = time.perf_counter()


async def run_open(
    scenario: Scenario, rate: float, progress: Progress | None = None, every: float = 0.5
) -> Recorder:
    """Requests due at ``rate`` per second, whatever the answers (see the module)."""
    rec = Recorder()
    pool = Pool(scenario.url, scenario.body(), scenario.headers())
    first = math.ceil(scenario.warmup * rate - 1e-9)  # the first measured request's index
    total = math.ceil((scenario.warmup + scenario.duration) * rate - 1e-9)
    in_flight: set[asyncio.Task[None]] = set()
    try:
        start = time.perf_counter()
        rec.w0 = start + scenario.warmup
        rec.w1 = rec.w0 + scenario.duration
        ticker = asyncio.create_task(_ticker(rec, start, progress, every))
        cpu0 = time.process_time()
        for i in range(total):
            due = start + i / rate
            await sleep_until(due)
            now = time.perf_counter()
            measured = i >= first
            rec.scheduled += measured
            if len(in_flight) >= scenario.max_in_flight:
                rec.missed += measured
                continue
            task = asyncio.create_task(
                one_request(pool, scenario.stream, scenario.timeout, rec, at=due)
            )
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            rec.peak_in_flight = max(rec.peak_in_flight, len(in_flight))
            if measured:
                rec.sent += 1
                rec.lateness.append((now - due) * 1000.0)
        await _finish(list(in_flight), rec.w1 + min(DRAIN, scenario.timeout) - time.perf_counter())
        rec.cpu = (time.process_time() - cpu0) / (time.perf_counter() - start)
        ticker.cancel()
    finally:
        await pool.aclose()
    return rec


async def _finish(tasks: list[asyncio.Task[None]], grace: float) -> None:
    """Wait for ``tasks`` at most ``grace`` seconds, then cancel the rest."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(grace, 0.0))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


def results(rec: Recorder, scenario: Scenario) -> dict[str, Any]:
    """One run's numbers, as the JSON report holds them (engine ``builtin``)."""
    window = scenario.duration
    completed = rec.ok + sum(rec.errors.values())
    out: dict[str, Any] = {
        "engine": "builtin",
        "duration_s": window,
        "requests": completed,
        "ok": rec.ok,
        "errors": dict(sorted(rec.errors.items())),
        "error_count": sum(rec.errors.values()),
        "rps": round(rec.ok / window, 2) if window else 0.0,
        "tokens": rec.tokens,
        "tokens_per_s": round(rec.tokens / window, 2) if window else 0.0,
        "tokens_source": (
            "usage"
            if rec.ok and rec.tokens_from_usage == rec.ok
            else ("chunks" if scenario.stream else "estimate")
        ),
        "latency_ms": stats.summary(rec.latencies),
        "ttft_ms": stats.summary(rec.ttfts) if scenario.stream else None,
        "itl_ms": stats.summary(rec.itls) if scenario.stream else None,
        "cdf_ms": stats.cdf(rec.latencies),
        "histogram": stats.histogram(rec.latencies),
        "ttft_histogram": stats.histogram(rec.ttfts) if scenario.stream else None,
        "over_time": stats.buckets(rec.starts, rec.latencies, window),
        "peak_in_flight": rec.peak_in_flight,
        "client_cpu": round(rec.cpu, 3),
    }
    if rec.scheduled:
        out["open_loop"] = {
            "scheduled": rec.scheduled,
            "sent": rec.sent,
            "missed": rec.missed,
            "late": sum(1 for x in rec.lateness if x > LATE_MS),
            "late_threshold_ms": LATE_MS,
            "lateness_ms": stats.summary(rec.lateness),
        }
    return out


def progress_printer(label: str, total: float, stream: IO[str] | None = None) -> Progress:
    """A live line (``\\r``) on a terminal; a plain line every 5 s otherwise."""
    out = stream or sys.stderr
    tty = out.isatty()
    state = {"done": 0, "t": 0.0, "printed": 0.0}

    def show(rec: Recorder, elapsed: float) -> None:
        dt = elapsed - state["t"]
        rate = (rec.done - state["done"]) / dt if dt > 0 else 0.0
        state["done"], state["t"] = rec.done, elapsed
        phase = "warm-up" if time.perf_counter() < rec.w0 else "measuring"
        line = (
            f"{label} {phase} {min(elapsed, total):5.1f}/{total:.1f}s  "
            f"{rec.done} requests  {rate:,.0f} req/s  errors {rec.failed}"
        )
        if tty:
            out.write("\r\x1b[2K" + line)
            out.flush()
        elif elapsed - state["printed"] >= 5.0:
            state["printed"] = elapsed
            out.write(line + "\n")
            out.flush()

    return show
