"""The access log writer: its lines, when they are written, and that none is lost."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from gandalf.server import accesslog
from gandalf.server.accesslog import FLUSH_BYTES, AccessLog, write_stderr
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
    log = AccessLog(written.append)

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
