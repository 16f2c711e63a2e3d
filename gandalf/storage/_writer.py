"""The single writer every store shares: one task drains one queue, in order.

Usage records are batched (everything available, up to ``batch_size``, one
transaction); every other write is an operation whose result or exception
is handed back to the awaiting caller. ``record_usage`` never blocks and never
raises: past ``queue_size`` waiting items a record is dropped and counted. A
batch that fails for a reason that waiting can heal (the engine says so:
:meth:`BatchedWriter._transient`) is kept and retried after an exponential
backoff with jitter; any other failure drops the batch (``usage_failed``).
``close`` drains the queue first, within its timeout. With
``usage_retention`` > 0 a background task deletes old raw records in bounded
passes.

An engine subclasses :class:`BatchedWriter`, starts the writer with
:meth:`_start` once connected, and supplies the engine parts: how a batch is
committed (:meth:`_commit_usage`), how an operation runs in a transaction
(:meth:`_run_op`), which errors are transient, how old records are deleted
(:meth:`prune_usage`) and how connections are closed (:meth:`_disconnect`).
``C`` is whatever the writer writes through (a connection, a pool).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, TypeVar

from gandalf.domain import UsageRecord
from gandalf.storage.protocol import StorageError

logger = logging.getLogger("gandalf.storage")

_T = TypeVar("_T")
C = TypeVar("C")

RETRY_BASE: Final = 0.1  # seconds: the first backoff after a failed usage batch
RETRY_CAP: Final = 5.0  # seconds: the longest backoff
_RETRY_LOG_EVERY: Final = 10  # log the first failed attempt of a batch, then every 10th
# Usage retention: a pass deletes at most RETENTION_BATCH raw records (a few
# tens of ms of writer time), every RETENTION_EVERY seconds, or after
# RETENTION_BACKLOG_PAUSE while older records remain.
RETENTION_EVERY: Final = 60.0
RETENTION_BATCH: Final = 5000
RETENTION_BACKLOG_PAUSE: Final = 0.5
_DROP_WARNING_INTERVAL: Final = 1.0  # seconds between "usage dropped" warnings


class WriteOp(Generic[C]):
    """One write: ``fn`` runs on the writer's connection inside its own transaction."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[C], Awaitable[Any]], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future


class _Stop:
    """The shutdown sentinel: the writer exits once everything before it is done."""

    __slots__ = ()


_STOP: Final = _Stop()


async def _noop(conn: object) -> None:
    return None


