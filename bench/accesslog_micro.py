"""What one access log line costs, in process: the writer against the logging module.

    python bench/accesslog_micro.py

Deterministic enough to read on a shared machine where ``ab.py`` cannot tell a
few microseconds apart. Prints microseconds per line for:

- ``logging``: the previous way (``logging.getLogger("gandalf.access").info``
  with the ``configure_logging`` formatter, an orjson dict per line);
- ``writer, N per loop turn``: :class:`gandalf.server.accesslog.AccessLog`,
  N lines recorded before the event loop comes round (one ``os.write`` per
  turn), the cost of an empty loop turn subtracted.

Both write to a temporary file, as a server's redirected stderr would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import timeit

import orjson

from gandalf.server.accesslog import AccessLog

N = 50_000
REQUEST_ID = "01a2343a-6110-78b0-ad61-166da3ca5e9c"
PATH = "/v1/chat/completions"


def logging_us(path: str) -> float:
    logger = logging.getLogger("bench.access")
    with open(path, "w") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        started = time.perf_counter()

        def line() -> None:
            logger.info(
                "%s",
                orjson.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "method": "POST",
                        "path": PATH,
                        "status": 200,
                        "ms": round((time.perf_counter() - started) * 1000.0, 2),
                        "request_id": REQUEST_ID,
                    }
                ).decode(),
            )

        seconds = timeit.timeit(line, number=N)
        logger.removeHandler(handler)
    return seconds / N * 1e6


async def writer_us(path: str, per_turn: int) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        log = AccessLog(lambda data: os.write(fd, data))
        started = time.perf_counter()
        turns = N // per_turn
        t0 = time.perf_counter()
        for _ in range(turns):
            for _ in range(per_turn):
                log.record("POST", PATH, 200, started, REQUEST_ID)
            await asyncio.sleep(0)
        with_lines = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(turns):
            await asyncio.sleep(0)
        empty = time.perf_counter() - t0
        log.flush()
    finally:
        os.close(fd)
    return (with_lines - empty) / (turns * per_turn) * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gandalf-accesslog-") as tmp:
        target = os.path.join(tmp, "access.log")
        print(f"logging:                  {logging_us(target):6.2f} us/line")
        for per_turn in (1, 4, 16):
            cost = asyncio.run(writer_us(target, per_turn))
            print(f"writer, {per_turn:2d} per loop turn:  {cost:6.2f} us/line")


if __name__ == "__main__":
    main()
