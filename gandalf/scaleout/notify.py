"""Change notifications through Redis pub/sub: an admin change made on one
instance wakes every instance's watcher (app/live.py) at once.

The change itself travels through the database's change log, as before; the
message only says "look now" (its content is ignored), so a lost message
costs nothing but the poll interval: the watcher's poll stays the fallback
(and the only path while Redis is down or for writes made by the CLI).

:meth:`RedisNotifier.publish` is called after an admin write;
:meth:`RedisNotifier.run` (started per worker) listens and calls ``wake``,
resubscribing after a failure every ``retry_interval`` (and waking the watcher
once subscribed again, for what it may have missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gandalf.scaleout.connection import RedisLink, is_redis_failure

logger = logging.getLogger("gandalf.redis")

LISTEN_TIMEOUT = 1.0  # seconds one wait for a message lasts (then waits again)


class RedisNotifier:
    """Publishes and receives "the change log moved" on ``{prefix}changes``."""

    __slots__ = ("_closed", "_link", "_task", "_wake", "channel", "received")

    def __init__(self, link: RedisLink, wake: Callable[[], object]) -> None:
        self._link = link
        self._wake = wake
        self.channel = (link.prefix + "changes").encode()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.received = 0  # messages received (tests and diagnostics)

    async def publish(self) -> None:
        """Tell every instance to look at the change log now (never raises
        for Redis being down: the others' poll finds the change anyway)."""
        link = self._link
        if link.down and link.skip():
            return
        try:
            await link.client.publish(self.channel, b"1")
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            link.failed(exc, "change notification")
            return
        if link.down:
            link.succeeded()

    async def run(self) -> None:
        """Listen until cancelled; never raises otherwise."""
        link = self._link
        while not self._closed:
            pubsub = link.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if link.down:
                    link.succeeded()
                self._wake()  # anything published while not subscribed
                while not self._closed:
                    message = await pubsub.get_message(timeout=LISTEN_TIMEOUT)
                    if message is not None:
                        self.received += 1
                        self._wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_redis_failure(exc):
                    link.failed(exc, "change notifications")
                else:
                    logger.exception("change notifications failed")
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if not self._closed:
                await asyncio.sleep(link.retry_interval)  # pacing the resubscription

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="gandalf-redis-notify")

    async def close(self) -> None:
        # A flag as well as the cancel: redis-py may swallow a cancellation
        # inside a read, and the loop must still end (within LISTEN_TIMEOUT).
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