class BatchedWriter(Generic[C]):
    """The queue, the writer task, usage accounting, drain on close, retention."""

    def __init__(
        self,
        *,
        queue_size: int,
        batch_size: int,
        usage_linger: float,
        clock: Callable[[], float] = time.time,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        retry_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        usage_retention: float = 0.0,
        retention_every: float = RETENTION_EVERY,
        retention_batch: int = RETENTION_BATCH,
        retention_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be at least 1")
        if retry_base <= 0 or retry_cap < retry_base:
            raise ValueError("0 < retry_base <= retry_cap is required")
        if usage_retention < 0 or retention_every <= 0 or retention_batch < 1:
            raise ValueError("usage_retention >= 0, retention_every > 0, retention_batch >= 1")
        self._retention = usage_retention
        self._retention_every = retention_every
        self._retention_batch = retention_batch
        self._retention_sleep = retention_sleep
        self._retention_backlog_pause = min(RETENTION_BACKLOG_PAUSE, retention_every)
        self._prune_task: asyncio.Task[None] | None = None
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._linger = usage_linger
        self._clock = clock
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._retry_sleep = retry_sleep
        self._rng = rng if rng is not None else random.Random()
        # The usage batch the writer holds (while it retries it): lost if the
        # writer is stopped before it commits.
        self._holding: list[UsageRecord] | None = None
        # Unbounded on purpose: write operations and the stop sentinel must
        # always get in; record_usage enforces queue_size for usage records.
        self._queue: asyncio.Queue[UsageRecord | WriteOp[C] | _Stop] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._accepting = True
        self._dropped = 0
        self._written = 0
        self._failed = 0
        self._last_drop_warning = float("-inf")

    # ----------------------------------------------------------------- engine parts

    async def _commit_usage(self, conn: C, batch: list[UsageRecord]) -> None:
        """Insert ``batch`` and add it into the rollups, in one transaction."""
        raise NotImplementedError

    async def _run_op(self, conn: C, op: WriteOp[C]) -> None:
        """Run ``op.fn`` in a transaction; settle ``op.future`` (engine errors
        as StorageError). Must not raise."""
        raise NotImplementedError

    def _transient(self, exc: BaseException) -> bool:
        """Can waiting heal ``exc`` (busy, locked, disconnected, disk full)?"""
        raise NotImplementedError

    async def _disconnect(self) -> None:
        """Close every connection (after the writer stopped)."""
        raise NotImplementedError

    async def prune_usage(self, batch: int = 5000) -> int:
        raise NotImplementedError

    # ----------------------------------------------------------------- lifecycle

    def _start(self, conn: C) -> None:
        """Start the writer on ``conn`` (and the retention task when retention is on)."""
        self._writer_task = asyncio.create_task(self._run_writer(conn), name="gandalf-storage")
        if self._retention > 0:
            self._prune_task = asyncio.create_task(self._prune_forever(), name="gandalf-retention")

    async def close(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 bounds the drain
        """Flush queued writes, stop the writer, close every connection. Idempotent.

        Everything queued before the call is written, unless that takes longer
        than ``timeout`` seconds: then the rest is abandoned (operations fail
        with StorageError, usage records count as dropped) and logged.
        """
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._shutdown(drain_seconds=timeout))
        await asyncio.shield(self._close_task)

    async def _shutdown(self, drain_seconds: float) -> None:
        self._accepting = False
        prune = self._prune_task
        if prune is not None:
            prune.cancel()
            await asyncio.wait({prune})
        task = self._writer_task
        if task is not None:
            self._queue.put_nowait(_STOP)
            done, _ = await asyncio.wait({task}, timeout=drain_seconds)
            if not done:
                logger.error(
                    "storage writer did not drain within %.1fs; abandoning %d queued items",
                    drain_seconds,
                    self._queue.qsize(),
                )
                task.cancel()
                await asyncio.wait({task})
            elif not task.cancelled():
                task.exception()  # already logged by the writer; retrieved here
        self._abandon_queued()
        await self._disconnect()

    def _abandon_queued(self) -> None:
        holding, self._holding = self._holding, None
        lost = len(holding) if holding is not None else 0
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, UsageRecord):
                lost += 1
            elif isinstance(item, WriteOp) and not item.future.done():
                item.future.set_exception(StorageError("store closed before the write ran"))
        if lost:
            self._dropped += lost
            logger.error("store closed with %d usage records unwritten", lost)

    # ----------------------------------------------------------------- usage

    def record_usage(self, rec: UsageRecord) -> None:
        """Queue one usage record for the writer. Never blocks, never raises.

        When ``queue_size`` items are already waiting (or the store is closing)
        the record is dropped and counted in ``dropped_usage``.
        """
        queue = self._queue
        if self._accepting and queue.qsize() < self._queue_size:
            queue.put_nowait(rec)
        else:
            self._drop_usage()

    def _drop_usage(self) -> None:
        self._dropped += 1
        now = self._clock()
        if abs(now - self._last_drop_warning) >= _DROP_WARNING_INTERVAL:
            self._last_drop_warning = now
            logger.warning(
                "usage queue full or closed: %d usage records dropped so far", self._dropped
            )

    @property
    def dropped_usage(self) -> int:
        """Usage records dropped because the queue was full or the store closed."""
        return self._dropped

    @property
    def usage_written(self) -> int:
        """Usage records committed to the database by this store."""
        return self._written

    @property
    def usage_failed(self) -> int:
        """Usage records lost because their batch failed to commit (each failure is logged)."""
        return self._failed

    async def flush(self) -> None:
        """Return once everything queued before this call has been written (or failed)."""
        await self._write(_noop)

    async def _prune_forever(self) -> None:
        """The retention loop: a bounded prune every ``retention_every``
        seconds, sooner while old records remain (each prune is one short
        write among the others, so the writer never stalls on it)."""
        pause = self._retention_every  # not at once: start-up has better things to do
        while True:
            await self._retention_sleep(pause)
            try:
                deleted = await self.prune_usage(self._retention_batch)
            except StorageError as exc:
                logger.warning("pruning old usage records failed: %s", exc)
                deleted = 0
            if deleted:
                logger.info("deleted %d usage record(s) older than the retention", deleted)
            backlog = deleted >= self._retention_batch
            pause = self._retention_backlog_pause if backlog else self._retention_every

    # ----------------------------------------------------------------- the writer

    async def _write(self, fn: Callable[[C], Awaitable[_T]]) -> _T:
        """Run ``fn`` on the writer's connection in its own transaction; its result or error."""
        if self._writer_task is None or not self._accepting:
            raise StorageError("store is not open")
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(WriteOp(fn, future))
        return await future

    async def _run_writer(self, conn: C) -> None:
        """Drain the queue in order until the stop sentinel; survive every failing item."""
        queue = self._queue
        batch_size = self._batch_size
        linger = self._linger
        loop = asyncio.get_running_loop()
        last_batch = float("-inf")
        item: UsageRecord | WriteOp[C] | _Stop | None = None
        try:
            while True:
                if item is None:
                    item = await queue.get()
                if isinstance(item, UsageRecord):
                    # Each transaction costs several round trips: under load,
                    # let records gather for up to `linger` since the last batch.
                    wait = last_batch + linger - loop.time()
                    if wait > 0 and queue.qsize() < batch_size:
                        await asyncio.sleep(wait)
                    batch = [item]
                    item = None
                    while len(batch) < batch_size and not queue.empty():
                        following = queue.get_nowait()
                        if isinstance(following, UsageRecord):
                            batch.append(following)
                        else:
                            item = following  # keeps order: handled right after the batch
                            break
                    await self._write_usage(conn, batch)
                    last_batch = loop.time()
                elif isinstance(item, WriteOp):
                    await self._run_op(conn, item)
                    item = None
                else:
                    return
        except Exception:
            logger.exception("storage writer crashed")
            raise
        finally:
            if isinstance(item, WriteOp) and not item.future.done():
                item.future.set_exception(StorageError("store closed before the write ran"))

    async def _write_usage(self, conn: C, batch: list[UsageRecord]) -> None:
        """Commit ``batch``, retrying while the failure is transient."""
        self._holding = batch
        retries = 0
        while True:
            try:
                await self._commit_usage(conn, batch)
            except Exception as exc:
                if not self._transient(exc):
                    self._holding = None
                    self._failed += len(batch)
                    logger.exception("writing a batch of %d usage records failed", len(batch))
                    return
                span = min(self._retry_cap, self._retry_base * 2.0**retries)
                delay = self._rng.uniform(span / 2, span)
                if retries % _RETRY_LOG_EVERY == 0:
                    logger.warning(
                        "writing a batch of %d usage records failed (%s), attempt %d; "
                        "retrying in %.2fs, keeping the records",
                        len(batch),
                        exc,
                        retries + 1,
                        delay,
                    )
                retries += 1
                await self._retry_sleep(delay)
            else:
                self._holding = None
                self._written += len(batch)
                if retries:
                    logger.warning(
                        "wrote the batch of %d usage records after %d retries", len(batch), retries
                    )
                return
