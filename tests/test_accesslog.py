"""The access log writer: its lines, when they are written, and that none is lost."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import orjson
import pytest

from gandalf.domain import UsageRecord
from gandalf.server import accesslog
from gandalf.server.accesslog import FLUSH_BYTES, FLUSH_INTERVAL, AccessLog, write_stderr
from gandalf.server.asgi import GandalfApp, Runtime

# The access line's fields, in the contract's order (CONTRACT.md, "Observability");
# test_e2e and test_observability check served lines against the same list.
FIELDS = [
    "ts",
    "level",
    "request_id",
    "trace_id",
    "method",
    "path",
    "status",
    "ms",
    "key_id",
    "org",
    "team",
    "route",
    "provider",
    "model",
    "attempts",
    "tokens",
    "cost_usd",
    "cache",
]


def lines(written: list[bytes]) -> list[dict[str, Any]]:
    text = b"".join(written)
    assert text.endswith(b"\n")
    return [orjson.loads(line) for line in text.split(b"\n")[:-1]]


def test_a_line_is_json_with_the_fields_and_control_characters_escaped() -> None:
    written: list[bytes] = []
    log = AccessLog(written.append)
    before = time.time()
    forged = '/x\n{"status":200}\x1b[2J\r\x00\x85\u2028'
    log.record("GET", forged, 404, time.perf_counter() - 0.25, "req\n1")
    log.record("BR\x07EW", "/", 200, time.perf_counter(), "abc")
    log.flush()
    text = b"".join(written)
    assert text.count(b"\n") == 2  # one line each, whatever the path held
    assert not any(c < 0x20 and c != 0x0A for c in text)
    first, second = lines(written)
    assert list(first) == FIELDS
    assert first["method"] == "GET" and first["path"] == forged
    assert first["status"] == 404 and first["request_id"] == "req\n1"
    assert 250.0 <= first["ms"] < 10_000.0
    assert before - 1 <= first["ts"] <= time.time() + 1
    assert second["method"] == "BR\x07EW" and second["status"] == 200


def test_lines_are_written_together_when_the_loop_comes_round() -> None:
    written: list[bytes] = []
    log = AccessLog(written.append, interval=0)

    async def main() -> None:
        for i in range(3):
            log.record("POST", f"/r{i}", 200, time.perf_counter(), f"id{i}")
        assert written == []  # buffered, not one write per line
        await asyncio.sleep(0)
        assert len(written) == 1
        assert [e["path"] for e in lines(written)] == ["/r0", "/r1", "/r2"]
        log.record("POST", "/r3", 200, time.perf_counter(), "id3")
        await asyncio.sleep(0)
        assert len(written) == 2 and log.buffered == 0

    asyncio.run(main())


def test_lines_wait_for_the_flush_interval_then_go_in_one_write() -> None:
    """By default the lines of many loop turns share one write: a timer armed by
    the first line writes them all FLUSH_INTERVAL later (not at the next turn)."""
    written: list[bytes] = []
    log = AccessLog(written.append)
    assert log.interval == FLUSH_INTERVAL > 0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        armed = loop.time()
        log.record("POST", "/r0", 200, time.perf_counter(), "id0")
        pending = log._pending
        assert isinstance(pending, asyncio.TimerHandle)
        assert armed + FLUSH_INTERVAL <= pending.when() <= loop.time() + FLUSH_INTERVAL
        for _ in range(3):  # later turns add to the same batch, no new timer
            await asyncio.sleep(0)
            log.record("POST", "/r1", 200, time.perf_counter(), "id1")
        assert written == [] and log._pending is pending
        pending._run()  # the timer fires (what the loop does at pending.when())
        assert len(written) == 1 and log.buffered == 0 and log._pending is None
        assert [e["path"] for e in lines(written)] == ["/r0", "/r1", "/r1", "/r1"]

    asyncio.run(main())


def test_a_full_buffer_is_written_at_once() -> None:
    written: list[bytes] = []
    log = AccessLog(written.append)
    path = "/" + "p" * 1000

    async def main() -> None:
        count = 0
        while not written:
            log.record("GET", path, 200, time.perf_counter(), "id")
            count += 1
            assert count <= FLUSH_BYTES // 1000 + 1
        assert len(b"".join(written)) >= FLUSH_BYTES and log.buffered == 0
        await asyncio.sleep(0)  # the flush scheduled earlier finds nothing more
        assert len(lines(written)) == count

    asyncio.run(main())


def test_without_a_running_loop_a_line_is_written_at_once() -> None:
    written: list[bytes] = []
    AccessLog(written.append).record("GET", "/", 200, time.perf_counter(), "id")
    assert [e["path"] for e in lines(written)] == ["/"]


def test_flush_writes_what_is_buffered_once() -> None:
    written: list[bytes] = []
    log = AccessLog(written.append)

    async def main() -> None:
        log.record("GET", "/a", 200, time.perf_counter(), "id")
        log.flush()  # at shutdown, before the loop comes round
        assert [e["path"] for e in lines(written)] == ["/a"]
        await asyncio.sleep(0)
        log.flush()
        assert len(written) == 1

    asyncio.run(main())


def test_write_stderr_writes_everything_a_pipe_takes_in_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    got = bytearray()

    def write(fd: int, data: Any) -> int:
        assert fd == 2
        got.extend(bytes(data[:7]))
        return min(7, len(data))

    monkeypatch.setattr(accesslog, "_os_write", write)
    write_stderr(b"x" * 100 + b"\n")
    assert bytes(got) == b"x" * 100 + b"\n"


def test_write_stderr_drops_a_batch_it_cannot_write(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, data: Any) -> int:
        raise BrokenPipeError

    monkeypatch.setattr(accesslog, "_os_write", broken)
    write_stderr(b"line\n")  # no exception: a closed stderr must not fail requests


@pytest.mark.parametrize("started", [True, False])
def test_shutdown_writes_the_lines_still_buffered(started: bool) -> None:
    """The lifecycle's shutdown flushes: the loop may never come round again."""
    written: list[bytes] = []

    async def build() -> Runtime:
        async def close() -> None: ...

        return Runtime({}, close)

    async def main() -> None:
        app = GandalfApp(build, access_log=True)
        app.core.access.write = written.append
        if started:
            await app.startup()
        app.core.access.record("GET", "/last", 200, time.perf_counter(), "id")
        await app.shutdown()  # nothing in it yields to the loop before the flush
        assert [e["path"] for e in lines(written)] == ["/last"]

    asyncio.run(main())


