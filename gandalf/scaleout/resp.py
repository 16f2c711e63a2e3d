"""One pipelined Redis connection for the request path (the admission script).

Measured on this 2-core box (bench/redis_limits.py, and 3,000 PINGs from 64
concurrent tasks): redis-py's asyncio client costs 115-155 us of CPU per
command (pool checkout, command packing, its pure-Python reply parser), the
same commands written on one shared connection and answered in order cost
8 us. Every limited request makes one such call, so the worker's admission
goes through :class:`PipelinedConnection`; everything else (settle batches,
pub/sub, the cache, rebuilds) uses redis-py.

Concurrent callers share the connection: each writes its command and waits
for its reply, matched in order (Redis answers a connection's commands in
the order it received them). There is no per-call timer: a watchdog checks
every ``timeout / 2`` whether the oldest unanswered command has waited
longer than ``timeout``, and then fails the connection (every waiter gets a
:class:`ConnectionLost`) so that the next call reconnects.

Supported URLs: ``redis://[[user]:password@]host[:port][/db]`` and
``unix://path[?db=N]``; :func:`supports` says whether a URL is one of them
(``rediss://`` stays with redis-py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["ConnectionLost", "PipelinedConnection", "ReplyError", "supports"]

Reply = bytes | int | list["Reply"] | None


class ConnectionLost(ConnectionError):
    """The connection failed, closed or timed out (an OSError: a Redis failure)."""


class ReplyError(Exception):
    """Redis answered with an error (``-ERR ...``, ``-NOSCRIPT ...``)."""


def supports(url: str) -> bool:
    return url.startswith(("redis://", "unix://"))


def _command(args: tuple[bytes | str | int | float, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


async def _read(reader: asyncio.StreamReader) -> Reply | ReplyError:
    line = await reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionLost("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        return (await reader.readexactly(size + 2))[:-2]
    if kind == b":":
        return int(rest)
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None
        items: list[Reply] = []
        for _ in range(count):
            item = await _read(reader)
            if isinstance(item, ReplyError):
                raise ConnectionLost(f"unexpected error inside an array: {item}")
            items.append(item)
        return items
    if kind == b"+":
        return rest
    if kind == b"-":
        return ReplyError(rest.decode(errors="replace"))
    raise ConnectionLost(f"unexpected reply from Redis: {line[:40]!r}")


class PipelinedConnection:
    """See the module doc. ``timeout``: seconds a connect or a reply may take."""

    __slots__ = (
        "_connecting",
        "_db",
        "_host",
        "_password",
        "_path",
        "_port",
        "_reader_task",
        "_sent",
        "_user",
        "_waiters",
        "_watchdog",
        "_writer",
        "timeout",
    )

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._path: str | None = None
        db = 0
        if parts.scheme == "unix":
            self._path = parts.path
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
        elif parts.path.strip("/"):
            db = int(parts.path.strip("/"))
        self._db = db
        self.timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        # Unanswered commands, oldest first: their futures and when each was sent.
        self._waiters: deque[asyncio.Future[Reply | ReplyError]] = deque()
        self._sent: deque[float] = deque()

    async def call(self, *args: bytes | str | int | float) -> Reply:
        """Send one command and return its reply; raises :class:`ReplyError`
        for an error reply, :class:`ConnectionLost` (an OSError) when Redis
        cannot be reached or does not answer within ``timeout``."""
        writer = self._writer
        if writer is None:
            writer = await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply | ReplyError] = loop.create_future()
        self._waiters.append(future)
        self._sent.append(loop.time())
        writer.write(_command(args))
        reply = await future
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def _connect(self) -> asyncio.StreamWriter:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            try:
                async with asyncio.timeout(self.timeout):
                    if self._path is not None:
                        reader, writer = await asyncio.open_unix_connection(self._path)
                    else:
                        reader, writer = await asyncio.open_connection(self._host, self._port)
                    hello: list[tuple[str | int, ...]] = []
                    if self._password is not None:
                        auth: tuple[str, ...] = (self._password,)
                        hello.append(("AUTH", *((self._user,) if self._user else ()), *auth))
                    if self._db:
                        hello.append(("SELECT", self._db))
                    for command in hello:
                        writer.write(_command(command))
                        answer = await _read(reader)
                        if isinstance(answer, ReplyError):
                            writer.close()
                            raise ConnectionLost(f"Redis refused {command[0]}: {answer}")
            except TimeoutError:
                raise ConnectionLost(f"no connection to Redis within {self.timeout:g}s") from None
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_replies(reader, writer))
            if self._watchdog is None:
                self._watchdog = asyncio.create_task(self._watch())
            return writer

    async def _read_replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        waiters, sent = self._waiters, self._sent
        try:
            while True:
                reply = await _read(reader)
                if not waiters:
                    raise ConnectionLost("a reply nobody asked for")
                sent.popleft()
                future = waiters.popleft()
                if not future.done():
                    future.set_result(reply)
        except asyncio.CancelledError:
            self._fail(writer, ConnectionLost("connection closed"))
            raise
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self._fail(writer, ConnectionLost(f"connection to Redis lost: {exc}"))

    def _fail(self, writer: asyncio.StreamWriter, exc: ConnectionLost) -> None:
        """Drop the connection (if still the current one): every unanswered
        command fails with ``exc``; the next call reconnects."""
        if self._writer is not writer:
            return
        self._writer = None
        writer.close()
        waiters, self._waiters = self._waiters, deque()
        self._sent = deque()
        for future in waiters:
            if not future.done():
                future.set_exception(exc)
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.timeout / 2)
            sent, writer = self._sent, self._writer
            if writer is not None and sent and loop.time() - sent[0] > self.timeout:
                self._fail(writer, ConnectionLost(f"Redis did not answer within {self.timeout:g}s"))

    async def close(self) -> None:
        writer = self._writer
        if writer is not None:
            self._fail(writer, ConnectionLost("connection closed"))
        for task in (self._reader_task, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._reader_task = self._watchdog = None
