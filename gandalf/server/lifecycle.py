"""A worker's life: start-up, the drain on SIGTERM/SIGINT, shutdown.

granian keeps serving in-flight requests until they end when it is told to
stop, so the app itself bounds them: on a signal (or at shutdown) in-flight
requests get ``shutdown_timeout`` seconds; after that, streams end with an
error event and other requests are answered 503 (the core's boundary turns
the CANCEL_SHUTDOWN cancellation into those answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from types import FrameType
from typing import Any

from gandalf.domain import CANCEL_SHUTDOWN
from gandalf.server.core import ServerCore

logger = logging.getLogger("gandalf.server")

# The collector's young-generation threshold in a serving worker (CPython's default: 700).
_GC_YOUNG_THRESHOLD = 20_000


class Lifecycle:
    """Starts and stops one :class:`ServerCore`; both adapters drive it."""

    __slots__ = ("_deadline", "_previous_handlers", "core", "handle_signals", "shutdown_timeout")

    def __init__(
        self, core: ServerCore, *, shutdown_timeout: float = 30.0, handle_signals: bool = False
    ) -> None:
        """``handle_signals``: in a server worker, start the drain deadline on
        SIGTERM/SIGINT."""
        self.core = core
        self.shutdown_timeout = shutdown_timeout
        self.handle_signals = handle_signals
        self._previous_handlers: dict[int, Any] = {}
        self._deadline: asyncio.TimerHandle | None = None

    async def startup(self) -> None:
        """Build the core's state (ASGI lifespan, tests, benchmarks)."""
        await self.core.start()
        if self.handle_signals:
            self.worker_ready(asyncio.get_running_loop())

    def start_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        """Build state on ``loop`` before it runs (RSGI's ``__rsgi_init__``)."""
        loop.run_until_complete(self.core.start())
        if self.handle_signals:
            self.worker_ready(loop)

    def worker_ready(self, loop: asyncio.AbstractEventLoop) -> None:
        """A server worker finished building its state."""
        self._install_signal_drain(loop)
        # Everything built so far lives as long as the worker: move it out of the
        # collector's way (measured ~3% CPU per request under load).
        gc.collect()
        gc.freeze()
        # Under load the young generation is collected every 700 net allocations,
        # i.e. every few requests, and each pass walks every young object still
        # alive: the in-flight requests'. Rarer passes walk about as much each
        # (the live set is what it is), so the collector's share shrinks; garbage
        # cycles wait a little longer, a few MB at most.
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    def _install_signal_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Chain a Python-level SIGTERM/SIGINT handler in front of the event
        loop's: the loop's own handlers (granian's) still run, through the
        signal wakeup fd and the previous handler, which is called too."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            self._previous_handlers[signum] = previous

            def handler(num: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.begin_drain)
                if callable(previous):
                    previous(num, frame)

            signal.signal(signum, handler)

    def _restore_signals(self) -> None:
        for signum, previous in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._previous_handlers.clear()

    def begin_drain(self) -> None:
        """The server stopped accepting: in-flight requests get ``shutdown_timeout``
        to finish; after that, streams end with an error event and other
        requests are answered 503."""
        if self._deadline is None:
            loop = asyncio.get_running_loop()
            logger.info(
                "draining %d in-flight request(s), at most %.1fs",
                self.core.inflight,
                self.shutdown_timeout,
            )
            self._deadline = loop.call_later(self.shutdown_timeout, self._cut_off)

    def _cut_off(self) -> None:
        ended = self.core.cancel_all(CANCEL_SHUTDOWN)
        if ended:
            logger.warning("shutdown timeout: ending %d request(s) still in flight", ended)

    async def shutdown(self) -> None:
        """Wait for in-flight requests (bounded), then close everything. Idempotent."""
        core = self.core
        if not core.started:
            core.access.flush()
            return
        self._restore_signals()
        if core.inflight:
            self.begin_drain()
            if not await core.wait_idle(self.shutdown_timeout + 5.0):
                logger.error("%d request(s) did not end after the shutdown timeout", core.inflight)
        if self._deadline is not None:
            self._deadline.cancel()
        await core.stop()
        # Every request has ended (or been ended): its line is in the buffer.
        core.access.flush()