def _reference_line(
    now: float,
    ms: float,
    method: str,
    path: str,
    status: int,
    request_id: str,
    facts: UsageRecord | None,
    trace_id: bytes,
    cache: str | None,
) -> bytes:
    """The line as one %-format of every field (how it was written before the
    templates): the templates must give the same bytes."""
    dumps = orjson.dumps
    head = b'{"ts":%.3f,"level":"%b","request_id":%b,"trace_id":%b,"method":%b,"path":%b,'
    head += b'"status":%d,"ms":%.2f,' % (status, ms)
    head %= (
        now,
        b"info" if status < 500 else b"error",
        dumps(request_id),
        trace_id,
        dumps(method),
        dumps(path),
    )
    if facts is None:
        return head + (
            b'"key_id":null,"org":null,"team":null,"route":null,"provider":null,"model":null,'
            b'"attempts":0,"tokens":null,"cost_usd":null,"cache":%b}\n' % dumps(cache)
        )
    who = (
        facts.key_id,
        facts.org_id,
        facts.team_id,
        facts.model_alias,
        facts.provider,
        facts.target_model,
    )
    names = ("key_id", "org", "team", "route", "provider", "model")
    return (
        head
        + b"".join(b'"%s":%b,' % (n.encode(), dumps(v)) for n, v in zip(names, who, strict=True))
        + b'"attempts":%d,"tokens":{"prompt":%d,"completion":%d,"total":%d},"cost_usd":%b,'
        % (
            facts.attempts,
            facts.prompt_tokens,
            facts.completion_tokens,
            facts.total_tokens,
            dumps(facts.cost_usd),
        )
        + b'"cache":%b}\n' % dumps(cache)
    )


def test_templated_lines_are_the_bytes_of_one_format_of_every_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Templates keep the fields that repeat: a '%' in them stays a literal, the
    level follows the status, a template serves every line with the same fields."""
    now = [0.0]
    perf = [0.0]
    monkeypatch.setattr(accesslog, "_time", lambda: now[0])
    monkeypatch.setattr(accesslog, "_perf_counter", lambda: perf[0])
    texts = [None, "", "%", "%d%%s", 'q"\n\\', "k\u2028é", "key-1", "/x%20y"]
    choose = random.Random(17).choice
    written: list[bytes] = []
    log = AccessLog(written.append)
    expected: list[bytes] = []
    for i in range(3000):
        facts = None
        if i % 4:
            facts = UsageRecord(
                "r",
                choose(texts),
                choose(texts),
                choose(texts) or "alias",
                choose(texts),
                choose(texts),
                choose([0, 12, 10**9]),
                choose([0, 30]),
                choose([0, 42, 2**40]),
                1.0,
                200,
                0.0,
                "chat",
                choose([0, 1, 3]),
                choose(texts),
                cost_usd=choose([None, 0.0, 7.2e-05, 1e-300, 123.456, 1e22]),
            )
        method = choose(["GET", "POST", "X%d", "BR\x07EW"])
        path = choose(texts) or "/"
        status = choose([0, 200, 404, 499, 500, 503])
        request_id = choose(["id", "req\n1", "%s"])
        trace_id = choose([b"null", b'"4bf92f3577b34da6a3ce929d0e0e4736"'])
        cache = choose([None, "hit", "%x"])
        now[0] = choose([0.0, 1.0, 0.0005, 0.0625, 1733150000.1234999, 1e12, i * 1.0001])
        perf[0] = 1000.0 + i
        started = perf[0] - choose([0.0, 0.000005, 0.00125, 0.25, 99.999995])
        log.record(method, path, status, started, request_id, facts, trace_id, cache)
        expected.append(
            _reference_line(
                now[0],
                (perf[0] - started) * 1000.0,
                method,
                path,
                status,
                request_id,
                facts,
                trace_id,
                cache,
            )
        )
    log.flush()
    assert b"".join(written) == b"".join(expected)
